//! Busy-polling: after a batch, the iothread keeps looking at its avail rings and its
//! completion queue for an adaptive window before it sleeps in epoll.
//!
//! Napping (`ServerConfig::poll_nap`, off by default): inside the window, a look that finds
//! nothing while the queues run deep (a recent drain popped two chains or more at once, which
//! a QD1 guest never does) may be followed by a short nanosleep instead of more spinning,
//! guest notifications still off, so the guest does not have to kick. The nap is half the
//! gap seen between batches while spinning (the kernel's hybrid polling rule), at least
//! [`NAP_MIN`], at most the configured bound; the thread's timer slack is 1 µs. A nap that
//! overruns its length by more than the bound (the timer could not wake the thread in time:
//! the cost of a sleep on this platform is larger than the bound promises) turns napping
//! off for [`NAP_BACKOFF`], so such a platform pays one overrun per backoff.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use crate::control::ControlPort;
use crate::device::Inner;
use crate::iothread::IoThread;
use crate::Vring;

/// The smallest busy-poll window once polling is on.
pub(crate) const POLL_MIN: Duration = Duration::from_micros(4);

/// The shortest nap.
pub(crate) const NAP_MIN: Duration = Duration::from_micros(1);
/// Spin at least this long after the last sign of work before a nap.
const NAP_SPIN: Duration = Duration::from_micros(1);
/// No nap for this long after one overran its bound.
pub(crate) const NAP_BACKOFF: Duration = Duration::from_millis(100);
/// Drains (that popped something) per round of the depth signal.
const DEPTH_ROUND: u32 = 64;
/// Timer slack of a napping iothread, in ns (the default, 50 µs, would be the nap's floor).
const NAP_TIMER_SLACK_NS: libc::c_ulong = 1000;

/// An iothread's napping state: is the load deep, how long the gaps between batches are,
/// and whether naps keep their bound here.
#[derive(Debug, Default)]
pub(crate) struct Nap {
    /// Most chains one drain popped in the current round.
    depth: u16,
    /// Drains that popped something in the current round.
    drains: u32,
    /// The last full round saw a drain of two chains or more.
    deep: bool,
    /// Moving average of the gap between batches found while spinning, in ns.
    gap_ns: u64,
    /// No nap before this (one overran its bound).
    off_until: Option<Instant>,
    /// The thread whose timer slack was set (each connection runs its loop on a new thread).
    slack_set: Option<std::thread::ThreadId>,
    overrun_logged: bool,
    /// Naps taken, and those that overran their bound.
    pub(crate) naps: u64,
    pub(crate) overruns: u64,
}

impl Nap {
    /// A drain popped `chains` chains.
    pub(crate) fn note_drain(&mut self, chains: u16) {
        if chains == 0 {
            return;
        }
        self.depth = self.depth.max(chains);
        self.drains += 1;
        if self.drains >= DEPTH_ROUND {
            self.deep = self.depth >= 2;
            self.depth = 0;
            self.drains = 0;
        }
    }

    /// Deep: this round or the last one saw two chains or more in one drain.
    pub(crate) fn deep(&self) -> bool {
        self.deep || self.depth >= 2
    }

    /// Work showed up after `gap` of spinning (no nap in between).
    fn note_gap(&mut self, gap: Duration) {
        let gap = u64::try_from(gap.as_nanos()).unwrap_or(u64::MAX);
        self.gap_ns = if self.gap_ns == 0 {
            gap
        } else {
            (self.gap_ns.saturating_mul(7).saturating_add(gap)) / 8
        };
    }

    /// The next nap, if one is due: deep load, napping on, not backed off.
    fn length(&mut self, max: Duration, now: Instant) -> Option<Duration> {
        if max.is_zero() || !self.deep() {
            return None;
        }
        if let Some(until) = self.off_until {
            if now < until {
                return None;
            }
            self.off_until = None;
        }
        let half = Duration::from_nanos(self.gap_ns / 2);
        Some(half.clamp(NAP_MIN, max.max(NAP_MIN)))
    }

