//! A small binding to librados and librbd (Ceph 16.2 and later), holding only what uringblk
//! uses: connect to a cluster with a bounded wait, open a pool and an image (a snapshot
//! read-only), its size and features, resize, flush, watch for header updates, and the
//! asynchronous I/O calls (readv, writev, flush, discard, write-zeroes) with their completions.
//!
//! No maintained Rust binding exists; the declarations (ffi.rs) are copied by hand from the
//! headers of librbd-dev and librados-dev. The handles are thread-safe in librbd (one image is
//! used by every iothread at once, as QEMU uses one), so they are `Send + Sync` here.

#![allow(non_camel_case_types)]

pub mod ffi;

use std::ffi::{c_void, CString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("{what} contains a NUL byte")]
    Nul { what: &'static str },
    #[error("cannot create a Ceph client for id '{id}': {}", errno_text(*.errno))]
    Create { id: String, errno: i32 },
    #[error("cannot read the Ceph configuration {}: {}", path.display(), errno_text(*.errno))]
    Conf { path: PathBuf, errno: i32 },
    #[error("cannot set the Ceph option {option}={value}: {}", errno_text(*.errno))]
    ConfSet {
        option: String,
        value: String,
        errno: i32,
    },
    #[error(
        "cannot connect to the Ceph cluster of {} as client.{id} within {timeout_s} s: {}",
        conf.display(),
        errno_text(*.errno)
    )]
    Connect {
        conf: PathBuf,
        id: String,
        timeout_s: u64,
        errno: i32,
    },
    #[error("cannot open the pool '{pool}': {}", errno_text(*.errno))]
    Pool { pool: String, errno: i32 },
    #[error("cannot open the image '{pool}/{image}{}': {}", snap_suffix(.snap), errno_text(*.errno))]
    Open {
        pool: String,
        image: String,
        snap: Option<String>,
        errno: i32,
    },
    #[error("{call} failed: {}", errno_text(*.errno))]
    Call { call: &'static str, errno: i32 },
}

fn snap_suffix(snap: &Option<String>) -> String {
    snap.as_ref().map(|s| format!("@{s}")).unwrap_or_default()
}

/// "No such file or directory (os error 2)" for a positive errno.
pub fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

fn cstring(s: &str, what: &'static str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul { what })
}

fn check(call: &'static str, rc: i32) -> Result<(), RbdError> {
    if rc < 0 {
        Err(RbdError::Call { call, errno: -rc })
    } else {
        Ok(())
    }
}

/// How to reach a cluster.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// ceph.conf (mon addresses, keyring, ...).
    pub conf: PathBuf,
    /// The client id, without "client.".
    pub id: String,
    /// Overrides the keyring that ceph.conf names.
    pub keyring: Option<PathBuf>,
    /// Bounds the connection and the monitor commands (pool lookup).
    pub timeout: Duration,
    /// Extra options, set after ceph.conf is read (e.g. rbd_cache=false).
    pub options: Vec<(String, String)>,
}

/// A connected cluster handle (rados_t).
pub struct Cluster {
    raw: ffi::rados_t,
    /// Set by [`Cluster::shutdown`] (Drop then leaves it alone).
    shut_down: AtomicBool,
}

// SAFETY: librados' cluster handle is thread-safe (its calls take their own locks); we only
// hand it to librados and shut it down once (the `shut_down` swap), in Drop when no ioctx
// refers to it any more (each IoCtx holds an Arc<Cluster>), or earlier by a caller of the
// unsafe shutdown that promises the same.
unsafe impl Send for Cluster {}
// SAFETY: as for Send: shared use from several threads is what librados supports.
unsafe impl Sync for Cluster {}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

