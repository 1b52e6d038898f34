//! One frontend's vhost-user session: the protocol state (owner, acked features and protocol
//! features, the memory table, the vrings) and the answer to every request, as the `vhost`
//! crate's `BackendReqHandler` hands them over (it reads and checks the wire format and sends
//! the replies). What is about the device (features offered, config space, memory for the
//! iothreads, waiting for a stopped queue) is asked of [`VhostUserBlk`] through the
//! `VhostUserBackend` trait (vhost_user.rs); which queue's kick fd each iothread watches is
//! set here on its [`EventLoop`].
//!
//! A request that is refused gets an error: the vhost crate turns it into a REPLY_ACK with a
//! non-zero value when the frontend asked for one, and the refusal is kept
//! ([`Session::take_refusal`]) for the connection loop to log and go on (serve.rs).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_inflight::{InflightError, InflightRegion};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use crate::event_loop::{EventLoop, RunningLoop};
use crate::inflight::QueueInflight;
use crate::mem_table::{MemoryError, MemoryTable, MAX_MEM_SLOTS};
use crate::{GuestMem, Mem, VhostUserBlk, Vring};

#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("queue {index} does not exist (the device has {queues})")]
    NoSuchQueue { index: u32, queues: u16 },
    #[error("queue {index}: size {num} is not a power of two between 1 and {max}")]
    QueueSize { index: u32, num: u32, max: u16 },
    #[error("queue {index}: base {base} is not a split ring index")]
    Base { index: u32, base: u32 },
    #[error("queue {index}: the {ring} at frontend address {addr:#x} is in no memory region")]
    RingOutsideMemory {
        index: u32,
        ring: &'static str,
        addr: u64,
    },
    #[error("queue {index}: ring addresses refused: {why}")]
    RingAddress { index: u32, why: String },
    #[error("queue {index}: ring addresses before any memory table")]
    NoMemoryTable { index: u32 },
    #[error("features {0:#x} were not offered")]
    FeaturesNotOffered(u64),
    #[error("protocol features {0:#x} were not offered")]
    ProtocolFeaturesNotOffered(u64),
    #[error("the device already has an owner")]
    AlreadyOwned,
    #[error("{0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Device(io::Error),
    #[error("queue {index}: cannot watch its kick fd: {source}")]
    Watch { index: usize, source: io::Error },
    #[error("inflight region: {0}")]
    Inflight(#[from] InflightError),
    #[error("not supported by this device")]
    Unsupported,
}

/// A request the session refused, for the connection loop's log line.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) request: &'static str,
    pub(crate) why: SessionError,
}

pub(crate) struct Session {
    device: VhostUserBlk,
    /// Per iothread: its event loop (to watch kick fds) and, until the connection ends, its
    /// thread.
    loops: Vec<Arc<EventLoop>>,
    running: Vec<RunningLoop>,
    /// Per queue, in global order.
    vrings: Vec<Vring>,
    /// Guest memory as the vrings and the iothreads see it (one per connection).
    memory: GuestMem,
    table: MemoryTable,
    owned: bool,
    /// GET_FEATURES was answered: the vhost crate sends REPLY_ACKs only from then on.
    features_read: bool,
    acked_features: Option<u64>,
    acked_protocol: VhostUserProtocolFeatures,
    refusal: Option<Refusal>,
    /// The inflight region (INFLIGHT_SHMFD), once the frontend asked for one or handed one
    /// back.
    inflight: Option<Arc<InflightRegion>>,
    /// It was handed back without being asked for here: it comes from an earlier server.
    inflight_handed_back: bool,
    /// Per queue: its part of the region is with its iothread (from start to stop).
    inflight_started: Vec<bool>,
}

