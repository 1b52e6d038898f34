//! The Ceph RBD backend: an [`ExternalStorage`] whose ops go to librbd's asynchronous API
//! (rbd_aio_readv / rbd_aio_writev / rbd_aio_flush / rbd_aio_discard / rbd_aio_write_zeroes).
//!
//! - No copy: reads and writes hand librbd the op's iovecs, which point into guest memory, as
//!   the ring's READV/WRITEV do; the engine keeps them valid until the op's result is reaped.
//! - Completions: librbd calls back on one of its threads; the callback releases the aio
//!   completion and reports (key, result) to the completion queue of the engine that started
//!   the op, a per-iothread lock-free queue that wakes that iothread through its eventfd
//!   (engine::storage::external). Nothing is shared between iothreads but the image handle,
//!   which librbd makes thread-safe.
//! - Merging and batching are the engine's, as for files.
//! - Errors: a negative result is the op's (IOERR to the guest; -EAGAIN is retried by the
//!   engine). A client the cluster blocklisted (or that lost its session) logs that once and
//!   goes on answering every request (with IOERR). An OSD that stops makes librbd wait and
//!   resend: the ops stay in flight and complete when it is back.
//! - Durability: the RBD cache is off (rbd_cache=false, unless `--ceph-option` turns it on),
//!   so an op librbd acknowledged is on the OSDs; a flush is still sent to librbd (it orders
//!   against in-flight writes).
//! - librbd's threads: see [`librbd_defaults`].
//! - Size: rbd_resize grows the image; the image's size now (after `rbd resize` by someone
//!   else, seen through [`RbdStorage::watch_updates`]) is [`ExternalStorage::current_size`].

use std::ffi::c_void;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::storage::{CompletionQueue, ExternalStorage, IoKind, IoOp};
use rbd::{Cluster, Completion, ConnectOptions, Image, ImageSpec, IoCtx, RbdError, UpdateWatch};

pub use rbd::ImageSpec as RbdImageSpec;