impl Cluster {
    /// Creates a client, reads `opts.conf`, applies the options and connects, waiting at most
    /// `opts.timeout` for the monitors.
    pub fn connect(opts: &ConnectOptions) -> Result<Arc<Cluster>, RbdError> {
        let name = cstring(&format!("client.{}", opts.id), "the Ceph id")?;
        let mut raw: ffi::rados_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the cluster name "ceph" and `name` are NUL-
        // terminated strings that live across the call (librados copies them).
        let rc = unsafe { ffi::rados_create2(&mut raw, c"ceph".as_ptr(), name.as_ptr(), 0) };
        if rc < 0 {
            return Err(RbdError::Create {
                id: opts.id.clone(),
                errno: -rc,
            });
        }
        // From here the handle is shut down by Drop on every error path.
        let cluster = Cluster {
            raw,
            shut_down: AtomicBool::new(false),
        };
        let conf = cstring(&opts.conf.to_string_lossy(), "the --ceph-conf path")?;
        // SAFETY: a handle from rados_create2, not yet connected; a NUL-terminated path.
        let rc = unsafe { ffi::rados_conf_read_file(cluster.raw, conf.as_ptr()) };
        if rc < 0 {
            return Err(RbdError::Conf {
                path: opts.conf.clone(),
                errno: -rc,
            });
        }
        let secs = opts.timeout.as_secs().max(1).to_string();
        let mut options: Vec<(String, String)> = vec![
            ("client_mount_timeout".into(), secs.clone()),
            ("rados_mon_op_timeout".into(), secs),
        ];
        if let Some(keyring) = &opts.keyring {
            options.push(("keyring".into(), keyring.to_string_lossy().into_owned()));
        }
        options.extend(opts.options.iter().cloned());
        for (option, value) in &options {
            cluster.set(option, value)?;
        }
        // SAFETY: a configured handle, connected at most once (here).
        let rc = unsafe { ffi::rados_connect(cluster.raw) };
        if rc < 0 {
            return Err(RbdError::Connect {
                conf: opts.conf.clone(),
                id: opts.id.clone(),
                timeout_s: opts.timeout.as_secs().max(1),
                errno: -rc,
            });
        }
        Ok(Arc::new(cluster))
    }

    fn set(&self, option: &str, value: &str) -> Result<(), RbdError> {
        let o = cstring(option, "a Ceph option")?;
        let v = cstring(value, "a Ceph option value")?;
        // SAFETY: a handle from rados_create2; both strings NUL-terminated and alive across
        // the call (librados copies them).
        let rc = unsafe { ffi::rados_conf_set(self.raw, o.as_ptr(), v.as_ptr()) };
        if rc < 0 {
            return Err(RbdError::ConfSet {
                option: option.into(),
                value: value.into(),
                errno: -rc,
            });
        }
        Ok(())
    }
}

impl Cluster {
    /// Disconnects and joins librados's threads now, before the last reference goes. A
    /// process that exits with the handle still open ends while those threads run, and one
    /// that reads the global config while C++ static destructors tear it down crashes the
    /// exit (seen as a SIGSEGV in `Option` lookup under `__cxa_finalize`).
    ///
    /// # Safety
    /// Every IoCtx opened on this cluster is destroyed and no call on it runs or will start.
    pub unsafe fn shutdown(&self) {
        if self.shut_down.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: the handle came from rados_create2, is shut down once (the swap above), and
        // by the caller's promise nothing uses it now or later.
        unsafe { ffi::rados_shutdown(self.raw) };
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: nothing uses the handle any more: every IoCtx holds an Arc to this Cluster.
        unsafe { self.shutdown() };
    }
}

/// A pool's I/O context.
pub struct IoCtx {
    raw: ffi::rados_ioctx_t,
    /// Set by [`IoCtx::destroy`] (Drop then leaves it alone).
    destroyed: AtomicBool,
    _cluster: Arc<Cluster>,
}

// SAFETY: an ioctx is thread-safe in librados; it is destroyed once, in Drop, after every
// Image opened on it is closed (each holds an Arc<IoCtx>).
unsafe impl Send for IoCtx {}
// SAFETY: as for Send.
unsafe impl Sync for IoCtx {}

impl fmt::Debug for IoCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoCtx").finish_non_exhaustive()
    }
}