impl Session {
    /// A session for a new connection: fresh vrings, and one event loop per iothread,
    /// running (they answer control messages from now on).
    pub(crate) fn start(device: &VhostUserBlk) -> io::Result<Session> {
        let inner = &device.0;
        let memory = GuestMemoryAtomic::new(Mem::new());
        let mut vrings = Vec::with_capacity(inner.device.num_queues as usize);
        for _ in 0..inner.device.num_queues {
            let vring = Vring::new(memory.clone(), inner.queue_size)
                .map_err(|e| io::Error::other(format!("cannot set up a vring: {e}")))?;
            vrings.push(vring);
        }
        let mut running: Vec<RunningLoop> = Vec::with_capacity(inner.masks.len());
        for (t, mask) in inner.masks.iter().enumerate() {
            let mine = (0..vrings.len())
                .filter(|q| mask & (1 << q) != 0)
                .map(|q| vrings[q].clone())
                .collect();
            match RunningLoop::spawn(device, t, mine) {
                Ok(l) => running.push(l),
                Err(e) => {
                    running.into_iter().for_each(RunningLoop::stop);
                    return Err(e);
                }
            }
        }
        device.loops_started();
        Ok(Session {
            device: device.clone(),
            loops: running.iter().map(|l| l.handle.clone()).collect(),
            running,
            vrings,
            memory,
            table: MemoryTable::default(),
            owned: false,
            features_read: false,
            acked_features: None,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            refusal: None,
            inflight: None,
            inflight_handed_back: false,
            inflight_started: vec![false; inner.device.num_queues as usize],
        })
    }

    /// Stops the connection's event loops (after its in-flight I/O was waited for).
    pub(crate) fn stop_loops(&mut self) {
        for q in 0..self.vrings.len() {
            self.unwatch(q);
            // What is still marked stays so in the region, for the next server or connection.
            self.take_back_inflight(q);
        }
        self.running.drain(..).for_each(RunningLoop::stop);
    }

    /// The last request's refusal, if it was refused.
    pub(crate) fn take_refusal(&mut self) -> Option<Refusal> {
        self.refusal.take()
    }

