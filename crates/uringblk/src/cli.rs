//! Command-line flags and the checks that turn them into a server configuration. Every bad
//! value is reported in one line before the socket is opened.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "uringblk",
    version,
    about = "vhost-user-blk server whose dataplane is io_uring",
    after_help = "Example: uringblk --socket /tmp/uringblk.sock --image disk.img --create 1G --queues 2 --iothreads 2 --cpus 0,1\n\
                  Signals: SIGTERM/SIGINT stop cleanly (in-flight I/O drained), SIGUSR1 prints statistics as JSON on stdout.\n\
                  A running server with --control PATH answers `uringblk ctl --control PATH COMMAND` (see `uringblk ctl --help`)."
)]
pub struct Cli {
    /// Unix socket the VMM (vhost-user frontend) connects to.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Disk image: a regular file or a block device.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["null", "rbd"],
        conflicts_with = "null"
    )]
    pub image: Option<PathBuf>,

    /// Serve a Ceph RBD image instead of a file: POOL/IMAGE, or POOL/IMAGE@SNAP to export a
    /// snapshot (read-only). The cluster is found through --ceph-conf.
    #[arg(
        long,
        value_name = "POOL/IMAGE[@SNAP]",
        value_parser = parse_rbd_spec,
        conflicts_with_all = ["null", "image"]
    )]
    pub rbd: Option<rbd_backend::RbdImageSpec>,

    /// Ceph configuration (monitor addresses, keyring) for --rbd.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/etc/ceph/ceph.conf",
        requires = "rbd",
        conflicts_with_all = ["null", "image"]
    )]
    pub ceph_conf: PathBuf,

    /// Ceph client id for --rbd (client.ID's key and capabilities are used).
    #[arg(
        long,
        value_name = "ID",
        default_value = "admin",
        requires = "rbd",
        conflicts_with_all = ["null", "image"]
    )]
    pub ceph_id: String,

    /// Keyring for --rbd (instead of the one --ceph-conf names).
    #[arg(
        long,
        value_name = "PATH",
        requires = "rbd",
        conflicts_with_all = ["null", "image"]
    )]
    pub ceph_keyring: Option<PathBuf>,

    /// A librbd/librados option for --rbd, KEY=VALUE (repeatable), set after --ceph-conf is read
    /// and after uringblk's own defaults, so it overrides both (e.g. ms_async_op_threads=1).
    #[arg(
        long,
        value_name = "KEY=VALUE",
        value_parser = parse_ceph_option,
        requires = "rbd",
        conflicts_with_all = ["null", "image"]
    )]
    pub ceph_option: Vec<(String, String)>,

    /// Seconds --rbd waits for the cluster (monitors, pool lookup) before giving up at start.
    #[arg(
        long,
        value_name = "S",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600),
        requires = "rbd",
        conflicts_with_all = ["null", "image"]
    )]
    pub ceph_connect_timeout: u64,

    /// Create the image as a sparse file of SIZE bytes if it does not exist (suffixes K, M, G, T).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "image")]
    pub create: Option<u64>,

    /// Null backend of SIZE bytes: completes I/O without touching a disk (dataplane measurement).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub null: Option<u64>,

    /// Export read-only: the guest sees VIRTIO_BLK_F_RO, writes fail with IOERR.
    #[arg(long)]
    pub readonly: bool,

    /// Open the image with O_DIRECT (the default for files and block devices).
    #[arg(long, conflicts_with = "buffered")]
    pub direct: bool,

    /// Go through the host page cache instead of O_DIRECT.
    #[arg(long)]
    pub buffered: bool,

    /// Number of virtqueues offered to the guest.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,

    /// Number of iothreads (default: one per --cpus entry, else 1); queues are spread evenly.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub iothreads: Option<u16>,

    /// CPUs to pin the iothreads to, one per iothread (e.g. 0,1 or 2-5).
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub cpus: Option<CpuList>,

    /// Virtqueue size: a power of two up to 1024.
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[arg(long, default_value = "uringblk", value_parser = parse_serial)]
    pub serial: String,

    /// Logical block size the guest sees.
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub logical_block_size: u32,

    /// Do not offer DISCARD.
    #[arg(long)]
    pub no_discard: bool,

    /// Do not offer WRITE_ZEROES.
    #[arg(long)]
    pub no_write_zeroes: bool,

    /// After each batch, busy-poll the queues and completions up to this many microseconds
    /// (with guest notifications off) before sleeping: fewer kicks and wake-ups under load, at
    /// the cost of CPU while idle-but-not-yet-asleep. The window adapts (it halves while
    /// polling finds nothing); 200 covers a fast disk's QD1 latency. 0 disables polling.
    /// Default: 200, and 0 with --rbd (librbd's own threads finish the work; the CPU a polling
    /// iothread takes is theirs, and a Ceph round trip is longer than the window).
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_us: Option<u64>,

    /// While polling, nap (nanosleep, guest notifications still off, so the guest need not
    /// kick) instead of spinning when a look finds nothing and recent drains were deep
    /// (two chains or more at once: never at QD1); each nap is half the observed gap between
    /// batches, at most this many microseconds. A nap that overruns its length by more than
    /// this turns napping off for 100 ms at a time: where the timer cannot wake the thread
    /// within the bound (a VM, as on the machine bench/README.md measured, where a 1 µs
    /// nanosleep takes 27 µs) it costs one overrun per 100 ms. 0 (the default, the best
    /// measured setting there) never naps.
    #[arg(long, value_name = "US", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub poll_nap_us: u64,

    /// While requests are in flight at the storage, keep polling at least this many
    /// microseconds after the last sign of work, however short the adaptive window: the
    /// thread then catches the disk's completions and the guest's next requests without the
    /// two wake-ups (ring eventfd, guest kick) a sleep costs per batch. Worth ~15% IOPS at
    /// 4k QD32 on a disk slower than the --poll-us window (bench/README.md), at the price of the
    /// iothread's core while I/O is outstanding. 0 leaves the adaptive window alone. Needs
    /// polling on (--poll-us > 0). Default: 2000, and 0 with --rbd.
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_in_flight_us: Option<u64>,

    /// At most this many SQEs per io_uring_enter; 0 submits a drained batch at once. Two or
    /// fewer keep io_uring from plugging the block layer, which holds a burst back until all
    /// of it is prepared (slower on disks that serve requests as they arrive; bench/README.md).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub submit_batch: usize,

    /// io_uring setup: auto (SINGLE_ISSUER + DEFER_TASKRUN where the kernel has them, else
    /// COOP_TASKRUN, else plain), coop, or plain.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub ring_setup: engine::RingSetup,

    /// Upper bound on each ring's io-wq worker threads (0: the kernel's default).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub iowq_max_workers: u32,

    /// Largest merged read or write, in KiB: contiguous requests drained together are issued
    /// as one vectored op up to this size. 0 turns merging off. Larger merges save ops but
    /// take parallelism from the disk (bench/README.md: 1 MiB lost 16% on 128k writes here).
    #[arg(long, value_name = "KIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    pub merge_max_kib: u64,

    /// O_DIRECT bounce memory per iothread, in MiB: requests whose guest buffers miss the
    /// image's DIO alignment are copied through aligned buffers drawn from this budget; one
    /// that does not fit waits for memory to come back. A request larger than the whole budget
    /// is still served, alone.
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub bounce_budget_mib: u64,

    /// Do not register guest memory with the rings as fixed buffers (plain READV/WRITEV,
    /// which pin the pages of every request anew).
    #[arg(long)]
    pub no_fixed_buffers: bool,

    /// Start with the write cache off: every write is durable (O_DSYNC) before it completes.
    #[arg(long)]
    pub writethrough: bool,

    /// Do not lock the image. By default it is locked the way QEMU locks images (OFD locks
    /// on QEMU's permission bytes), for the life of the process: while it is served, QEMU,
    /// qemu-img and other uringblk processes cannot open it for writing, and an image that one
    /// of them holds for writing is refused. (--null has nothing to lock.)
    #[arg(long)]
    pub no_lock: bool,

    /// Control socket (unix, owner-only) for `uringblk ctl --control PATH stats|info|flush|write-cache|resize`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9765). Loopback only
    /// unless --metrics-allow-remote.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,

    /// Allow --metrics on a non-loopback address (the metrics have no authentication).
    #[arg(long, requires = "metrics")]
    pub metrics_allow_remote: bool,
}

