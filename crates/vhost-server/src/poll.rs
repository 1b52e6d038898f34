//! Busy-polling: after a batch, the iothread keeps looking at its avail rings and its
//! completion queue for an adaptive window before it sleeps in epoll.

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
        while idle_since.elapsed() < window
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
                    busy = true;
                }
            }
            self.submit_and_reap();
            busy |= self.deliver(inner, vrings);
            if busy {
                found_work = true;
                idle_since = Instant::now();
            } else {
                std::hint::spin_loop();
            }
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
