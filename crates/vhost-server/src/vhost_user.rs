//! The device's side of the protocol, as vhost-user-backend's `VhostUserBackend` trait (kept as
//! the interface between our session and the device; the library's daemon is not used):
//! what the session (session.rs) asks (features, config space, memory table, stop) and the
//! event dispatch of the iothreads' loops (`handle_event`, event_loop.rs).

use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blk_proto::parse_config_write;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;

use crate::control::{ControlError, ControlMsg};
use crate::device::{completion_event, control_event, VhostUserBlk, MEMORY_TIMEOUT};

/// How long GET_VRING_BASE waits for the queue's in-flight requests.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
use crate::guest_memory::host_regions;
use crate::{GuestMem, Vring};

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.0.device.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.0.queue_size as usize
    }

    fn features(&self) -> u64 {
        self.0.device.virtio_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // The channel for config change messages (resize).
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        // The vrings apply it themselves; this is only worth a log line.
        log::debug!("EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn acked_features(&self, features: u64) {
        self.0.cache.features_acked(features);
        self.0.frontend.features_acked(features);
    }

    fn reset_device(&self) {
        // RESET_DEVICE: the next driver starts from the configured cache mode.
        self.0.cache.reset();
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The capacity in force, which a resize changes; the rest is as configured.
        let mut device = self.0.device.clone();
        device.capacity_sectors = self.0.capacity_sectors.load(Ordering::Acquire);
        device.read_config(self.0.cache.writeback(), offset, size)
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        // The library has set its REPLY_ACK flag if the frontend negotiated REPLY_ACK.
        log::debug!("frontend gave a backend-request channel");
        self.0.backend_req.keep(backend);
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match parse_config_write(offset, buf) {
            Some(wb) if self.0.cache.guest_write(wb) => log::info!(
                "guest switched the write cache {}",
                if wb { "on" } else { "off" }
            ),
            Some(wb) => log::warn!(
                "guest asked for the write cache {}: refused, the driver did not negotiate \
                 what it takes (FLUSH and CONFIG_WCE)",
                if wb { "on" } else { "off" }
            ),
            None => log::warn!("ignored config write at {offset} of {} bytes", buf.len()),
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        for i in 0..self.0.threads.len() {
            let m = mem.clone();
            match self.ask(i, |r| ControlMsg::SetMemory(m, r), MEMORY_TIMEOUT) {
                Some(Ok(())) => continue,
                // A stuck iothread may hold its lock: fail the update (the frontend hears of
                // it) instead of hanging the protocol thread on that lock.
                Some(Err(e @ ControlError::NoAnswer(..))) => {
                    log::error!("memory table update: {e}");
                    return Err(io::Error::new(io::ErrorKind::TimedOut, e.to_string()));
                }
                Some(Err(e)) => log::warn!("memory table update: {e}; done in place"),
                None => {}
            }
            let mut t = self.control(i);
            // Registered by the iothread at its next event (its ring, its thread).
            t.engine.set_guest_memory(&host_regions(&mem));
            t.mem = Some(mem.clone());
            t.connection_over = false;
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.0.masks.clone()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend reads next_avail after this returns, so every request
        // of the queue must be completed and on the used ring first.
        let Some(&(t, local)) = self.0.placement.get(queue_index as usize) else {
            return Ok(());
        };
        // A restarted queue starts from a fresh avail index.
        self.control(t).broken &= !(1 << local);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let in_flight = self.control(t).engine.in_flight_on(queue_index as u16);
            if in_flight == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                // The frontend must not restart the ring from a base that requests still in
                // flight will overtake: fail GET_VRING_BASE (its reply has no error form,
                // so the connection ends: serve.rs) rather than answer a base that is not true.
                log::error!(
                    "queue {queue_index}: {in_flight} requests still in flight after \
                     {STOP_TIMEOUT:?} at GET_VRING_BASE: failing it"
                );
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("queue {queue_index}: {in_flight} requests still in flight"),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Every error is handled here, survived or made loud: an Err would end the event
        // loop (event_loop.rs), and with it the connection.
        let inner = &*self.0;
        if thread_id >= inner.threads.len() {
            self.end_connection(&format!(
                "event {device_event} for iothread {thread_id}, which does not exist"
            ));
            return Ok(());
        }
        self.pin_current_thread(thread_id);
        let mut t = self.thread(thread_id);
        t.wakeups += 1;
        let n = inner.device.num_queues as usize;
        // The ring belongs to the thread that submits to it: a new connection's iothread
        // sets up its own.
        if t.failed.is_none() {
            match t.engine.adopt_current_thread() {
                Ok(false) => {}
                Ok(true) => log::info!(
                    "iothread {thread_id}: io_uring ring set up ({})",
                    t.engine.ring_mode().name()
                ),
                Err(e) => {
                    // Its queues would never be served: the guest would wait forever.
                    let why = format!("iothread {thread_id} cannot set up its io_uring ring: {e}");
                    t.failed = Some(why.clone());
                    drop(t);
                    self.end_connection(&why);
                    t = self.thread(thread_id);
                }
            }
        }
        if t.failed.is_some() {
            // Control messages (quiesce) still get their answer; queues wait for the end.
            if device_event == control_event(n) {
                t.serve_control(&inner.ports[thread_id], thread_id, None);
            }
            return Ok(());
        }
        t.engine.sync_fixed_buffers();
        let slept_at = t.slept_at.take();
        let stopping = inner.stopping.load(Ordering::Relaxed);
        // Queues of a thread are contiguous (see queue_masks): local i is first_queue + i.
        let first_queue = inner.masks[thread_id].trailing_zeros() as usize;
        let local = device_event as usize;
        let mut work = false;
        if local < vrings.len() {
            if !stopping {
                t.engine.tick();
                t.drain_queue(inner, &vrings[local], local, (first_queue + local) as u16);
                work = true;
            }
        } else if device_event == completion_event(n) {
            t.engine.clear_eventfd();
        } else if device_event == control_event(n) {
            let finish = stopping.then_some((inner, vrings));
            t.serve_control(&inner.ports[thread_id], thread_id, finish);
        } else {
            log::warn!("iothread {thread_id}: unexpected event {device_event}");
        }
        loop {
            t.submit_and_reap();
            work |= t.deliver(inner, vrings);
            // Chains left behind for want of a free request: take them now that some are free.
            if t.throttled == 0 || stopping || !t.engine.can_accept() {
                break;
            }
            let throttled = t.throttled;
            for (local, vring) in vrings.iter().enumerate() {
                if throttled & (1 << local) != 0 {
                    t.drain_queue(inner, vring, local, (first_queue + local) as u16);
                }
            }
        }
        if !inner.poll.is_zero() && !stopping {
            if work {
                t.adapt_poll_window(slept_at, inner.poll);
            }
            t.poll(inner, &inner.ports[thread_id], vrings, first_queue);
        }
        Ok(())
    }
}