impl IoCtx {
    pub fn open(cluster: &Arc<Cluster>, pool: &str) -> Result<Arc<IoCtx>, RbdError> {
        let name = cstring(pool, "the pool name")?;
        let mut raw: ffi::rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: a connected cluster handle (kept alive by the Arc), a NUL-terminated name and
        // a valid out-pointer.
        let rc = unsafe { ffi::rados_ioctx_create(cluster.raw, name.as_ptr(), &mut raw) };
        if rc < 0 {
            return Err(RbdError::Pool {
                pool: pool.into(),
                errno: -rc,
            });
        }
        Ok(Arc::new(IoCtx {
            raw,
            destroyed: AtomicBool::new(false),
            _cluster: cluster.clone(),
        }))
    }

    /// Destroys the context before its last reference goes (at exit, ahead of
    /// [`Cluster::shutdown`]).
    ///
    /// # Safety
    /// Every image opened on this context is closed and no call on it runs or will start.
    pub unsafe fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: from rados_ioctx_create, destroyed once (the swap above), and by the
        // caller's promise unused now and later.
        unsafe { ffi::rados_ioctx_destroy(self.raw) };
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: unused by anyone now: every Image holds an Arc to this IoCtx.
        unsafe { self.destroy() };
    }
}

/// An open image (or snapshot: read-only).
pub struct Image {
    raw: ffi::rbd_image_t,
    read_only: bool,
    /// Closed by [`Image::close`] (Drop then leaves it alone).
    closed: AtomicBool,
    _ioctx: Arc<IoCtx>,
}

// SAFETY: librbd's image handle is thread-safe (QEMU and librbd's own tools use one handle
// from many threads); it is closed once, in Drop, when no one holds it (UpdateWatch holds an
// Arc<Image>, and in-flight I/O is drained by the owner before the last Arc goes).
unsafe impl Send for Image {}
// SAFETY: as for Send.
unsafe impl Sync for Image {}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Image {
    /// Opens `image` in the ioctx's pool; with `snap`, that snapshot, read-only. `read_only`
    /// opens the image itself read-only (no exclusive lock, no header writes).
    pub fn open(
        ioctx: &Arc<IoCtx>,
        pool: &str,
        image: &str,
        snap: Option<&str>,
        read_only: bool,
    ) -> Result<Arc<Image>, RbdError> {
        let name = cstring(image, "the image name")?;
        let snap_c = snap.map(|s| cstring(s, "the snapshot name")).transpose()?;
        let snap_ptr = snap_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let read_only = read_only || snap.is_some();
        let mut raw: ffi::rbd_image_t = std::ptr::null_mut();
        // SAFETY: a live ioctx (Arc), NUL-terminated strings (or NULL for no snapshot) that
        // outlive the call, a valid out-pointer.
        let rc = unsafe {
            if read_only {
                ffi::rbd_open_read_only(ioctx.raw, name.as_ptr(), &mut raw, snap_ptr)
            } else {
                ffi::rbd_open(ioctx.raw, name.as_ptr(), &mut raw, snap_ptr)
            }
        };
        if rc < 0 {
            return Err(RbdError::Open {
                pool: pool.into(),
                image: image.into(),
                snap: snap.map(Into::into),
                errno: -rc,
            });
        }
        Ok(Arc::new(Image {
            raw,
            read_only,
            closed: AtomicBool::new(false),
            _ioctx: ioctx.clone(),
        }))
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Closes the image before its last reference goes (at exit, while other threads still
    /// hold it): librbd releases the exclusive lock and its watch, so that the next client
    /// (a restarted server) gets the lock at once instead of after the watch times out.
    ///
    /// # Safety
    /// No other call on this image (I/O, size, resize, flush) is running or will start, and
    /// every UpdateWatch on it is gone; no op is in flight.
    pub unsafe fn close(&self) -> Result<(), RbdError> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // SAFETY: from rbd_open*, not closed before (the swap above), and by the caller's
        // promise nothing else uses it now or later.
        check("rbd_close", unsafe { ffi::rbd_close(self.raw) })
    }

    /// Bytes (librbd refreshes the header if it changed).
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        check("rbd_get_size", unsafe {
            ffi::rbd_get_size(self.raw, &mut size)
        })?;
        Ok(size)
    }

