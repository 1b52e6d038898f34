//! The server's drain, as the fuzz targets run it: `blk_proto::drain` itself (the function
//! vhost-server's iothread runs, with the engine as its sink), here with a sink that keeps
//! every popped chain for the checks and a room limit standing in for the engine's pool.

use blk_proto::{ChainError, DeviceConfig, DrainSink, MappedRing, ParseError, Request};

pub use blk_proto::{Broken, DrainEnd};

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
    room: usize,
    take: impl FnMut() -> Request,
    popped: impl FnMut(Popped),
) -> DrainEnd {
    let mut sink = Keep { room, take, popped };
    blk_proto::drain(ring, cfg, next_avail, &mut sink)
}

/// The harness's sink: room for `room` more chains, requests from `take`, results to
/// `popped`.
struct Keep<T, P> {
    room: usize,
    take: T,
    popped: P,
}

impl<T: FnMut() -> Request, P: FnMut(Popped)> DrainSink for Keep<T, P> {
    fn has_room(&mut self) -> bool {
        self.room > 0
    }

    fn take(&mut self) -> Request {
        self.room -= 1;
        (self.take)()
    }

    fn popped(
        &mut self,
        head: u16,
        request: Request,
        result: Result<(), ParseError>,
        walk_error: Option<ChainError>,
    ) {
        (self.popped)(Popped {
            head,
            result,
            chain_error: walk_error,
            request,
        });
    }
}
