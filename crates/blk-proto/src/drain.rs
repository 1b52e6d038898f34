//! The drain loop's rules as one pure function over a mapped ring: the server's iothread runs
//! it (vhost-server drain.rs, with the engine as the sink) and so do the fuzz targets and
//! their stable twin (blk-fuzz), so what is fuzzed is what is served.
//!
//! - caught up when the guest's avail index equals `next_avail`;
//! - an index more than a queue ahead of `next_avail`, or an unreadable index or entry,
//!   stops the queue (the guest claims chains that cannot exist);
//! - a full sink leaves the rest on the ring (backpressure): nothing is read past it;
//! - every chain popped is walked (`MappedRing::chain`) and parsed (`parse_walk`), and handed
//!   to the sink with its outcome, exactly once.

use crate::request::{parse_walk, ParseError, Request};
use crate::split_ring::{ChainError, MappedRing, RingError};
use crate::DeviceConfig;

/// Why a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainEnd {
    /// `next_avail` reached the guest's avail index.
    CaughtUp,
    /// The sink took all it could; the rest stays on the ring.
    Throttled,
    /// The queue must stop until it is reset.
    Broken(Broken),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("the guest's avail index {idx} is more than a queue ahead of {next_avail}")]
    AheadOfQueue { idx: u16, next_avail: u16 },
    #[error("{0}")]
    Ring(RingError),
}

/// Where popped chains go.
pub trait DrainSink {
    /// Whether one more request can be taken now.
    fn has_room(&mut self) -> bool;
    /// A request to parse into; called only after `has_room` said yes.
    fn take(&mut self) -> Request;
    /// The chain at `head`, parsed into `request` with `result` (and, when the walk failed,
    /// why).
    fn popped(
        &mut self,
        head: u16,
        request: Request,
        result: Result<(), ParseError>,
        walk_error: Option<ChainError>,
    );
}

/// Pops what the guest published from `*next_avail` on (advancing it past each chain popped)
/// until caught up, throttled or broken.
pub fn drain(
    ring: &MappedRing<'_>,
    cfg: &DeviceConfig,
    next_avail: &mut u16,
    sink: &mut impl DrainSink,
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
            if !sink.has_room() {
                return DrainEnd::Throttled;
            }
            let head = match ring.head(*next_avail) {
                Ok(head) => head,
                Err(e) => return DrainEnd::Broken(Broken::Ring(e)),
            };
            *next_avail = next_avail.wrapping_add(1);
            let mut request = sink.take();
            let mut walk = ring.chain(head);
            let result = parse_walk(&mut walk, cfg, &mut request);
            sink.popped(head, request, result, walk.error());
        }
    }
}