impl Cli {
    /// --poll-us, else its default for the backend.
    pub fn poll_us(&self) -> u64 {
        self.poll_us
            .unwrap_or(if self.rbd.is_some() { 0 } else { 200 })
    }

    /// --poll-in-flight-us, else its default for the backend. It acts only inside a poll,
    /// so with --poll-us 0 it does nothing.
    pub fn poll_in_flight_us(&self) -> u64 {
        self.poll_in_flight_us
            .unwrap_or(if self.rbd.is_some() { 0 } else { 2000 })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// "4096", "64K", "256M", "1G", "2T" (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in '{s}' (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 1G, 256M, 4096)"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))?;
    if bytes == 0 {
        return Err("size must be greater than 0".into());
    }
    Ok(bytes)
}

/// "KEY=VALUE" for --ceph-option: a non-empty key without spaces; the value may be empty.
pub fn parse_ceph_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() && !key.contains(char::is_whitespace) => {
            Ok((key.to_owned(), value.to_owned()))
        }
        _ => Err(format!(
            "'{s}' is not KEY=VALUE (e.g. ms_async_op_threads=1)"
        )),
    }
}

/// "0,2,3" or "0-3" or a mix; every CPU must exist on this machine.
pub fn parse_cpu_list(s: &str) -> Result<CpuList, String> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max_cpu = core_count().max(online);
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a
            .parse()
            .map_err(|_| format!("'{part}' is not a CPU number or range"))?;
        let b: usize = b
            .parse()
            .map_err(|_| format!("'{part}' is not a CPU number or range"))?;
        if a > b {
            return Err(format!("CPU range '{part}' is backwards"));
        }
        for c in a..=b {
            if c >= max_cpu {
                return Err(format!(
                    "CPU {c} does not exist (this machine has {max_cpu})"
                ));
            }
            if cpus.contains(&c) {
                return Err(format!("CPU {c} is listed twice"));
            }
            cpus.push(c);
        }
    }
    Ok(CpuList(cpus))
}

