//! uringblk: serves one disk image (a file, a block device, a Ceph RBD image, or a null device)
//! over vhost-user-blk. This binary only wires things together: flags (cli.rs) -> storage
//! backend (engine; rbd-backend for --rbd) -> image lock
//! (image-lock) -> vhost-user backend (vhost-server) -> connection loop, plus logging and
//! signals.

mod cli;
mod ctl;
mod operator;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blk_proto::DeviceConfig;
use clap::Parser;
use engine::{ImageOptions, MergeLimits, Storage};
use image_lock::{Access, ImageLock, LockError};
use rbd_backend::{RbdOptions, RbdStorage};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;
use vhost_server::{ServerConfig, VhostUserBlk};

use cli::Cli;

/// Exit code for bad flags, as clap uses.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    // `uringblk ctl ...` is the control socket's client; anything else runs a server.
    let args: Vec<String> = std::env::args().collect();
    if let [program, sub, rest @ ..] = args.as_slice() {
        if sub == "ctl" {
            return ctl::run(std::iter::once(format!("{program} ctl")).chain(rest.iter().cloned()));
        }
    }
    let cli = Cli::parse();
    // The image lock is held until the process ends, across every reconnect.
    let (backend, storage, _image_lock, rbd) = match build(&cli) {
        Ok(b) => b,
        Err(msg) => {
            eprintln!("uringblk: error: {msg}");
            return ExitCode::from(USAGE);
        }
    };
    // Signals are set up before the socket exists, so a stop request is never missed.
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGUSR1]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("uringblk: error: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let operator = Arc::new(operator::Operator {
        backend: backend.clone(),
        storage: storage.clone(),
        image: cli
            .image
            .clone()
            .or_else(|| cli.rbd.as_ref().map(|s| format!("rbd:{s}").into())),
        readonly: export_read_only(&cli),
        queues: cli.queues,
        iothreads: iothread_count(&cli),
        logical_block_size: cli.logical_block_size,
    });
    // Both listen before the vhost-user socket exists, so a bad address fails the start.
    let _control = match &cli.control {
        Some(path) => match control::ControlServer::start(path, operator.clone()) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("uringblk: error: {e}");
                return ExitCode::from(USAGE);
            }
        },
        None => None,
    };
    let _metrics = match cli.metrics {
        Some(addr) => {
            match metrics::MetricsServer::start(addr, cli.metrics_allow_remote, operator.clone()) {
                Ok(m) => Some(m),
                Err(e) => {
                    eprintln!("uringblk: error: {e}");
                    return ExitCode::from(USAGE);
                }
            }
        }
        None => None,
    };
    let rbd_watcher = rbd.as_ref().and_then(|rbd| watch_rbd_size(rbd, &backend));
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (backend, stop, socket) = (backend.clone(), stop.clone(), cli.socket.clone());
        std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || {
                let listening = || log::info!("listening on {}", socket.display());
                if let Err(e) = vhost_server::serve(&backend, &socket, &stop, listening) {
                    eprintln!("uringblk: error: {e}");
                    std::process::exit(1);
                }
            })
    };
    if let Err(e) = server {
        eprintln!("uringblk: error: cannot start the server thread: {e}");
        return ExitCode::FAILURE;
    }
    for signal in signals.forever() {
        match signal {
            SIGUSR1 => print_stats(&backend),
            _ => break,
        }
    }
    log::info!("stopping: draining in-flight I/O");
    stop.store(true, Ordering::SeqCst);
    backend.begin_stop();
    let quiesced = backend.quiesce();
    if let Err(e) = &quiesced {
        log::error!("stopping: {e}");
    }
    if let Err(e) = storage.sync() {
        log::error!("final sync of the image failed: {e}");
    }
    // librados's threads must be gone before the exit handlers run (see rbd::Cluster::shutdown).
    let mut rbd_connected = false;
    if let Some(rbd) = &rbd {
        // The watcher ends once its callback is dropped; joined, it is out of rbd.size().
        rbd.unwatch();
        if let Some(watcher) = rbd_watcher {
            let _ = watcher.join();
        }
        if quiesced.is_ok() {
            // SAFETY: begin_stop and a successful quiesce came first: no op is in flight and
            // none starts (one that would is refused by the closed backend); the watcher
            // was joined.
            if let Err(e) = unsafe { rbd.close() } {
                log::warn!("closing the RBD image: {e}");
            }
        } else {
            rbd_connected = true;
        }
    }
    remove_socket(&cli.socket);
    print_stats(&backend);
    log::info!("stopped");
    if rbd_connected {
        // Ops may still be in flight in librados: it cannot be shut down, and its threads
        // would run during the exit handlers. End without them (librbd's lock is released
        // by the cluster when the session times out).
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: _exit ends the process at once; nothing after it runs.
        unsafe { libc::_exit(1) };
    }
    // The vhost-user thread may sit in accept(); the process ends it.
    ExitCode::SUCCESS
}

