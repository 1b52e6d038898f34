//! One iothread's event loop for one connection: an epoll over the kick eventfds of its
//! started and enabled queues, its engine's completion eventfd, its control eventfd and an
//! exit eventfd. Every event goes to the device's dispatch
//! ([`VhostUserBlk::handle_event`](vhost_user_backend::VhostUserBackend::handle_event),
//! vhost_user.rs), which never fails: what can fail here is the loop itself (epoll, a kick fd
//! that cannot be read, a panic), and that ends the connection loudly instead of leaving
//! queues nobody serves.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost_user_backend::{VhostUserBackend, VringT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{completion_event, control_event, VhostUserBlk};
use crate::Vring;

/// Events taken per epoll_wait.
const EVENTS: usize = 64;

pub(crate) struct EventLoop {
    thread: usize,
    epoll: Epoll,
    exit: EventFd,
    /// Epoll data of the exit eventfd: the queue count (local queue indexes sit below it,
    /// completion and control above it).
    exit_token: u64,
}

impl EventLoop {
    /// The loop of iothread `thread`, its completion and control eventfds already watched.
    pub(crate) fn new(device: &VhostUserBlk, thread: usize) -> io::Result<EventLoop> {
        let n = device.0.device.num_queues as usize;
        let epoll = Epoll::new()?;
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let exit_token = n as u64;
        let completion = device.control(thread).engine.eventfd();
        for (fd, token) in [
            (exit.as_raw_fd(), exit_token),
            (completion, u64::from(completion_event(n))),
            (
                device.0.ports[thread].eventfd(),
                u64::from(control_event(n)),
            ),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(EventLoop {
            thread,
            epoll,
            exit,
            exit_token,
        })
    }

    /// Watches a queue's kick eventfd (a queue both started and enabled), then counts one
    /// kick on it, so that what the guest published before the fd was watched is drained
    /// (and, after a reconnect, resubmitted requests go out without waiting for the guest).
    pub(crate) fn watch_queue(&self, local: usize, kick: RawFd) -> io::Result<()> {
        match self.epoll.ctl(
            ControlOperation::Add,
            kick,
            EpollEvent::new(EventSet::IN, local as u64),
        ) {
            Ok(()) => {}
            // Enabled twice: already watched.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        kick_eventfd(kick);
        Ok(())
    }

    /// Stops watching a kick eventfd (before it is replaced or closed: the frontend keeps its
    /// own copy open, so closing ours would not take it out of the epoll set).
    pub(crate) fn unwatch_queue(&self, kick: RawFd) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            kick,
            EpollEvent::new(EventSet::IN, 0),
        );
    }

    /// Asks the loop to return.
    pub(crate) fn stop(&self) {
        if let Err(e) = self.exit.write(1) {
            log::error!("iothread {}: cannot stop its event loop: {e}", self.thread);
        }
    }

    /// Serves events until [`EventLoop::stop`]. `vrings` are this thread's queues, in order.
    fn run(&self, device: &VhostUserBlk, vrings: &[Vring]) -> io::Result<()> {
        let mut events = vec![EpollEvent::default(); EVENTS];
        loop {
            let ready = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io::Error::new(e.kind(), format!("epoll_wait: {e}"))),
            };
            for event in &events[..ready] {
                let token = event.data();
                if token == self.exit_token {
                    return Ok(());
                }
                if let Some(vring) = vrings.get(token as usize) {
                    match vring.read_kick() {
                        Ok(true) => {}
                        // Disabled since it was kicked: the guest's chains wait for enable.
                        Ok(false) => continue,
                        // Counted by a kick already taken (ours after a start, say).
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            return Err(io::Error::new(
                                e.kind(),
                                format!("reading the kick of local queue {token}: {e}"),
                            ))
                        }
                    }
                }
                device.handle_event(token as u16, EventSet::IN, vrings, self.thread)?;
            }
        }
    }
}

/// Counts one kick on a queue's eventfd (the frontend's; an eventfd accepts any u64 added).
fn kick_eventfd(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to a descriptor the vring owns; a
    // descriptor that is not an eventfd just fails the write.
    let written = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    if written != one.len() as isize {
        log::debug!(
            "could not count a kick on fd {fd}: {}",
            io::Error::last_os_error()
        );
    }
}

/// A running loop: its handle (to watch queues and stop it) and its thread.
pub(crate) struct RunningLoop {
    pub(crate) handle: Arc<EventLoop>,
    thread: JoinHandle<()>,
}

impl RunningLoop {
    /// Starts the loop of iothread `index` on a thread of its own. A loop that fails or
    /// panics says so at error level and ends the connection; the thread then keeps
    /// answering control messages (quiesce) until it is stopped, so the control path never
    /// waits on a thread that is gone.
    pub(crate) fn spawn(
        device: &VhostUserBlk,
        index: usize,
        vrings: Vec<Vring>,
    ) -> io::Result<RunningLoop> {
        let handle = Arc::new(EventLoop::new(device, index)?);
        let (device, lp) = (device.clone(), handle.clone());
        let thread = std::thread::Builder::new()
            .name(format!("iothread-{index}"))
            .spawn(move || {
                let why = match catch_unwind(AssertUnwindSafe(|| lp.run(&device, &vrings))) {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => format!("iothread {index}: its event loop failed: {e}"),
                    Err(panic) => format!(
                        "iothread {index}: its event loop panicked: {}",
                        panic_message(&panic)
                    ),
                };
                device.end_connection(&why);
                answer_control_until_stopped(&device, &lp);
            })?;
        Ok(RunningLoop { handle, thread })
    }

    /// Stops the loop and waits for its thread.
    pub(crate) fn stop(self) {
        self.handle.stop();
        if self.thread.join().is_err() {
            log::error!(
                "iothread {}: its thread panicked while stopping",
                self.handle.thread
            );
        }
    }
}

/// After a failed loop: control messages (quiesce, memory updates) still get their answer,
/// through poll(2) on the control and exit eventfds alone.
fn answer_control_until_stopped(device: &VhostUserBlk, lp: &EventLoop) {
    let port = &device.0.ports[lp.thread];
    let mut fds = [
        libc::pollfd {
            fd: port.eventfd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: lp.exit.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a live array of two pollfd structs and its length is passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("iothread {}: poll failed: {e}; it stops", lp.thread);
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents != 0 {
            device
                .thread(lp.thread)
                .serve_control(port, lp.thread, None);
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}