fn core_count() -> usize {
    core_affinity::get_core_ids().map_or(0, |ids| ids.iter().map(|c| c.id + 1).max().unwrap_or(0))
}

pub fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if n == 0 || n > 1024 || !n.is_power_of_two() {
        return Err(format!(
            "queue size must be a power of two from 1 to 1024, got {n}"
        ));
    }
    if n < 4 {
        return Err("queue size must be at least 4 (a request needs 3 descriptors)".into());
    }
    Ok(n)
}

pub fn parse_rbd_spec(s: &str) -> Result<rbd_backend::RbdImageSpec, String> {
    rbd_backend::RbdImageSpec::parse(s)
}

pub fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!("serial is {} bytes; at most 20 fit", s.len()));
    }
    Ok(s.to_string())
}

pub fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("logical block size must be 512 or 4096, got '{s}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cpu_lists_accept_ranges_and_reject_unknown_cpus() {
        assert_eq!(parse_cpu_list("0"), Ok(CpuList(vec![0])));
        assert!(parse_cpu_list("0,0").is_err());
        assert!(parse_cpu_list("1-0").is_err());
        assert!(parse_cpu_list("100000").is_err());
        assert!(parse_cpu_list("a").is_err());
    }

    #[test]
    fn queue_size_must_be_a_power_of_two_up_to_1024() {
        assert_eq!(parse_queue_size("256"), Ok(256));
        assert_eq!(parse_queue_size("1024"), Ok(1024));
        for bad in ["0", "100", "2048", "2", "x"] {
            assert!(parse_queue_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serial_and_block_size_limits() {
        assert!(parse_serial("01234567890123456789").is_ok());
        assert!(parse_serial("012345678901234567890").is_err());
        assert_eq!(parse_block_size("4096"), Ok(4096));
        assert!(parse_block_size("1024").is_err());
    }

    #[test]
    fn rbd_flags_go_with_rbd_only() {
        let parse = |args: &[&str]| {
            let mut all = vec!["uringblk", "--socket", "/tmp/s"];
            all.extend(args);
            Cli::try_parse_from(all)
        };
        let cli = parse(&["--rbd", "rbd/disk@snap"]).expect("--rbd alone");
        let spec = cli.rbd.clone().expect("spec");
        assert_eq!((spec.pool.as_str(), spec.image.as_str()), ("rbd", "disk"));
        assert_eq!(spec.snap.as_deref(), Some("snap"));
        assert_eq!(cli.ceph_conf, PathBuf::from("/etc/ceph/ceph.conf"));
        assert_eq!(cli.ceph_id, "admin");
        assert_eq!(cli.ceph_connect_timeout, 10);
        assert_eq!(cli.poll_us(), 0, "no polling by default with --rbd");
        let cli = parse(&["--rbd", "p/i", "--poll-us", "50"]).expect("--poll-us with --rbd");
        assert_eq!(cli.poll_us(), 50);
        assert_eq!(
            parse(&["--null", "1G"]).expect("--null").poll_us(),
            200,
            "polling by default otherwise"
        );
        assert_eq!(
            cli.poll_in_flight_us(),
            0,
            "no in-flight polling by default with --rbd"
        );
        let null = parse(&["--null", "1G"]).expect("--null");
        assert_eq!(null.poll_in_flight_us(), 2000);
        let cli = parse(&["--null", "1G", "--poll-in-flight-us", "0"]).expect("off");
        assert_eq!(cli.poll_in_flight_us(), 0);
        let cli = parse(&[
            "--rbd",
            "p/i",
            "--ceph-conf",
            "/c",
            "--ceph-id",
            "u",
            "--ceph-keyring",
            "/k",
            "--ceph-connect-timeout",
            "3",
            "--ceph-option",
            "rbd_op_threads=2",
            "--ceph-option",
            "log_file=",
        ])
        .expect("every ceph flag");
        assert_eq!(cli.ceph_keyring, Some(PathBuf::from("/k")));
        assert_eq!(
            cli.ceph_option,
            [
                ("rbd_op_threads".to_owned(), "2".to_owned()),
                ("log_file".to_owned(), String::new())
            ],
            "in order, an empty value kept"
        );
        assert_eq!(cli.ceph_connect_timeout, 3);
        for bad in [
            &["--rbd", "nopool"][..],
            &["--rbd", "p/i", "--image", "/x"],
            &["--rbd", "p/i", "--null", "1G"],
            &["--ceph-id", "u"],
            &["--ceph-conf", "/c", "--null", "1G"],
            &["--ceph-keyring", "/k", "--image", "/x"],
            &["--ceph-id", "u", "--image", "/x"],
            &["--ceph-connect-timeout", "3", "--null", "1G"],
            &["--rbd", "p/i", "--ceph-connect-timeout", "0"],
            &["--rbd", "p/i", "--ceph-option", "novalue"],
            &["--rbd", "p/i", "--ceph-option", "=1"],
            &["--ceph-option", "a=1", "--image", "/x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_bounce_budget_defaults_to_64_mib_and_is_never_zero() {
        let base = ["uringblk", "--socket", "/tmp/s", "--null", "1G"];
        let cli = Cli::try_parse_from(base).expect("defaults parse");
        assert_eq!(cli.bounce_budget_mib, 64);
        let with = |v: &str| {
            let mut args = base.to_vec();
            args.extend(["--bounce-budget-mib", v]);
            Cli::try_parse_from(args)
        };
        assert_eq!(with("1").expect("1 MiB").bounce_budget_mib, 1);
        assert!(with("0").is_err());
        assert!(with("x").is_err());
    }

    #[test]
    fn napping_is_off_by_default_and_bounded_to_a_millisecond() {
        let base = ["uringblk", "--socket", "/tmp/s", "--null", "1G"];
        let cli = Cli::try_parse_from(base).expect("defaults parse");
        assert_eq!((cli.poll_nap_us, cli.poll_us()), (0, 200));
        let with = |v: &str| {
            let mut args = base.to_vec();
            args.extend(["--poll-nap-us", v]);
            Cli::try_parse_from(args)
        };
        assert_eq!(with("5").expect("5 us").poll_nap_us, 5);
        assert_eq!(with("1000").expect("1 ms").poll_nap_us, 1000);
        assert!(with("1001").is_err());
        assert!(with("-1").is_err());
    }
}
