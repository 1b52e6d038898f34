//! Boots the measurement guest against a vhost-user-blk socket and returns what it saw.
//!
//! The work is split so that each piece can be used by hand too:
//! - `scripts/build-guest.sh` builds the guest (Debian kernel, busybox, fio, blkdiscard) into
//!   `build/guest`; [`build_guest`] calls it (a no-op when nothing changed).
//! - `scripts/run-vm.sh` picks the accelerator, boots QEMU with the per-run job, enforces the
//!   guest timeout and classifies the outcome; [`run`] calls it, adds a hard deadline of its own
//!   (killing the whole process group), and parses its output ([`report`]) into a [`GuestRun`].
//!
//! ```no_run
//! let guest_dir = guestvm::default_guest_dir();
//! guestvm::build_guest(&guest_dir)?;
//! let run = guestvm::run(
//!     &guestvm::VmConfig::new("/tmp/blk.sock", &guest_dir)
//!         .fio_job("[check]\nfilename=/dev/vda\nrw=read\nsize=1M\n")
//!         .cmd("size", "blockdev --getsize64 /dev/vda"),
//! )?;
//! println!("accel={} size={}", run.accel, run.fact_u64("size_bytes")?);
//! # Ok::<(), guestvm::Error>(())
//! ```

pub mod report;
pub mod testing;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use report::{fio_io_bytes, fio_job_count, fio_job_errors, CommandOutput, ParseError};

/// Extra time [`run`] grants the script beyond the guest timeout: the KVM probe boot (at most
/// 30 s, once per machine) and QEMU's start and teardown.
const SCRIPT_GRACE: Duration = Duration::from_secs(60);

/// How a VM run went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The guest did not finish in time.
    Timeout,
    /// The guest kernel panicked.
    KernelPanic,
    /// QEMU itself failed (e.g. it could not connect to the socket).
    Qemu,
    /// The guest's /init gave up (e.g. no disk appeared).
    GuestError,
    /// The guest's report is incomplete.
    MissingOutput,
    /// fio exited with an error or a job reported one.
    Fio,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Timeout => "timeout",
            FailureKind::KernelPanic => "kernel panic",
            FailureKind::Qemu => "qemu failed",
            FailureKind::GuestError => "guest error",
            FailureKind::MissingOutput => "missing output",
            FailureKind::Fio => "fio error",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid VM config: {0}")]
    InvalidConfig(String),
    #[error("building the guest failed ({status}):\n{log}")]
    Build { status: ExitStatus, log: String },
    #[error("run-vm.sh failed before booting ({status}):\n{log}")]
    Script { status: ExitStatus, log: String },
    #[error("VM run failed: {kind} (accel={accel}): {reason}\n{diagnostics}")]
    VmFailed {
        kind: FailureKind,
        accel: String,
        reason: String,
        /// The script's stderr: QEMU's errors and the guest console's tail.
        diagnostics: String,
        /// What the guest did report, if its output could be parsed.
        partial: Option<Box<GuestRun>>,
    },
    #[error("cannot parse the VM output: {source}\n{diagnostics}")]
    Parse {
        #[source]
        source: ParseError,
        diagnostics: String,
    },
    #[error("the guest reported no fact {0:?}")]
    MissingFact(String),
    #[error("fact {key}={value:?} is not a number")]
    BadFact { key: String, value: String },
    #[error("the guest ran no command named {0:?}")]
    MissingCommand(String),
    #[error("the run has no fio result")]
    NoFioResult,
}