    /// A nap of `asked` took `took`.
    fn taken(&mut self, asked: Duration, took: Duration, max: Duration, thread: &str) {
        self.naps += 1;
        if took > asked + max {
            self.overruns += 1;
            self.off_until = Some(Instant::now() + NAP_BACKOFF);
            if !self.overrun_logged {
                self.overrun_logged = true;
                log::info!(
                    "{thread}: a {asked:?} nap took {took:?}, over the {max:?} bound: napping \
                     off for {NAP_BACKOFF:?} at a time after each such nap"
                );
            }
        }
    }

    /// Going to sleep in epoll: the next load is judged afresh.
    fn reset_depth(&mut self) {
        self.depth = 0;
        self.drains = 0;
        self.deep = false;
    }

    /// Sleeps `len` on the calling (iothread) thread, its timer slack set to 1 µs first.
    fn sleep(&mut self, len: Duration) {
        let me = std::thread::current().id();
        if self.slack_set != Some(me) {
            self.slack_set = Some(me);
            // SAFETY: PR_SET_TIMERSLACK takes an integer and touches no memory; it changes
            // only the calling thread's timer slack.
            let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, NAP_TIMER_SLACK_NS, 0, 0, 0) };
            if r != 0 {
                log::debug!(
                    "cannot set the timer slack: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        std::thread::sleep(len);
    }
}

impl IoThread {
    /// On waking from epoll for work: had the thread polled a little longer, would it have
    /// caught this event? Then grow the window; if it slept longer than the largest window,
    /// shrink it (QEMU's rule: judge polling by how long the thread blocked). Wake-ups that
    /// found nothing to do say nothing about polling and are not counted.
    pub(crate) fn adapt_poll_window(&mut self, slept_at: Option<Instant>, max: Duration) {
        if let Some(slept) = slept_at {
            let blocked = slept.elapsed();
            self.poll_window = if blocked < max {
                (self.poll_window * 2).clamp(POLL_MIN, max)
            } else {
                (self.poll_window / 2).max(POLL_MIN)
            };
        }
    }