    /// Sets the image's size (blocking).
    pub fn resize(&self, bytes: u64) -> Result<(), RbdError> {
        // SAFETY: an open image; rbd_resize takes no pointers.
        check("rbd_resize", unsafe { ffi::rbd_resize(self.raw, bytes) })
    }

    /// Blocks until every write acknowledged so far is durable.
    pub fn flush(&self) -> Result<(), RbdError> {
        // SAFETY: an open image; takes no pointers.
        check("rbd_flush", unsafe { ffi::rbd_flush(self.raw) })
    }

    /// Calls `on_update` (on a librbd thread) whenever the image's header changes: a resize,
    /// a snapshot, a feature change, by this client or another. Unwatched when the returned
    /// handle drops.
    pub fn update_watch(
        self: &Arc<Image>,
        on_update: Box<dyn Fn() + Send + Sync>,
    ) -> Result<UpdateWatch, RbdError> {
        let callback: Box<Box<dyn Fn() + Send + Sync>> = Box::new(on_update);
        let arg = Box::into_raw(callback);
        let mut handle = 0u64;
        // SAFETY: an open image; `arg` points at a live boxed closure that stays alive until
        // rbd_update_unwatch has returned (UpdateWatch::drop frees it only after that);
        // `update_trampoline` matches rbd_update_callback_t.
        let rc = unsafe {
            ffi::rbd_update_watch(
                self.raw,
                &mut handle,
                Some(update_trampoline),
                arg.cast::<c_void>(),
            )
        };
        if rc < 0 {
            // SAFETY: librbd refused the watch, so it holds no copy of `arg`: ours to free.
            drop(unsafe { Box::from_raw(arg) });
            return Err(RbdError::Call {
                call: "rbd_update_watch",
                errno: -rc,
            });
        }
        Ok(UpdateWatch {
            image: self.clone(),
            handle,
            callback: arg,
        })
    }

    /// The raw handle, for the aio calls of [`Image::aio`].
    pub fn aio(&self) -> Aio<'_> {
        Aio { image: self }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if *self.closed.get_mut() {
            return;
        }
        // SAFETY: from rbd_open*, closed once; the owner drained its in-flight I/O and every
        // UpdateWatch (which holds an Arc) is gone.
        let rc = unsafe { ffi::rbd_close(self.raw) };
        if rc < 0 {
            log::warn!("rbd_close: {}", errno_text(-rc));
        }
    }
}

unsafe extern "C" fn update_trampoline(arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Box<dyn Fn>> leaked in update_watch, alive until the unwatch
    // returned, and librbd calls this only while the watch is registered.
    let callback = unsafe { &*arg.cast::<Box<dyn Fn() + Send + Sync>>() };
    // A panic must not unwind into C.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(callback)).is_err() {
        log::error!("the rbd update-watch callback panicked");
    }
}

/// A registered header watch; unregistered on drop.
pub struct UpdateWatch {
    image: Arc<Image>,
    handle: u64,
    callback: *mut Box<dyn Fn() + Send + Sync>,
}

// SAFETY: the callback it owns is Send + Sync, and the image handle is thread-safe.
unsafe impl Send for UpdateWatch {}
// SAFETY: as for Send; UpdateWatch has no methods that touch the callback.
unsafe impl Sync for UpdateWatch {}

impl fmt::Debug for UpdateWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateWatch")
            .field("handle", &self.handle)
            .finish()
    }
}

impl Drop for UpdateWatch {
    fn drop(&mut self) {
        // SAFETY: the handle came from rbd_update_watch on this (still open) image; librbd
        // waits for a running callback before rbd_update_unwatch returns.
        let rc = unsafe { ffi::rbd_update_unwatch(self.image.raw, self.handle) };
        if rc < 0 {
            // librbd may still call the callback: leak it rather than free it under librbd.
            log::warn!("rbd_update_unwatch: {}", errno_text(-rc));
            return;
        }
        // SAFETY: unwatched: librbd no longer holds `callback`, which update_watch leaked.
        drop(unsafe { Box::from_raw(self.callback) });
    }
}