impl Error {
    /// The kind of VM failure, if this is one.
    pub fn failure_kind(&self) -> Option<FailureKind> {
        match self {
            Error::VmFailed { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Which accelerator to ask the script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM if a probe boot shows a stock guest runs under it, else TCG.
    Auto,
    Tcg,
    Kvm,
}

impl AccelChoice {
    fn as_arg(self) -> &'static str {
        match self {
            AccelChoice::Auto => "auto",
            AccelChoice::Tcg => "tcg",
            AccelChoice::Kvm => "kvm",
        }
    }
}

/// A shell snippet the guest runs; its output and exit code come back as a [`CommandOutput`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCommand {
    pub name: String,
    pub script: String,
}

/// One VM run: the socket, what the guest runs, and the VM's shape.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub socket: PathBuf,
    pub guest_dir: PathBuf,
    /// The text of a fio job file; the disk is `/dev/vda`.
    pub fio_job: Option<String>,
    /// Extra fio arguments (each a single word, e.g. `--verify_only`).
    pub fio_args: Vec<String>,
    /// Run before fio, in order.
    pub pre: Vec<GuestCommand>,
    /// Run after fio, in order.
    pub post: Vec<GuestCommand>,
    /// virtio-blk queues QEMU asks the server for.
    pub queues: u32,
    pub vcpus: u32,
    pub mem_mib: u32,
    /// How long the guest may take from QEMU's start to its power-off.
    pub timeout: Duration,
    pub accel: AccelChoice,
    /// How often the guest reboots (a machine reset within one QEMU process, so the
    /// vhost-user connection stays while the device is reset), running everything again.
    pub reboots: u32,
    /// fio arguments for the boots after the first (default: `fio_args`).
    pub reboot_fio_args: Vec<String>,
    /// Seconds after which QEMU reconnects to a server that went away (0: never, and the
    /// run fails when the server goes).
    pub reconnect_s: u32,
}

impl VmConfig {
    pub fn new(socket: impl Into<PathBuf>, guest_dir: impl Into<PathBuf>) -> Self {
        VmConfig {
            socket: socket.into(),
            guest_dir: guest_dir.into(),
            fio_job: None,
            fio_args: Vec::new(),
            pre: Vec::new(),
            post: Vec::new(),
            queues: 1,
            vcpus: 1,
            mem_mib: 512,
            timeout: Duration::from_secs(180),
            accel: AccelChoice::Auto,
            reboots: 0,
            reboot_fio_args: Vec::new(),
            reconnect_s: 0,
        }
    }

    pub fn fio_job(mut self, job: impl Into<String>) -> Self {
        self.fio_job = Some(job.into());
        self
    }

    pub fn fio_arg(mut self, arg: impl Into<String>) -> Self {
        self.fio_args.push(arg.into());
        self
    }

    /// Adds a command run before fio.
    pub fn pre(mut self, name: &str, script: &str) -> Self {
        self.pre.push(GuestCommand {
            name: name.into(),
            script: script.into(),
        });
        self
    }

    /// Adds a command run after fio (or on its own when there is no fio job).
    pub fn cmd(mut self, name: &str, script: &str) -> Self {
        self.post.push(GuestCommand {
            name: name.into(),
            script: script.into(),
        });
        self
    }

