//! The server's drain loop (vhost-server `IoThread::drain`) over a ring whose memory does not
//! change while it runs, as a pure function: the same avail-index rules (caught up; more than
//! a queue ahead stops the queue; an unreadable index or entry stops the queue), the same
//! per-chain walk (`MappedRing::chain` + `parse_walk`), the same backpressure (a full engine
//! leaves the rest on the ring). vhost-server's own loop cannot be called without its vring,
//! engine and threads, so this mirrors it line by line; keep the two in step.

use blk_proto::{parse_walk, ChainError, DeviceConfig, MappedRing, ParseError, Request, RingError};

/// Why a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainEnd {
    /// next_avail reached the guest's avail index.
    CaughtUp,
    /// The engine took all it could; the rest stays on the ring.
    Throttled,
    /// The server stops the queue until it is reset.
    Broken(Broken),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// The guest's index is more than a queue ahead of next_avail.
    AheadOfQueue {
        idx: u16,
        next_avail: u16,
    },
    Ring(RingError),
}

/// One chain the drain popped and what the parser made of it.
#[derive(Debug)]
pub struct Popped {
    pub head: u16,
    pub result: Result<(), ParseError>,
    /// Why the walk failed, when it did.
    pub chain_error: Option<ChainError>,
    pub request: Request,
}

/// What the server does with a popped chain: every one gets exactly one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Valid: the engine executes it and writes the status byte when it completes.
    Execute,
    /// Rejected with this status, written at once.
    Reject(u8),
    /// No trustworthy status byte: used length 0 and a log line (naming why).
    Drop,
}

impl Popped {
    pub fn disposition(&self) -> Disposition {
        match &self.result {
            Ok(()) => Disposition::Execute,
            Err(e) => match e.status() {
                Some(status) => Disposition::Reject(status),
                None => Disposition::Drop,
            },
        }
    }
}

/// Pops what the guest published, from `*next_avail` on, at most `room` chains; each chain's
/// request comes from `take` and goes to `popped`.
pub fn drain(
    ring: &MappedRing<'_>,
    cfg: &DeviceConfig,
    next_avail: &mut u16,
    mut room: usize,
    mut take: impl FnMut() -> Request,
    mut popped: impl FnMut(Popped),
) -> DrainEnd {
    loop {
        let avail_idx = match ring.avail_idx() {
            Ok(idx) if idx == *next_avail => return DrainEnd::CaughtUp,
            Ok(idx) if idx.wrapping_sub(*next_avail) > ring.size() => {
                return DrainEnd::Broken(Broken::AheadOfQueue {
                    idx,
                    next_avail: *next_avail,
                })
            }
            Ok(idx) => idx,
            Err(e) => return DrainEnd::Broken(Broken::Ring(e)),
        };
        while *next_avail != avail_idx {
            if room == 0 {
                return DrainEnd::Throttled;
            }
            let head = match ring.head(*next_avail) {
                Ok(head) => head,
                Err(e) => return DrainEnd::Broken(Broken::Ring(e)),
            };
            *next_avail = next_avail.wrapping_add(1);
            room -= 1;
            let mut request = take();
            let mut walk = ring.chain(head);
            let result = parse_walk(&mut walk, cfg, &mut request);
            popped(Popped {
                head,
                result,
                chain_error: walk.error(),
                request,
            });
        }
    }
}