    /// Whether the frontend gets a REPLY_ACK when it asks for one (the vhost crate's rule:
    /// PROTOCOL_FEATURES offered in a GET_FEATURES answer, REPLY_ACK acked).
    pub(crate) fn reply_ack(&self) -> bool {
        self.features_read
            && self
                .acked_protocol
                .contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    /// Turns a refusal into the vhost crate's error (its REPLY_ACK says failure), kept for
    /// the connection loop.
    fn answer<T>(
        &mut self,
        request: &'static str,
        result: Result<T, SessionError>,
    ) -> VhostUserResult<T> {
        result.map_err(|why| {
            let e = VhostUserError::ReqHandlerError(io::Error::other(why.to_string()));
            self.refusal = Some(Refusal { request, why });
            e
        })
    }

    fn queue(&self, index: u32) -> Result<usize, SessionError> {
        let queues = self.device.0.device.num_queues;
        if index < u32::from(queues) {
            Ok(index as usize)
        } else {
            Err(SessionError::NoSuchQueue { index, queues })
        }
    }

    /// Watches queue `q`'s kick fd if the queue is started and enabled, else stops watching.
    fn update_watch(&mut self, q: usize) -> Result<(), SessionError> {
        let (thread, local) = self.device.0.placement[q];
        let (fd, live) = {
            let v = self.vrings[q].get_ref();
            let Some(kick) = v.get_kick() else {
                return Ok(());
            };
            (kick.as_raw_fd(), v.get_queue().ready() && v.is_enabled())
        };
        if live {
            self.device.control(thread).started |= 1 << local;
            self.loops[thread]
                .watch_queue(local, fd)
                .map_err(|source| SessionError::Watch { index: q, source })
        } else {
            self.loops[thread].unwatch_queue(fd);
            Ok(())
        }
    }

    /// A queue about to start (its ring made ready or enabled): with an inflight region, its
    /// part goes to its iothread first, so that nothing is popped untracked; the queue's
    /// first drain recovers from it.
    fn start_inflight(&mut self, q: usize) {
        let Some(region) = &self.inflight else {
            return;
        };
        if self.inflight_started[q] {
            return;
        }
        self.inflight_started[q] = true;
        let Some(part) = region.queue(q as u16) else {
            log::warn!(
                "queue {q}: the inflight region has {} queues: its requests are not tracked \
                 for a restart",
                region.num_queues()
            );
            return;
        };
        let (thread, local) = self.device.0.placement[q];
        self.device.control(thread).inflight[local] =
            Some(QueueInflight::new(part, self.inflight_handed_back));
    }

    /// A stopped queue: its iothread gives its part of the region back (nothing of the
    /// queue is in flight any more, or the connection is over).
    fn take_back_inflight(&mut self, q: usize) {
        if std::mem::take(&mut self.inflight_started[q]) {
            let (thread, local) = self.device.0.placement[q];
            self.device.control(thread).inflight[local] = None;
        }
    }

    fn get_inflight_fd_(
        &mut self,
        asked: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File), SessionError> {
        let (region, file) = InflightRegion::create(asked.num_queues, asked.queue_size)?;
        let size = vhost_inflight::region_size(asked.num_queues, asked.queue_size);
        self.replace_inflight(region);
        self.inflight_handed_back = false;
        Ok((
            VhostUserInflight::new(size, 0, asked.num_queues, asked.queue_size),
            file,
        ))
    }

    fn set_inflight_fd_(
        &mut self,
        given: &VhostUserInflight,
        file: File,
    ) -> Result<(), SessionError> {
        let region = InflightRegion::map(
            &file,
            given.mmap_offset,
            given.mmap_size,
            given.num_queues,
            given.queue_size,
        )?;
        // QEMU hands back the region it just got (first start) or the one it kept while the
        // server was away (a reconnect).
        if self.inflight.is_none() {
            self.inflight_handed_back = true;
            log::info!(
                "the frontend handed back the in-flight region of an earlier server ({} \
                 queues of {}): its requests are resubmitted as the queues start",
                given.num_queues,
                given.queue_size
            );
        }
        self.replace_inflight(region);
        Ok(())
    }

    /// A new region: queues not running that still hold a part of the old one give it back,
    /// and take one of the new region when they start. A frontend sends a region only while
    /// the device is stopped, but a queue it enabled and never started (QEMU enables every
    /// queue, the firmware kicks only the first) gets no GET_VRING_BASE: it would otherwise
    /// go on marking its requests in a region the frontend has thrown away, and a crash
    /// would lose them. A running queue keeps its part: recovering it again mid-run would
    /// move its avail index back under requests in flight.
    fn replace_inflight(&mut self, region: Arc<InflightRegion>) {
        for q in 0..self.vrings.len() {
            if !self.vrings[q].get_ref().get_queue().ready() {
                self.take_back_inflight(q);
            }
        }
        self.inflight = Some(region);
    }

    fn unwatch(&self, q: usize) {
        let (thread, _) = self.device.0.placement[q];
        if let Some(kick) = self.vrings[q].get_ref().get_kick() {
            self.loops[thread].unwatch_queue(kick.as_raw_fd());
        }
    }

    /// The new guest memory, to the vrings and the iothreads.
    fn install_memory(&mut self, mem: Mem) -> Result<(), SessionError> {
        match self.memory.lock() {
            Ok(guard) => guard.replace(mem),
            Err(poisoned) => poisoned.into_inner().replace(mem),
        }
        self.device
            .update_memory(self.memory.clone())
            .map_err(SessionError::Device)
    }

    fn set_features_(&mut self, features: u64) -> Result<(), SessionError> {
        let unknown = features & !self.device.features();
        if unknown != 0 {
            return Err(SessionError::FeaturesNotOffered(unknown));
        }
        self.acked_features = Some(features);
        // Without PROTOCOL_FEATURES every ring is enabled at once; with it, rings wait for
        // SET_VRING_ENABLE (vhost-user "Ring states").
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for q in 0..self.vrings.len() {
                self.start_inflight(q);
                self.vrings[q].set_enabled(true);
                self.update_watch(q)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.device.set_event_idx(event_idx);
        self.device.acked_features(features);
        Ok(())
    }

    fn set_protocol_features_(&mut self, features: u64) -> Result<(), SessionError> {
        // REPLY_ACK is the vhost crate's to offer (it adds it to ours).
        let offered = self.device.protocol_features() | VhostUserProtocolFeatures::REPLY_ACK;
        self.acked_protocol = VhostUserProtocolFeatures::from_bits_truncate(features) & offered;
        let unknown = features & !offered.bits();
        if unknown != 0 {
            return Err(SessionError::ProtocolFeaturesNotOffered(unknown));
        }
        Ok(())
    }

    fn set_vring_num_(&mut self, index: u32, num: u32) -> Result<(), SessionError> {
        let q = self.queue(index)?;
        let max = self.device.0.queue_size;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(SessionError::QueueSize { index, num, max });
        }
        self.vrings[q].set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr_(
        &mut self,
        index: u32,
        descriptor: u64,
        used: u64,
        available: u64,
    ) -> Result<(), SessionError> {
        let q = self.queue(index)?;
        if self.table.is_empty() {
            return Err(SessionError::NoMemoryTable { index });
        }
        let to_guest = |ring: &'static str, addr: u64| {
            self.table
                .to_guest(addr)
                .ok_or(SessionError::RingOutsideMemory { index, ring, addr })
        };
        let (desc, avail, used) = (
            to_guest("descriptor table", descriptor)?,
            to_guest("avail ring", available)?,
            to_guest("used ring", used)?,
        );
        let vring = &self.vrings[q];
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|e| SessionError::RingAddress {
                index,
                why: e.to_string(),
            })?;
        // The used index the guest sees is where completions go on: after a driver restart
        // it is 0, after a reconnect it is where the last server stopped.
        let used_idx = vring
            .queue_used_idx()
            .map_err(|e| SessionError::RingAddress {
                index,
                why: format!("cannot read the used index: {e}"),
            })?;
        vring.set_queue_next_used(used_idx);
        Ok(())
    }

