//! The next request's header, read ahead without taking it off the socket (MSG_PEEK), and the
//! error replies the vhost crate does not send itself. Its `handle_request` replies to a
//! request our session refuses (REPLY_ACK), but a request it rejects on its own (an unknown
//! code, a feature not negotiated, fds where none belong, a malformed body) gets no reply at
//! all, and for some it has not even read the body. Knowing the header lets the connection
//! loop keep the stream in step and answer what the frontend waits for.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{FrontendReq, MAX_MSG_SIZE};

/// Bytes of a vhost-user header: request, flags, size (u32 each, little endian).
const HEADER: usize = 12;
const VERSION_MASK: u32 = 0x3;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const KNOWN_FLAGS: u32 = 0xf;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Header {
    pub(crate) code: u32,
    flags: u32,
    pub(crate) size: u32,
    /// File descriptors travel with it.
    has_fds: bool,
}

/// The next request's header, when 12 bytes of it are there (blocks until they are). None at
/// EOF or a partial header: `handle_request` then reports the socket's state itself.
pub(crate) fn peek(conn: &UnixStream) -> io::Result<Option<Header>> {
    let mut buf = [0u8; HEADER];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; all-zero is a valid empty value (no name, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // No control buffer: attached fds are not received (a peek leaves them queued), and
        // the kernel flags MSG_CTRUNC when there are some.
        // SAFETY: `msg` points at one iovec over `buf`, both live for the call.
        let n = unsafe {
            libc::recvmsg(
                conn.as_raw_fd(),
                &mut msg,
                libc::MSG_PEEK | libc::MSG_WAITALL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if (n as usize) < HEADER {
            return Ok(None);
        }
        let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        return Ok(Some(Header {
            code: word(0),
            flags: word(4),
            size: word(8),
            has_fds: msg.msg_flags & libc::MSG_CTRUNC != 0,
        }));
    }
}

impl Header {
    fn request(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.code).ok()
    }

    /// The request's name, for log lines.
    pub(crate) fn name(&self) -> String {
        match self.request() {
            Some(r) => format!("{r:?}"),
            None => format!("request {}", self.code),
        }
    }

    /// Version 1, known flags, a size the protocol allows: where the next message starts
    /// can be known.
    pub(crate) fn framed(&self) -> bool {
        self.flags & VERSION_MASK == 1
            && self.flags & !KNOWN_FLAGS == 0
            && self.flags & REPLY == 0
            && self.size as usize <= MAX_MSG_SIZE
    }

    /// The vhost crate took the header and stopped before the body: an unknown request, or
    /// one carrying fds it takes none with.
    pub(crate) fn body_left_unread(&self) -> bool {
        match self.request() {
            None => true,
            Some(r) => self.has_fds && !takes_fds(r),
        }
    }

    /// The frontend reads a reply of the request's own (not a REPLY_ACK) whatever happens.
    pub(crate) fn has_own_reply(&self) -> bool {
        use FrontendReq as R;
        matches!(
            self.request(),
            Some(
                R::GET_FEATURES
                    | R::SET_LOG_BASE
                    | R::GET_VRING_BASE
                    | R::GET_PROTOCOL_FEATURES
                    | R::GET_QUEUE_NUM
                    | R::GET_CONFIG
                    | R::CREATE_CRYPTO_SESSION
                    | R::POSTCOPY_ADVISE
                    | R::GET_INFLIGHT_FD
                    | R::GET_MAX_MEM_SLOTS
                    | R::GET_STATUS
                    | R::GET_SHARED_OBJECT
                    | R::SET_DEVICE_STATE_FD
                    | R::CHECK_DEVICE_STATE
                    | R::GET_SHMEM_CONFIG
            )
        )
    }

    pub(crate) fn is_get_inflight_fd(&self) -> bool {
        self.request() == Some(FrontendReq::GET_INFLIGHT_FD)
    }

    /// The frontend asked for a REPLY_ACK.
    pub(crate) fn needs_ack(&self) -> bool {
        self.flags & NEED_REPLY != 0
    }
}

/// The requests whose fds the vhost crate accepts.
fn takes_fds(r: FrontendReq) -> bool {
    use FrontendReq as R;
    matches!(
        r,
        R::SET_MEM_TABLE
            | R::SET_VRING_CALL
            | R::SET_VRING_KICK
            | R::SET_VRING_ERR
            | R::SET_LOG_BASE
            | R::SET_LOG_FD
            | R::SET_BACKEND_REQ_FD
            | R::SET_INFLIGHT_FD
            | R::ADD_MEM_REG
            | R::REM_MEM_REG
            | R::SET_DEVICE_STATE_FD
            | R::GPU_SET_SOCKET
    )
}

/// Reads and drops the body the vhost crate left on the socket.
pub(crate) fn skip_body(mut conn: &UnixStream, header: &Header) -> io::Result<()> {
    let mut body = [0u8; MAX_MSG_SIZE];
    conn.read_exact(&mut body[..header.size as usize])
}

/// REPLY_ACK with a failure for `header`'s request.
pub(crate) fn send_error_ack(conn: &UnixStream, header: &Header) -> io::Result<()> {
    send_reply(conn, header.code, &1u64.to_le_bytes())
}

/// GET_INFLIGHT_FD's answer when there is no region to give: mmap_size 0 and no fd (QEMU
/// then goes on without in-flight tracking, as with libvhost-user's refusal).
pub(crate) fn send_no_inflight(conn: &UnixStream, header: &Header) -> io::Result<()> {
    // VhostUserInflight: mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16,
    // padded to 24 bytes.
    send_reply(conn, header.code, &[0u8; 24])
}

fn send_reply(mut conn: &UnixStream, code: u32, body: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(HEADER + body.len());
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&(1 | REPLY).to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    conn.write_all(&msg)
}