/// A completion-callback: `arg` is what [`Aio`]'s calls were given. It runs on a librbd
/// thread; it must not block for long, and it must not unwind.
pub type Callback = unsafe extern "C" fn(c: ffi::rbd_completion_t, arg: *mut c_void);

/// An aio completion made by [`Completion::new`]; released by the callback (with
/// [`Completion::finish`]) or by [`Completion::release_unstarted`] when the call failed.
#[derive(Debug)]
pub struct Completion(ffi::rbd_completion_t);

impl Completion {
    /// A completion that calls `cb(c, arg)` when its op finishes.
    ///
    /// # Safety
    /// `arg` must be what `cb` expects, valid until `cb` has run (or until the completion is
    /// released unstarted); librbd only stores it.
    pub unsafe fn new(arg: *mut c_void, cb: Callback) -> Result<Completion, i32> {
        let mut c: ffi::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `c` is a valid out-pointer; librbd only stores `arg` and `cb`.
        let rc = unsafe { ffi::rbd_aio_create_completion(arg, Some(cb), &mut c) };
        if rc < 0 {
            return Err(-rc);
        }
        Ok(Completion(c))
    }

    /// Frees a completion whose op was never started (the aio call returned an error).
    pub fn release_unstarted(self) {
        // SAFETY: from rbd_aio_create_completion; no op refers to it (the call that would
        // have used it failed), so this is its only release.
        unsafe { ffi::rbd_aio_release(self.0) };
    }

    /// In a completion callback: the op's result (bytes or 0, or -errno), releasing `c`.
    ///
    /// # Safety
    /// `c` is the completion the callback was called with, and it is finished only once.
    pub unsafe fn finish(c: ffi::rbd_completion_t) -> isize {
        // SAFETY: the caller passes a live completion that librbd has completed.
        let ret = unsafe { ffi::rbd_aio_get_return_value(c) };
        // SAFETY: as above; our one reference goes (librbd keeps its own until it is done).
        unsafe { ffi::rbd_aio_release(c) };
        ret
    }
}

/// The asynchronous I/O calls on an image. Each returns 0 when the op started (its callback
/// will run) or -errno when it did not (the completion is handed back for release).
pub struct Aio<'a> {
    image: &'a Image,
}

impl Aio<'_> {
    fn started(rc: i32, c: Completion) -> Result<(), (i32, Completion)> {
        if rc < 0 {
            Err((-rc, c))
        } else {
            Ok(())
        }
    }

    /// Reads into `iov` from `off`.
    ///
    /// # Safety
    /// Every iovec is writable memory that stays valid, and is not read or written by
    /// anyone else, until the completion's callback has run.
    pub unsafe fn readv(
        &self,
        iov: &[libc::iovec],
        off: u64,
        c: Completion,
    ) -> Result<(), (i32, Completion)> {
        let Ok(n) = i32::try_from(iov.len()) else {
            return Err((libc::EINVAL, c));
        };
        // SAFETY: an open image; `iov` is `n` iovecs librbd copies; the caller keeps the
        // buffers valid until the callback; `c` is an unused completion.
        let rc = unsafe { ffi::rbd_aio_readv(self.image.raw, iov.as_ptr(), n, off, c.0) };
        Self::started(rc, c)
    }

    /// Writes `iov` at `off`.
    ///
    /// # Safety
    /// Every iovec is readable memory that stays valid and unchanged until the completion's
    /// callback has run.
    pub unsafe fn writev(
        &self,
        iov: &[libc::iovec],
        off: u64,
        c: Completion,
    ) -> Result<(), (i32, Completion)> {
        let Ok(n) = i32::try_from(iov.len()) else {
            return Err((libc::EINVAL, c));
        };
        // SAFETY: as for readv, the buffers being readable.
        let rc = unsafe { ffi::rbd_aio_writev(self.image.raw, iov.as_ptr(), n, off, c.0) };
        Self::started(rc, c)
    }

    pub fn flush(&self, c: Completion) -> Result<(), (i32, Completion)> {
        // SAFETY: an open image and an unused completion; no buffers.
        let rc = unsafe { ffi::rbd_aio_flush(self.image.raw, c.0) };
        Self::started(rc, c)
    }

    pub fn discard(&self, off: u64, len: u64, c: Completion) -> Result<(), (i32, Completion)> {
        // SAFETY: an open image and an unused completion; no buffers.
        let rc = unsafe { ffi::rbd_aio_discard(self.image.raw, off, len, c.0) };
        Self::started(rc, c)
    }

    pub fn write_zeroes(&self, off: u64, len: u64, c: Completion) -> Result<(), (i32, Completion)> {
        let Ok(len) = usize::try_from(len) else {
            return Err((libc::EINVAL, c));
        };
        // SAFETY: an open image and an unused completion; no buffers; flags 0 (librbd may
        // deallocate the range, which then reads as zeros).
        let rc = unsafe { ffi::rbd_aio_write_zeroes(self.image.raw, off, len, c.0, 0, 0) };
        Self::started(rc, c)
    }
}