/// What `--rbd`, `--ceph-*` ask for.
#[derive(Clone, Debug)]
pub struct RbdOptions {
    pub spec: ImageSpec,
    pub conf: std::path::PathBuf,
    pub id: String,
    pub keyring: Option<std::path::PathBuf>,
    /// Sizes librados's completion pool ([`librbd_defaults`]).
    pub iothreads: usize,
    /// `--ceph-option`s, set after the backend's own defaults (they win).
    pub extra_options: Vec<(String, String)>,
    /// Bounds connecting and finding the pool.
    pub connect_timeout: Duration,
    /// Open the image read-only (a snapshot always is).
    pub read_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RbdBackendError {
    #[error(transparent)]
    Rbd(#[from] RbdError),
    #[error("the image {spec} has size 0")]
    Empty { spec: String },
}

/// An open RBD image, shared by every iothread.
#[derive(Debug)]
pub struct RbdStorage {
    image: Arc<Image>,
    /// This storage's own pool context and connection (no other image uses them), so that
    /// [`RbdStorage::close`] can end them on the thread that exits.
    ioctx: Arc<IoCtx>,
    cluster: Arc<Cluster>,
    spec: ImageSpec,
    watch: Mutex<Option<UpdateWatch>>,
    /// Set by [`RbdStorage::close`]: ops are refused from then on.
    closed: AtomicBool,
}

/// The librbd/librados settings uringblk runs with unless `--ceph-option` says otherwise.
///
/// - `rbd_cache=false`: an op librbd acknowledged is on the OSDs (see the module docs).
/// - `rbd_non_blocking_aio=false`: librbd dispatches an op in the iothread that calls
///   rbd_aio_*, instead of posting it to its own thread pool first. That hand-off cost a
///   thread wake-up per request. The dispatch layers that wait (exclusive-lock acquisition,
///   image refresh, QoS) still defer the op asynchronously; only librados's in-flight throttle
///   (objecter_inflight_ops / _op_bytes, far above a virtio queue's depth) can hold the
///   iothread, and then as back-pressure.
/// - `librados_thread_count` = the number of iothreads (librados's default is 2): the pool
///   that runs completion callbacks. Ours only push onto a lock-free queue, so one thread per
///   iothread keeps up, and fewer threads batch more completions per wake-up.
///
/// Measured with bench/levers.py --rbd (bench/README.md, "Ceph RBD"): about 40 % fewer
/// server wake-ups and 10 % less server CPU per request than librbd's defaults.
pub fn librbd_defaults(iothreads: usize) -> Vec<(String, String)> {
    vec![
        ("rbd_cache".into(), "false".into()),
        ("rbd_non_blocking_aio".into(), "false".into()),
        ("librados_thread_count".into(), iothreads.max(1).to_string()),
    ]
}

impl RbdStorage {
    /// Connects, opens the pool and the image (a snapshot read-only). Every failure is one
    /// line: unreachable cluster (after `connect_timeout`), missing pool, image or snapshot,
    /// missing permission.
    pub fn open(opts: &RbdOptions) -> Result<Arc<RbdStorage>, RbdBackendError> {
        let cluster = Cluster::connect(&ConnectOptions {
            conf: opts.conf.clone(),
            id: opts.id.clone(),
            keyring: opts.keyring.clone(),
            timeout: opts.connect_timeout,
            options: librbd_defaults(opts.iothreads)
                .into_iter()
                .chain(opts.extra_options.iter().cloned())
                .collect(),
        })?;
        let ioctx = IoCtx::open(&cluster, &opts.spec.pool)?;
        let image = Image::open(
            &ioctx,
            &opts.spec.pool,
            &opts.spec.image,
            opts.spec.snap.as_deref(),
            opts.read_only,
        )?;
        let storage = RbdStorage {
            image,
            ioctx,
            cluster,
            spec: opts.spec.clone(),
            watch: Mutex::new(None),
            closed: AtomicBool::new(false),
        };
        if storage.size()? == 0 {
            return Err(RbdBackendError::Empty {
                spec: opts.spec.to_string(),
            });
        }
        Ok(Arc::new(storage))
    }

    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }

    pub fn is_read_only(&self) -> bool {
        self.image.is_read_only()
    }

    /// The image's size in bytes now.
    pub fn size(&self) -> Result<u64, RbdError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(RbdError::Call {
                call: "rbd_get_size",
                errno: libc::ESHUTDOWN,
            });
        }
        self.image.size()
    }

    /// Calls `on_update` (on a librbd thread: it must be quick) whenever the image's header
    /// changes, e.g. someone ran `rbd resize`. Kept until [`RbdStorage::unwatch`] or
    /// [`RbdStorage::close`]; dropping the callback then is the watcher's cue to end.
    pub fn watch_updates(&self, on_update: Box<dyn Fn() + Send + Sync>) -> Result<(), RbdError> {
        let watch = self.image.update_watch(on_update)?;
        *self.watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(watch);
        Ok(())
    }

    /// Unregisters the header watch (waiting for a running callback) and drops its callback.
    pub fn unwatch(&self) {
        drop(self.watch.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

impl RbdStorage {
    /// At exit, once the device stopped taking requests and nothing is in flight: unwatches
    /// and closes the image, which releases its exclusive lock (a restarted server, or anyone
    /// else, can write at once), then ends the pool context and the cluster connection, which
    /// joins librados's threads before the process runs its exit handlers. Ops started later
    /// fail with EIO.
    ///
    /// # Safety
    /// No op is in flight and none is being started: the device's begin_stop and a
    /// successful quiesce came first (an op that still arrives sees `closed` and is refused),
    /// and no thread is inside [`RbdStorage::size`] (a header watcher was joined after
    /// [`RbdStorage::unwatch`]).
    pub unsafe fn close(&self) -> Result<(), RbdError> {
        self.closed.store(true, Ordering::SeqCst);
        self.unwatch();
        // SAFETY: the caller promises no I/O or other call runs or starts; the watch is gone;
        // `closed` keeps size/resize/flush from this backend away too.
        let closed = unsafe { self.image.close() };
        // SAFETY: the image, the only one opened on this context, is closed (librbd frees
        // the handle even when rbd_close reports an error), and nothing else uses either.
        unsafe {
            self.ioctx.destroy();
            self.cluster.shutdown();
        }
        closed
    }
}

/// What the callback needs of an op: where to report it, and how.
struct Pending {
    key: u64,
    /// Reads and writes report the bytes asked (librbd transfers all or fails).
    bytes: i32,
    done: Arc<CompletionQueue>,
}

/// The client lost its session or was blocklisted (Ceph reports EBLOCKLISTED = ESHUTDOWN):
/// said once per process.
static DISCONNECT_LOGGED: AtomicBool = AtomicBool::new(false);
/// Other librbd errors, logged for the first few and then every 1000th.
static ERRORS: AtomicU64 = AtomicU64::new(0);

fn log_failure(errno: i32) {
    if errno == libc::ESHUTDOWN || errno == libc::ENOTCONN {
        if !DISCONNECT_LOGGED.swap(true, Ordering::Relaxed) {
            log::error!(
                "rbd: the Ceph client is disconnected or blocklisted ({}): requests fail with \
                 IOERR until it is restarted",
                rbd::errno_text(errno)
            );
        }
        return;
    }
    let n = ERRORS.fetch_add(1, Ordering::Relaxed);
    if n < 10 || n.is_multiple_of(1000) {
        log::warn!(
            "rbd: an op failed: {} ({} so far)",
            rbd::errno_text(errno),
            n + 1
        );
    }
}

/// librbd's completion callback (on a librbd thread).
unsafe extern "C" fn on_complete(c: rbd::ffi::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `c` is the completion this callback is for, finished once (here).
    let ret = unsafe { Completion::finish(c) };
    // SAFETY: `arg` is the Box<Pending> leaked in `start` for this completion alone; librbd
    // calls the callback once, so it is reclaimed once.
    let pending = unsafe { Box::from_raw(arg.cast::<Pending>()) };
    let result = if ret < 0 {
        let errno = i32::try_from(-ret).unwrap_or(libc::EIO);
        log_failure(errno);
        -errno
    } else {
        pending.bytes
    };
    pending.done.complete(pending.key, result);
}

impl ExternalStorage for RbdStorage {
    fn start(&self, op: &IoOp<'_>, done: &Arc<CompletionQueue>) -> Result<(), i32> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(libc::EIO);
        }
        let bytes = match op.kind {
            IoKind::Read | IoKind::Write => i32::try_from(op.len).map_err(|_| libc::EINVAL)?,
            _ => 0,
        };
        let arg = Box::into_raw(Box::new(Pending {
            key: op.key,
            bytes,
            done: done.clone(),
        }));
        // SAFETY: `arg` is the live Box<Pending> that `on_complete` takes back, exactly once,
        // when librbd calls it; if the op does not start it is freed below instead.
        let c = match unsafe { Completion::new(arg.cast(), on_complete) } {
            Ok(c) => c,
            Err(errno) => {
                // SAFETY: no completion holds `arg`: it is still ours alone.
                drop(unsafe { Box::from_raw(arg) });
                return Err(errno);
            }
        };
        let aio = self.image.aio();
        let started = match op.kind {
            // SAFETY: the engine keeps the op's iovecs (guest memory or its bounce buffers)
            // valid and untouched until it reaps the op's result, which our callback reports
            // only after librbd is done with them.
            IoKind::Read => unsafe { aio.readv(op.iovecs, op.offset, c) },
            // SAFETY: as for reads; the buffers are readable and unchanged until then.
            IoKind::Write => unsafe { aio.writev(op.iovecs, op.offset, c) },
            IoKind::Flush => aio.flush(c),
            IoKind::Discard => aio.discard(op.offset, op.len, c),
            IoKind::WriteZeroes { .. } => aio.write_zeroes(op.offset, op.len, c),
        };
        match started {
            Ok(()) => Ok(()),
            Err((errno, c)) => {
                c.release_unstarted();
                // SAFETY: the op did not start, so its callback never runs: `arg` is ours.
                drop(unsafe { Box::from_raw(arg) });
                log_failure(errno);
                Err(errno)
            }
        }
    }

    fn sync(&self) -> io::Result<()> {
        if self.image.is_read_only() || self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.image.flush().map_err(to_io)
    }

    fn grow(&self, bytes: u64) -> Option<io::Result<()>> {
        if self.closed.load(Ordering::SeqCst) {
            return Some(Err(io::Error::from_raw_os_error(libc::ESHUTDOWN)));
        }
        if self.image.is_read_only() {
            return Some(Err(io::Error::from_raw_os_error(libc::EROFS)));
        }
        Some(self.image.resize(bytes).map_err(to_io))
    }

    fn current_size(&self) -> Option<io::Result<u64>> {
        if self.closed.load(Ordering::SeqCst) {
            return Some(Err(io::Error::from_raw_os_error(libc::ESHUTDOWN)));
        }
        Some(self.image.size().map_err(to_io))
    }
}

fn to_io(e: RbdError) -> io::Error {
    match e {
        RbdError::Call { errno, .. } => io::Error::from_raw_os_error(errno),
        e => io::Error::other(e.to_string()),
    }
}