    pub fn queues(mut self, queues: u32) -> Self {
        self.queues = queues;
        self
    }

    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }

    pub fn mem_mib(mut self, mem_mib: u32) -> Self {
        self.mem_mib = mem_mib;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn accel(mut self, accel: AccelChoice) -> Self {
        self.accel = accel;
        self
    }

    /// Reboots the guest `reboots` times; after the first boot fio gets `fio_args` instead.
    pub fn reboots(mut self, reboots: u32, fio_args: &[&str]) -> Self {
        self.reboots = reboots;
        self.reboot_fio_args = fio_args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// QEMU reconnects `seconds` after the server went away, so the guest outlives a server
    /// restart.
    pub fn reconnect(mut self, seconds: u32) -> Self {
        self.reconnect_s = seconds;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.fio_job.is_none() && self.pre.is_empty() && self.post.is_empty() {
            return bad("nothing to run: no fio job and no commands".into());
        }
        if self.queues == 0 || self.vcpus == 0 || self.mem_mib == 0 || self.timeout.is_zero() {
            return bad("queues, vcpus, mem_mib and timeout must be non-zero".into());
        }
        if self.reboots > 9 {
            return bad(format!("{} reboots: at most 9", self.reboots));
        }
        // The guest splits FIO_ARGS on whitespace.
        if let Some(arg) = self
            .fio_args
            .iter()
            .chain(&self.reboot_fio_args)
            .find(|a| a.is_empty() || a.contains(char::is_whitespace))
        {
            return bad(format!("fio argument {arg:?} must be one non-empty word"));
        }
        for command in self.pre.iter().chain(&self.post) {
            let name_ok = !command.name.is_empty()
                && command
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !name_ok {
                return bad(format!(
                    "command name {:?} must be of [A-Za-z0-9_.-]",
                    command.name
                ));
            }
        }
        Ok(())
    }
}

/// The accelerator a run used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accel(pub String);

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What one boot of the guest reported.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Boot {
    /// The guest's view of the disk (sysfs and a few more), as key=value.
    pub facts: BTreeMap<String, String>,
    /// fio's JSON document, when a fio job ran.
    pub fio: Option<Value>,
    /// fio's stderr.
    pub fio_log: String,
    pub commands: Vec<CommandOutput>,
}

impl Boot {
    pub fn fact(&self, key: &str) -> Result<&str, Error> {
        self.facts
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::MissingFact(key.into()))
    }

    pub fn fact_u64(&self, key: &str) -> Result<u64, Error> {
        let value = self.fact(key)?;
        value.trim().parse().map_err(|_| Error::BadFact {
            key: key.into(),
            value: value.into(),
        })
    }

    pub fn command(&self, name: &str) -> Result<&CommandOutput, Error> {
        self.commands
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| Error::MissingCommand(name.into()))
    }

    pub fn fio(&self) -> Result<&Value, Error> {
        self.fio.as_ref().ok_or(Error::NoFioResult)
    }
}

/// What a completed run reported. The accessors read the first boot.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestRun {
    pub accel: Accel,
    /// QEMU's wall time, boot to power-off.
    pub elapsed: Duration,
    pub first_boot: Boot,
    /// The boots after a guest reboot ([`VmConfig::reboots`]), in order.
    pub reboots: Vec<Boot>,
    /// The guest's serial console (kernel messages and /init's progress).
    pub console: String,
}

impl GuestRun {
    /// Every boot, first to last.
    pub fn boots(&self) -> impl Iterator<Item = &Boot> {
        std::iter::once(&self.first_boot).chain(&self.reboots)
    }

    pub fn fact(&self, key: &str) -> Result<&str, Error> {
        self.first_boot.fact(key)
    }

    pub fn fact_u64(&self, key: &str) -> Result<u64, Error> {
        self.first_boot.fact_u64(key)
    }

    pub fn command(&self, name: &str) -> Result<&CommandOutput, Error> {
        self.first_boot.command(name)
    }

    pub fn fio(&self) -> Result<&Value, Error> {
        self.first_boot.fio()
    }
}

/// The repository's `scripts/` folder.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts")
}

/// Where the guest is built: `$GUESTVM_DIR`, else `<repo>/build/guest`.
pub fn default_guest_dir() -> PathBuf {
    match std::env::var_os("GUESTVM_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/guest"),
    }
}

pub(crate) fn find_in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|dir| dir.join(program).is_file())
        })
        .unwrap_or(false)
}