    fn set_vring_base_(&mut self, index: u32, base: u32) -> Result<(), SessionError> {
        let q = self.queue(index)?;
        let base = u16::try_from(base).map_err(|_| SessionError::Base { index, base })?;
        self.vrings[q].set_queue_next_avail(base);
        Ok(())
    }

    fn get_vring_base_(&mut self, index: u32) -> Result<VhostUserVringState, SessionError> {
        let q = self.queue(index)?;
        let vring = &self.vrings[q];
        // Stopped: no more kicks are served, then its in-flight requests are waited for so
        // that the base answered is true.
        vring.set_queue_ready(false);
        self.update_watch(q)?;
        self.device
            .stop_vring(index)
            .map_err(SessionError::Device)?;
        let next_avail = self.vrings[q].queue_next_avail();
        self.take_back_inflight(q);
        self.unwatch(q);
        let vring = &self.vrings[q];
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick_(&mut self, index: u8, file: Option<File>) -> Result<(), SessionError> {
        let q = self.queue(u32::from(index))?;
        // The old fd leaves the epoll set while it is still open.
        self.unwatch(q);
        if file.is_none() {
            log::warn!(
                "queue {q}: the frontend set no kick fd (polling mode is not supported): the \
                 queue is served only while the iothread polls"
            );
        }
        let vring = &self.vrings[q];
        let has_kick = file.is_some();
        vring.set_kick(file);
        // A kick fd starts the ring (vhost-user "Ring states").
        if has_kick && !vring.get_ref().get_queue().ready() {
            self.start_inflight(q);
            self.vrings[q].set_queue_ready(true);
        }
        self.update_watch(q)
    }

    fn set_vring_enable_(&mut self, index: u32, enable: bool) -> Result<(), SessionError> {
        let q = self.queue(index)?;
        if enable {
            self.start_inflight(q);
        }
        self.vrings[q].set_enabled(enable);
        self.update_watch(q)
    }

    fn reset_device_(&mut self) -> Result<(), SessionError> {
        for q in 0..self.vrings.len() {
            let vring = &self.vrings[q];
            vring.set_queue_ready(false);
            self.unwatch(q);
            if let Err(e) = self.device.stop_vring(q as u32) {
                log::error!("RESET_DEVICE: queue {q}: {e}");
            }
            self.take_back_inflight(q);
            let vring = &self.vrings[q];
            let mut v = vring.get_mut();
            v.get_queue_mut().reset();
            v.set_enabled(false);
            drop(v);
            vring.set_kick(None);
            vring.set_call(None);
            vring.set_err(None);
        }
        self.acked_features = None;
        self.device.reset_device();
        Ok(())
    }

    fn set_mem_table_(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), SessionError> {
        let mem = self.table.replace(regions, files)?;
        self.install_memory(mem)
    }

    fn add_mem_region_(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
    ) -> Result<(), SessionError> {
        let current = self.memory.memory();
        let mem = self.table.add(&current, region, file)?;
        drop(current);
        self.install_memory(mem)
    }

    fn remove_mem_region_(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
    ) -> Result<(), SessionError> {
        let current = self.memory.memory();
        let mem = self.table.remove(&current, region)?;
        drop(current);
        self.install_memory(mem)
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        let r = if self.owned {
            Err(SessionError::AlreadyOwned)
        } else {
            self.owned = true;
            Ok(())
        };
        self.answer("SET_OWNER", r)
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        // Deprecated; the spec recommends disabling every ring and keeping the rest (dropping
        // the negotiated state here is known to break frontends).
        self.owned = false;
        let mut r = Ok(());
        for q in 0..self.vrings.len() {
            self.vrings[q].set_enabled(false);
            r = r.and(self.update_watch(q));
        }
        self.answer("RESET_OWNER", r)
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        let r = self.reset_device_();
        self.answer("RESET_DEVICE", r)
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        self.features_read = true;
        Ok(self.device.features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        let r = self.set_features_(features);
        self.answer("SET_FEATURES", r)
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let r = self.set_mem_table_(ctx, files).map(|()| None);
        self.answer("SET_MEM_TABLE", r)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        let r = self.set_vring_num_(index, num);
        self.answer("SET_VRING_NUM", r)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostUserResult<()> {
        let r = self.set_vring_addr_(index, descriptor, used, available);
        self.answer("SET_VRING_ADDR", r)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        let r = self.set_vring_base_(index, base);
        self.answer("SET_VRING_BASE", r)
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        let r = self.get_vring_base_(index);
        self.answer("GET_VRING_BASE", r)
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let r = self.set_vring_kick_(index, fd);
        self.answer("SET_VRING_KICK", r)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let r = self
            .queue(u32::from(index))
            .map(|q| self.vrings[q].set_call(fd));
        self.answer("SET_VRING_CALL", r)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let r = self
            .queue(u32::from(index))
            .map(|q| self.vrings[q].set_err(fd));
        self.answer("SET_VRING_ERR", r)
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(self.device.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        let r = self.set_protocol_features_(features);
        self.answer("SET_PROTOCOL_FEATURES", r)
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.device.num_queues() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        let r = self.set_vring_enable_(index, enable);
        self.answer("SET_VRING_ENABLE", r)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        Ok(self.device.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        let r = self
            .device
            .set_config(offset, buf)
            .map_err(SessionError::Device);
        self.answer("SET_CONFIG", r)
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        if self
            .acked_protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
        {
            backend.set_reply_ack_flag(true);
        }
        self.device.set_backend_req_fd(backend);
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        self.answer("GPU_SET_SOCKET", Err(SessionError::Unsupported))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        self.answer("GET_SHARED_OBJECT", Err(SessionError::Unsupported))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        let r = self.get_inflight_fd_(inflight);
        self.answer("GET_INFLIGHT_FD", r)
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        let r = self.set_inflight_fd_(inflight, file);
        self.answer("SET_INFLIGHT_FD", r)
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<VhostUserMemoryRegionBase>> {
        let r = self.add_mem_region_(region, fd).map(|()| None);
        self.answer("ADD_MEM_REG", r)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        let r = self.remove_mem_region_(region);
        self.answer("REM_MEM_REG", r)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostUserResult<Option<File>> {
        self.answer("SET_DEVICE_STATE_FD", Err(SessionError::Unsupported))
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        self.answer("CHECK_DEVICE_STATE", Err(SessionError::Unsupported))
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        self.answer("GET_SHMEM_CONFIG", Err(SessionError::Unsupported))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostUserResult<()> {
        self.answer("SET_LOG_BASE", Err(SessionError::Unsupported))
    }
}