/// What `build` made: the device, its storage, the image lock, the RBD image if any.
type Built = (
    VhostUserBlk,
    Arc<Storage>,
    Option<ImageLock>,
    Option<Arc<RbdStorage>>,
);

/// --readonly, or a snapshot given to --rbd.
fn export_read_only(cli: &Cli) -> bool {
    cli.readonly || cli.rbd.as_ref().is_some_and(|s| s.snap.is_some())
}

/// An image grown by someone else (`rbd resize`): librbd's header watch wakes a thread that
/// takes the new size and tells the guest, as `uringblk ctl resize` does.
fn watch_rbd_size(
    rbd: &Arc<RbdStorage>,
    backend: &VhostUserBlk,
) -> Option<std::thread::JoinHandle<()>> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let backend = backend.clone();
    let image = rbd.clone();
    let thread = std::thread::Builder::new()
        .name("rbd-watch".into())
        .spawn(move || {
            let rbd = image;
            while rx.recv().is_ok() {
                // One look for a burst of header updates.
                while rx.try_recv().is_ok() {}
                let before = backend.capacity_bytes();
                // Most header updates (a snapshot, our own resize) leave the size alone.
                if rbd.size().is_ok_and(|now| now == before) {
                    continue;
                }
                match backend.resize(None) {
                    Ok(r) if r.to_bytes != before => {
                        log::info!("rbd: the image was resized to {} bytes", r.to_bytes)
                    }
                    Ok(_) => {}
                    Err(e) => log::warn!("rbd: after a header update: {e}"),
                }
            }
        });
    let thread = match thread {
        Ok(t) => t,
        Err(e) => {
            log::warn!("rbd: cannot watch the image's size: {e}");
            return None;
        }
    };
    let tx = std::sync::Mutex::new(tx);
    let on_update = move || {
        let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(());
    };
    // On failure the callback, and with it `tx`, is dropped: the thread ends.
    if let Err(e) = rbd.watch_updates(Box::new(on_update)) {
        log::warn!("rbd: cannot watch the image's size: {e}");
    }
    Some(thread)
}