/// What this machine lacks to build and boot the guest (empty when everything is there).
/// fio, busybox-static and util-linux are apt-installed by the build script when run as root,
/// so they count as missing only for other users.
pub fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    for tool in ["qemu-system-x86_64", "apt-get", "dpkg-deb", "bash", "flock"] {
        if !find_in_path(tool) {
            missing.push(tool.to_string());
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let is_root = unsafe { libc::geteuid() } == 0;
    if !is_root {
        for tool in ["fio", "blkdiscard"] {
            if !find_in_path(tool) {
                missing.push(tool.to_string());
            }
        }
        if !Path::new("/bin/busybox").is_file() {
            missing.push("busybox-static".to_string());
        }
    }
    missing
}

/// Builds the guest into `guest_dir` (nothing to do when it is up to date).
pub fn build_guest(guest_dir: &Path) -> Result<(), Error> {
    let output = Command::new("bash")
        .arg(scripts_dir().join("build-guest.sh"))
        .arg(guest_dir)
        .stdin(Stdio::null())
        .output()
        .map_err(io_error("cannot run scripts/build-guest.sh"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Build {
            status: output.status,
            log: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

/// Boots the guest once and returns what it reported. The guest must already be built
/// ([`build_guest`]). Prints the accelerator and timing of every run on stderr.
pub fn run(config: &VmConfig) -> Result<GuestRun, Error> {
    start(config)?.wait()
}

/// Starts the guest in the background: [`RunningVm::wait`] for what it reported.
pub fn start(config: &VmConfig) -> Result<RunningVm, Error> {
    config.validate()?;
    let work = tempfile::Builder::new()
        .prefix("guestvm-")
        .tempdir()
        .map_err(io_error("cannot create a temporary directory"))?;
    let console_path = work.path().join("console.log");
    let stdout_path = work.path().join("stdout");
    let stderr_path = work.path().join("stderr");

    let mut command = Command::new("bash");
    command
        .arg(scripts_dir().join("run-vm.sh"))
        .arg("--socket")
        .arg(&config.socket)
        .arg("--guest-dir")
        .arg(&config.guest_dir)
        .arg("--console-log")
        .arg(&console_path)
        .arg("--no-build")
        .args(["--queues", &config.queues.to_string()])
        .args(["--vcpus", &config.vcpus.to_string()])
        .args(["--mem", &format!("{}M", config.mem_mib)])
        .args(["--timeout", &config.timeout.as_secs().max(1).to_string()])
        .args(["--accel", config.accel.as_arg()])
        .args(["--reboots", &config.reboots.to_string()])
        .args(["--reconnect", &config.reconnect_s.to_string()]);
    if let Some(job) = &config.fio_job {
        let job_path = work.path().join("job.fio");
        fs::write(&job_path, job).map_err(io_error("cannot write the fio job"))?;
        command.arg("--job").arg(job_path);
    }
    if !config.fio_args.is_empty() {
        command.args(["--fio-args", &config.fio_args.join(" ")]);
    }
    if !config.reboot_fio_args.is_empty() {
        command.args(["--reboot-fio-args", &config.reboot_fio_args.join(" ")]);
    }
    for (flag, commands) in [("--pre", &config.pre), ("--cmd", &config.post)] {
        for c in commands {
            command.arg(flag).arg(format!("{}={}", c.name, c.script));
        }
    }
    // Files, not pipes: a full pipe would stall the script while we only poll for its exit.
    let stdout = fs::File::create(&stdout_path).map_err(io_error("cannot create stdout file"))?;
    let stderr = fs::File::create(&stderr_path).map_err(io_error("cannot create stderr file"))?;
    command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        // Own process group, so a deadline kill takes QEMU down with the script.
        .process_group(0);
    let child = command
        .spawn()
        .map_err(io_error("cannot run scripts/run-vm.sh"))?;
    Ok(RunningVm {
        config: config.clone(),
        child: Some(child),
        work,
        started: Instant::now(),
    })
}

/// A VM started by [`start`]. Dropping it before it finished kills it (QEMU included).
pub struct RunningVm {
    config: VmConfig,
    child: Option<std::process::Child>,
    work: tempfile::TempDir,
    started: Instant,
}

impl RunningVm {
    /// Whether the VM (run-vm.sh) has exited.
    pub fn is_finished(&mut self) -> bool {
        !matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The last `lines` lines of the guest's console so far, for a test's failure message.
    pub fn console_tail(&self, lines: usize) -> String {
        let console = fs::read_to_string(self.work.path().join("console.log")).unwrap_or_default();
        tail(&console, lines)
    }

    /// Waits for the run to end (killing it at its deadline) and returns what the guest
    /// reported.
    pub fn wait(mut self) -> Result<GuestRun, Error> {
        let config = &self.config;
        let console_path = self.work.path().join("console.log");
        let stdout_path = self.work.path().join("stdout");
        let stderr_path = self.work.path().join("stderr");
        let Some(mut child) = self.child.take() else {
            return Err(io_error("run-vm.sh")(std::io::Error::other(
                "already waited for",
            )));
        };
        let deadline = config.timeout + SCRIPT_GRACE;
        let start = self.started;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if start.elapsed() > deadline => {
                    kill_process_group(child.id());
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    kill_process_group(child.id());
                    let _ = child.wait();
                    return Err(io_error("cannot wait for run-vm.sh")(e));
                }
            }
        };

        let stdout = fs::read_to_string(&stdout_path).unwrap_or_default();
        let diagnostics = fs::read_to_string(&stderr_path).unwrap_or_default();
        let console = fs::read_to_string(&console_path).unwrap_or_default();
        let Some(status) = status else {
            return Err(Error::VmFailed {
                kind: FailureKind::Timeout,
                accel: "unknown".into(),
                reason: format!("run-vm.sh did not exit within {deadline:?}; killed"),
                diagnostics: format!("{diagnostics}\nconsole:\n{}", tail(&console, 40)),
                partial: None,
            });
        };
        // Exit 2: the script rejected its arguments; no summary was printed.
        if !stdout.contains("\nstatus=") && !stdout.starts_with("status=") {
            return Err(Error::Script {
                status,
                log: diagnostics,
            });
        }
        let report = report::parse(&stdout).map_err(|source| Error::Parse {
            source,
            diagnostics: diagnostics.clone(),
        })?;
        let accel = report.summary.accel.clone();
        let elapsed =
            Duration::from_secs_f64(report.summary.elapsed_seconds.unwrap_or(0.0).max(0.0));
        eprintln!(
            "guestvm: accel={accel} vcpus={} queues={} elapsed={:.1}s status={}",
            config.vcpus,
            config.queues,
            elapsed.as_secs_f64(),
            report.summary.status
        );

        let mut boots = report.boots.iter().map(|b| Boot {
            facts: b.facts.clone(),
            fio: b.fio.as_ref().and_then(|f| f.json.clone()),
            fio_log: b.fio_log.clone().unwrap_or_default(),
            commands: b.commands.clone(),
        });
        let run = GuestRun {
            accel: Accel(accel.clone()),
            elapsed,
            first_boot: boots.next().unwrap_or_default(),
            reboots: boots.collect(),
            console,
        };
        let fail = |kind: FailureKind, reason: String| {
            Err(Error::VmFailed {
                kind,
                accel: accel.clone(),
                reason,
                diagnostics: diagnostics.clone(),
                partial: Some(Box::new(run.clone())),
            })
        };
        let kind = match report.summary.status.as_str() {
            "ok" => None,
            "timeout" => Some(FailureKind::Timeout),
            "panic" => Some(FailureKind::KernelPanic),
            "qemu" => Some(FailureKind::Qemu),
            "guest-error" => Some(FailureKind::GuestError),
            "fio" => Some(FailureKind::Fio),
            _ => Some(FailureKind::MissingOutput),
        };
        if let Some(kind) = kind {
            return fail(kind, report.summary.reason.clone());
        }
        if !status.success() {
            return fail(
                FailureKind::MissingOutput,
                format!("run-vm.sh said ok but exited with {status}"),
            );
        }
        // The script checked the markers; check what only the parsed report shows.
        if !report.done {
            return fail(FailureKind::MissingOutput, "no DONE marker".into());
        }
        let expected_boots = config.reboots as usize + 1;
        if report.boots.len() != expected_boots {
            return fail(
                FailureKind::MissingOutput,
                format!("{} of {expected_boots} boots reported", report.boots.len()),
            );
        }
        let expected_commands = config.pre.len() + config.post.len();
        for (i, boot) in report.boots.iter().enumerate() {
            if !boot.facts_seen {
                return fail(
                    FailureKind::MissingOutput,
                    format!("boot {i}: no facts section"),
                );
            }
            if boot.commands.len() != expected_commands {
                return fail(
                    FailureKind::MissingOutput,
                    format!(
                        "boot {i}: {} of {expected_commands} commands reported",
                        boot.commands.len()
                    ),
                );
            }
            if config.fio_job.is_none() {
                continue;
            }
            let log = boot.fio_log.as_deref().unwrap_or_default();
            match &boot.fio {
                Some(report::FioOutput {
                    exit_code: 0,
                    json: Some(json),
                    ..
                }) => {
                    let errors = fio_job_errors(json);
                    if !errors.is_empty() || fio_job_count(json) == 0 {
                        return fail(
                            FailureKind::Fio,
                            format!("boot {i}: fio jobs failed: {errors:?}\n{log}"),
                        );
                    }
                }
                other => {
                    return fail(
                        FailureKind::Fio,
                        format!(
                            "boot {i}: fio exit code {:?}, JSON present: {}\n{log}",
                            other.as_ref().map(|f| f.exit_code),
                            other.as_ref().is_some_and(|f| f.json.is_some())
                        ),
                    );
                }
            }
        }
        Ok(run)
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if !matches!(child.try_wait(), Ok(Some(_))) {
                kill_process_group(child.id());
                let _ = child.wait();
            }
        }
    }
}

fn kill_process_group(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) on the process group of a child we spawned with process_group(0) and
    // have not reaped yet, so the group id is still ours.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig::new("/nonexistent.sock", "/nonexistent").cmd("a", "true")
    }

    #[test]
    fn config_without_work_is_rejected() {
        let err = VmConfig::new("/s", "/g").validate().unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    }

    #[test]
    fn config_rejects_bad_command_names_and_fio_args() {
        assert!(config().validate().is_ok());
        assert!(matches!(
            config().cmd("has space", "true").validate(),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            config().pre("a=b", "true").validate(),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            config().fio_arg("--a --b").validate(),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            config().queues(0).validate(),
            Err(Error::InvalidConfig(_))
        ));
    }

    #[test]
    fn run_with_a_missing_socket_fails_before_booting() {
        // run-vm.sh checks its arguments before QEMU: exit 2, no summary.
        let err = run(&config()).unwrap_err();
        assert!(matches!(err, Error::Script { .. }), "{err}");
        assert!(err.to_string().contains("not a unix socket"), "{err}");
    }

    #[test]
    fn guest_run_accessors() {
        let run = GuestRun {
            accel: Accel("tcg".into()),
            elapsed: Duration::from_secs(1),
            first_boot: Boot {
                facts: BTreeMap::from([
                    ("size_bytes".to_string(), "4096".to_string()),
                    ("serial".to_string(), "x".to_string()),
                ]),
                fio: None,
                fio_log: String::new(),
                commands: vec![CommandOutput {
                    name: "c".into(),
                    output: "out\n".into(),
                    exit_code: 1,
                }],
            },
            reboots: vec![Boot::default()],
            console: String::new(),
        };
        assert_eq!(run.boots().count(), 2);
        assert_eq!(run.fact_u64("size_bytes").unwrap(), 4096);
        assert!(matches!(run.fact_u64("serial"), Err(Error::BadFact { .. })));
        assert!(matches!(run.fact("nope"), Err(Error::MissingFact(_))));
        assert_eq!(run.command("c").unwrap().exit_code, 1);
        assert!(matches!(run.command("d"), Err(Error::MissingCommand(_))));
        assert!(matches!(run.fio(), Err(Error::NoFioResult)));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