/// `POOL/IMAGE[@SNAP]`, as --rbd takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    pub pool: String,
    pub image: String,
    pub snap: Option<String>,
}

impl ImageSpec {
    pub fn parse(s: &str) -> Result<ImageSpec, String> {
        let (pool, rest) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}' is not POOL/IMAGE[@SNAP]"))?;
        let (image, snap) = match rest.split_once('@') {
            Some((i, snap)) => (i, Some(snap)),
            None => (rest, None),
        };
        let bad = |part: &str| part.is_empty() || part.contains(['/', '@', '\0']);
        if bad(pool) || bad(image) || snap.is_some_and(bad) {
            return Err(format!("'{s}' is not POOL/IMAGE[@SNAP]"));
        }
        Ok(ImageSpec {
            pool: pool.into(),
            image: image.into(),
            snap: snap.map(Into::into),
        })
    }
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}{}", self.pool, self.image, snap_suffix(&self.snap))
    }
}

/// True when librbd's headers are where Debian puts them (the constants test reads them).
pub fn headers_installed() -> bool {
    Path::new("/usr/include/rbd/librbd.h").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_specs_parse() {
        assert_eq!(
            ImageSpec::parse("rbd/disk").unwrap(),
            ImageSpec {
                pool: "rbd".into(),
                image: "disk".into(),
                snap: None
            }
        );
        let s = ImageSpec::parse("p/i@s1").unwrap();
        assert_eq!(s.snap.as_deref(), Some("s1"));
        assert_eq!(s.to_string(), "p/i@s1");
        for bad in [
            "disk",
            "/disk",
            "rbd/",
            "rbd/a/b",
            "rbd/i@",
            "rbd/i@a@b",
            "r\0/i",
        ] {
            assert!(ImageSpec::parse(bad).is_err(), "{bad}");
        }
    }

    /// The hand-copied constants match the installed headers.
    #[test]
    fn declared_constants_match_the_headers() {
        if !headers_installed() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "librbd-dev missing under CI"
            );
            println!("SKIPPED: /usr/include/rbd/librbd.h missing (librbd-dev)");
            return;
        }
        let librbd = std::fs::read_to_string("/usr/include/rbd/librbd.h").unwrap();
        for f in [
            "int rbd_aio_readv(rbd_image_t image, const struct iovec *iov,",
            "int rbd_aio_writev(rbd_image_t image, const struct iovec *iov,",
            "int rbd_aio_discard(rbd_image_t image, uint64_t off, uint64_t len,",
            "int rbd_aio_write_zeroes(rbd_image_t image, uint64_t off,",
            "ssize_t rbd_aio_get_return_value(rbd_completion_t c);",
            "int rbd_update_watch(rbd_image_t image, uint64_t *handle,",
            "typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);",
            "typedef void (*rbd_update_callback_t)(void *arg);",
        ] {
            assert!(librbd.contains(f), "librbd.h lacks `{f}`");
        }
    }
}