/// Checks every flag against the others and the storage, locks the image, then builds the
/// backend.
fn build(cli: &Cli) -> Result<Built, String> {
    let cpus = cli.cpus.clone().map(|c| c.0).unwrap_or_default();
    let iothreads = iothread_count(cli);
    if iothreads > cli.queues as usize {
        return Err(format!(
            "--iothreads {iothreads} exceeds --queues {}: each iothread needs a queue",
            cli.queues
        ));
    }
    if !cpus.is_empty() && cpus.len() != iothreads {
        return Err(format!(
            "--cpus lists {} CPUs for {iothreads} iothreads: give exactly one per iothread",
            cpus.len()
        ));
    }
    if cli.null.is_some() && (cli.direct || cli.buffered) {
        return Err("--direct/--buffered apply to --image, not --null".into());
    }
    if cli.rbd.is_some() && (cli.direct || cli.buffered || cli.create.is_some()) {
        return Err("--direct/--buffered/--create apply to --image, not --rbd".into());
    }
    let read_only = export_read_only(cli);
    let mut rbd = None;
    let storage = match (&cli.image, cli.null, &cli.rbd) {
        (None, None, Some(spec)) => {
            let opts = RbdOptions {
                spec: spec.clone(),
                conf: cli.ceph_conf.clone(),
                id: cli.ceph_id.clone(),
                keyring: cli.ceph_keyring.clone(),
                iothreads: iothread_count(cli),
                extra_options: cli.ceph_option.clone(),
                connect_timeout: std::time::Duration::from_secs(cli.ceph_connect_timeout),
                read_only,
            };
            let image = RbdStorage::open(&opts).map_err(|e| e.to_string())?;
            let capacity = image.size().map_err(|e| e.to_string())?;
            rbd = Some(image.clone());
            Storage::external(image, capacity)
        }
        (Some(path), _, _) => {
            let opts = ImageOptions {
                read_only: cli.readonly,
                direct: !cli.buffered,
                create_size: cli.create,
            };
            let b = Storage::open(path, &opts).map_err(|e| e.to_string())?;
            b.check_block_size(path, cli.logical_block_size)
                .map_err(|e| e.to_string())?;
            b
        }
        (None, Some(size), _) => Storage::null(size),
        (None, None, _) => return Err("give --image PATH, --rbd POOL/IMAGE or --null SIZE".into()),
    };
    let image_lock = lock_image(cli)?;
    let capacity = storage.capacity_bytes();
    if capacity < u64::from(cli.logical_block_size) {
        return Err(format!(
            "the image holds {capacity} bytes, less than one {}-byte block",
            cli.logical_block_size
        ));
    }
    let mut device =
        DeviceConfig::new(capacity, cli.logical_block_size, cli.queues, cli.queue_size);
    device.read_only = read_only;
    device.discard = !cli.no_discard;
    device.write_zeroes = !cli.no_write_zeroes;
    device.serial = cli.serial.as_bytes().to_vec();
    if socket_in_use(&cli.socket) {
        return Err(format!(
            "{} is in use by a running server",
            cli.socket.display()
        ));
    }
    let storage = Arc::new(storage);
    let backend = VhostUserBlk::new(
        ServerConfig {
            device,
            queue_size: cli.queue_size,
            iothreads,
            cpus,
            writeback: !cli.writethrough,
            merge: MergeLimits {
                // A request larger than the limit still goes out, alone.
                max_bytes: cli.merge_max_kib << 10,
                ..MergeLimits::default()
            },
            poll: std::time::Duration::from_micros(cli.poll_us()),
            poll_nap: std::time::Duration::from_micros(cli.poll_nap_us),
            poll_in_flight: std::time::Duration::from_micros(cli.poll_in_flight_us()),
            submit_batch: cli.submit_batch,
            ring_setup: cli.ring_setup,
            iowq_max_workers: cli.iowq_max_workers,
            fixed_buffers: !cli.no_fixed_buffers,
            bounce_budget: usize::try_from(cli.bounce_budget_mib << 20).unwrap_or(usize::MAX),
            config_change_timeout: vhost_server::DEFAULT_CONFIG_CHANGE_TIMEOUT,
        },
        storage.clone(),
    )
    .map_err(|e| e.to_string())?;
    log::info!(
        "{} bytes ({:?}{}), {} queue(s) of {} on {} iothread(s), block size {}",
        capacity,
        storage.kind(),
        if storage.is_direct() {
            ", O_DIRECT"
        } else {
            ""
        },
        cli.queues,
        cli.queue_size,
        iothreads,
        cli.logical_block_size
    );
    Ok((backend, storage, image_lock, rbd))
}

/// --iothreads, else one per --cpus entry, else 1.
fn iothread_count(cli: &Cli) -> usize {
    match (cli.iothreads, cli.cpus.as_ref().map_or(0, |c| c.0.len())) {
        (Some(n), _) => n as usize,
        (None, 0) => 1,
        (None, n) => n,
    }
}

/// Locks the image as QEMU would lock it for this export (nothing to lock for --null).
fn lock_image(cli: &Cli) -> Result<Option<ImageLock>, String> {
    let Some(path) = &cli.image else {
        return Ok(None);
    };
    if cli.no_lock {
        log::warn!(
            "--no-lock: {} is served without image locks",
            path.display()
        );
        return Ok(None);
    }
    let access = if cli.readonly {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let lock = ImageLock::acquire(path, access).map_err(|e| match e {
        LockError::Conflict { .. } => format!("{e}; --no-lock serves it anyway"),
        _ => e.to_string(),
    })?;
    log::debug!("locked {} for {access:?}", lock.path().display());
    Ok(Some(lock))
}

/// A socket file another live server answers on must not be stolen (a stale one is fine).
fn socket_in_use(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

fn print_stats(backend: &VhostUserBlk) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", backend.stats_json());
    let _ = out.flush();
}