    /// Busy-polls the thread's avail rings and its completion queue for `inner.poll` after the
    /// last sign of work, with guest notifications and the ring's eventfd off (the thread
    /// looks itself); then turns both back on, draining and reaping whatever raced in, before
    /// the thread sleeps in epoll.
    pub(crate) fn poll(
        &mut self,
        inner: &Inner,
        port: &ControlPort,
        vrings: &[Vring],
        first_queue: usize,
    ) {
        // Only started and enabled queues: a stopped one has no rings to look at or write
        // to, a disabled one is not served.
        let ready: u64 = vrings
            .iter()
            .enumerate()
            .filter(|(_, v)| {
                let v = v.get_ref();
                v.get_queue().ready() && v.is_enabled()
            })
            .fold(0, |m, (i, _)| m | 1 << i);
        for (local, vring) in vrings.iter().enumerate() {
            if ready & (1 << local) != 0 {
                let _ = vring.get_mut().disable_notification();
            }
        }
        self.engine.set_eventfd_enabled(false);
        let window = self.poll_window.clamp(POLL_MIN.min(inner.poll), inner.poll);
        let mut found_work = false;
        let mut idle_since = Instant::now();
        // Work found after spinning (not after a nap) measures the gap between batches.
        let mut napped = false;
        let naps = !inner.poll_nap.is_zero();
        // With requests at the storage the window is at least `poll_in_flight`: their
        // completions are sure to come (a slow disk's QD32 batch takes longer than the
        // adaptive window, and sleeping through it costs two wake-ups per batch).
        let in_flight_window = window.max(inner.poll_in_flight);
        while idle_since.elapsed()
            < if self.engine.in_flight() > 0 {
                in_flight_window
            } else {
                window
            }
            && !inner.stopping.load(Ordering::Relaxed)
            && inner.control_waiting.load(Ordering::Relaxed) == 0
            && !port.pending()
        {
            let mut busy = false;
            for (local, vring) in vrings.iter().enumerate() {
                let live = ready & !self.broken;
                if live & (1 << local) != 0 && self.engine.can_accept() && self.has_avail(vring) {
                    self.engine.tick();
                    self.drain(inner, vring, local, (first_queue + local) as u16, false);
                    self.nap.note_drain(self.drained);
                    busy = true;
                }
            }
            self.submit_and_reap();
            busy |= self.deliver(inner, vrings);
            if busy {
                found_work = true;
                let now = Instant::now();
                if naps && !napped {
                    self.nap.note_gap(now.duration_since(idle_since));
                }
                napped = false;
                idle_since = now;
                continue;
            }
            // Without napping the idle look is as before: one clock read (the loop's).
            if !naps {
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if now.duration_since(idle_since) >= NAP_SPIN {
                if let Some(len) = self.nap.length(inner.poll_nap, now) {
                    self.nap.sleep(len);
                    let took = now.elapsed();
                    self.nap.taken(len, took, inner.poll_nap, "iothread");
                    napped = true;
                    continue;
                }
            }
            std::hint::spin_loop();
        }
        // Completions from here on wake the thread: the eventfd is back on before the last
        // look at the CQ, and what it counted while the thread polled is stale.
        self.engine.set_eventfd_enabled(true);
        self.engine.clear_eventfd();
        for (local, vring) in vrings.iter().enumerate() {
            if ready & (1 << local) != 0 {
                self.drain(inner, vring, local, (first_queue + local) as u16, true);
            }
        }
        self.nap.reset_depth();
        self.submit_and_reap();
        self.deliver(inner, vrings);
        // Spinning pays only when work shows up while we spin (e.g. deep queues); at low
        // depth it burns a core for nothing, so the window shrinks.
        self.poll_window = if found_work {
            (window * 2).min(inner.poll)
        } else {
            (window / 2).max(POLL_MIN)
        };
        self.slept_at = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_micros(5);

    #[test]
    fn single_chain_drains_never_make_the_load_deep() {
        let mut nap = Nap::default();
        for _ in 0..3 * DEPTH_ROUND {
            nap.note_drain(1);
            nap.note_drain(0);
        }
        assert!(!nap.deep());
        assert_eq!(nap.length(BOUND, Instant::now()), None);
        nap.note_drain(2);
        assert!(nap.deep());
        // A round of single chains later the load is deep no more.
        for _ in 0..2 * DEPTH_ROUND {
            nap.note_drain(1);
        }
        assert!(!nap.deep());
    }

    #[test]
    fn a_nap_is_half_the_gap_between_batches_within_its_bounds() {
        let mut nap = Nap::default();
        nap.note_drain(4);
        nap.note_gap(Duration::from_micros(6));
        assert_eq!(
            nap.length(BOUND, Instant::now()),
            Some(Duration::from_micros(3))
        );
        for _ in 0..64 {
            nap.note_gap(Duration::from_micros(100));
        }
        assert_eq!(nap.length(BOUND, Instant::now()), Some(BOUND));
        for _ in 0..64 {
            nap.note_gap(Duration::from_nanos(100));
        }
        assert_eq!(nap.length(BOUND, Instant::now()), Some(NAP_MIN));
        assert_eq!(
            nap.length(Duration::ZERO, Instant::now()),
            None,
            "napping off"
        );
    }

    #[test]
    fn a_nap_that_overruns_its_bound_turns_napping_off_for_the_backoff() {
        let mut nap = Nap::default();
        nap.note_drain(4);
        let asked = Duration::from_micros(1);
        nap.taken(asked, asked + BOUND, BOUND, "test");
        assert_eq!(nap.overruns, 0, "within the bound");
        assert!(nap.length(BOUND, Instant::now()).is_some());
        nap.taken(asked, Duration::from_micros(30), BOUND, "test");
        assert_eq!((nap.naps, nap.overruns), (2, 1));
        let now = Instant::now();
        assert_eq!(nap.length(BOUND, now), None, "backed off");
        assert!(
            nap.length(BOUND, now + NAP_BACKOFF).is_some(),
            "and on again"
        );
    }
}
