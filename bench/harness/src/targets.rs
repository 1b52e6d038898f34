//! The systems under test and how each is started, pinned and stopped.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::BenchError;

/// A target: a server with a backend, or the host itself (fio on the image, no virtualization).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    #[serde(rename = "uringblk-file")]
    UringblkFile,
    #[serde(rename = "uringblk-null")]
    UringblkNull,
    #[serde(rename = "qsd-file")]
    QsdFile,
    #[serde(rename = "qsd-null")]
    QsdNull,
    #[serde(rename = "host")]
    Host,
    /// A Ceph RBD image (the cluster of --ceph-conf, or scripts/ceph-cluster.sh's).
    #[serde(rename = "uringblk-rbd")]
    UringblkRbd,
    #[serde(rename = "qsd-rbd")]
    QsdRbd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Uringblk,
    Qsd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    File,
    Null,
    Rbd,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::File => "file",
            Backend::Null => "null",
            Backend::Rbd => "rbd",
        }
    }
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::UringblkFile,
        Target::QsdFile,
        Target::Host,
        Target::UringblkNull,
        Target::QsdNull,
        Target::UringblkRbd,
        Target::QsdRbd,
    ];

    /// What runs without --targets: everything but the RBD targets, which need a Ceph cluster
    /// (`--targets uringblk-rbd,qsd-rbd` starts scripts/ceph-cluster.sh's unless --ceph-conf).
    pub const DEFAULT: [Target; 5] = [
        Target::UringblkFile,
        Target::QsdFile,
        Target::Host,
        Target::UringblkNull,
        Target::QsdNull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::UringblkFile => "uringblk-file",
            Target::UringblkNull => "uringblk-null",
            Target::QsdFile => "qsd-file",
            Target::QsdNull => "qsd-null",
            Target::Host => "host",
            Target::UringblkRbd => "uringblk-rbd",
            Target::QsdRbd => "qsd-rbd",
        }
    }

    /// `None` for the host target, which has no server.
    pub fn server(self) -> Option<Server> {
        match self {
            Target::UringblkFile | Target::UringblkNull | Target::UringblkRbd => {
                Some(Server::Uringblk)
            }
            Target::QsdFile | Target::QsdNull | Target::QsdRbd => Some(Server::Qsd),
            Target::Host => None,
        }
    }

    pub fn backend(self) -> Backend {
        match self {
            Target::UringblkNull | Target::QsdNull => Backend::Null,
            Target::UringblkRbd | Target::QsdRbd => Backend::Rbd,
            _ => Backend::File,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
                BenchError::Usage(format!("unknown target {s:?}; known: {}", known.join(", ")))
            })
    }
}

/// Everything needed to build a server's command line.
#[derive(Debug, Clone)]
pub struct ServerSetup<'a> {
    pub uringblk: &'a Path,
    pub qsd: &'a Path,
    pub image: &'a Path,
    /// Size of the null backends, equal to the image size so that offsets match.
    pub null_size: u64,
    pub socket: &'a Path,
    pub queues: u32,
    pub iothreads: u32,
    pub cpus: &'a [usize],
    /// The RBD targets' image.
    pub rbd: Option<&'a RbdSetup>,
}

/// Where the RBD targets' image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSetup {
    pub conf: PathBuf,
    pub pool: String,
    pub image: String,
}

pub fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// QEMU's option syntax separates keys with commas; a literal comma in a value is doubled.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// An RBD target without a cluster: the harness sets one up before any run (main.rs).
fn missing_rbd() -> RbdSetup {
    RbdSetup {
        conf: PathBuf::from("/etc/ceph/ceph.conf"),
        pool: "rbd".into(),
        image: "uringblk-bench".into(),
    }
}

/// The full argv (starting with `taskset`) that starts `server` pinned to `setup.cpus`.
pub fn server_command(server: Server, backend: Backend, setup: &ServerSetup<'_>) -> Vec<String> {
    let mut argv = vec!["taskset".into(), "-c".into(), cpu_list(setup.cpus)];
    let socket = setup.socket.display().to_string();
    let image = setup.image.display().to_string();
    match server {
        Server::Uringblk => {
            argv.push(setup.uringblk.display().to_string());
            argv.extend(["--socket".into(), socket]);
            match backend {
                Backend::File => argv.extend(["--image".into(), image]),
                Backend::Null => argv.extend(["--null".into(), setup.null_size.to_string()]),
                Backend::Rbd => {
                    let rbd = setup.rbd.cloned().unwrap_or_else(missing_rbd);
                    argv.extend([
                        "--rbd".into(),
                        format!("{}/{}", rbd.pool, rbd.image),
                        "--ceph-conf".into(),
                        rbd.conf.display().to_string(),
                    ]);
                }
            }
            argv.extend([
                "--queues".into(),
                setup.queues.to_string(),
                "--iothreads".into(),
                setup.iothreads.to_string(),
                "--cpus".into(),
                cpu_list(setup.cpus),
            ]);
        }
        Server::Qsd => {
            argv.push(setup.qsd.display().to_string());
            let blockdev = match backend {
                Backend::File => format!(
                    "driver=file,node-name=disk0,filename={},cache.direct=on,aio=io_uring",
                    qemu_escape(&image)
                ),
                Backend::Null => format!("driver=null-co,node-name=disk0,size={}", setup.null_size),
                // cache.direct=on: rbd_cache=false, as uringblk runs librbd.
                Backend::Rbd => {
                    let rbd = setup.rbd.cloned().unwrap_or_else(missing_rbd);
                    format!(
                        "driver=rbd,node-name=disk0,pool={},image={},conf={},cache.direct=on",
                        qemu_escape(&rbd.pool),
                        qemu_escape(&rbd.image),
                        qemu_escape(&rbd.conf.display().to_string())
                    )
                }
            };
            argv.extend([
                "--object".into(),
                // An export is served by one iothread: the only layout QEMU 7.2 offers.
                "iothread,id=io0".into(),
                "--blockdev".into(),
                blockdev,
                "--export".into(),
                format!(
                    "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},\
                     writable=on,num-queues={},iothread=io0",
                    qemu_escape(&socket),
                    setup.queues
                ),
            ]);
        }
    }
    argv
}

/// A running server. Killed if dropped without `stop()`.
pub struct ServerProcess {
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    pub argv: Vec<String>,
}

const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// The socket file appears at bind(); listen() follows at once, but give it a moment.
const SETTLE: Duration = Duration::from_millis(100);

impl ServerProcess {
    /// Starts `argv` with stdout and stderr in `log_dir/<name>.{out,err}`, and waits until it has
    /// created `socket`.
    pub fn start(
        argv: Vec<String>,
        socket: &Path,
        log_dir: &Path,
        name: &str,
    ) -> Result<ServerProcess, BenchError> {
        let stdout_path = log_dir.join(format!("{name}.out"));
        let stderr_path = log_dir.join(format!("{name}.err"));
        let stdout = File::create(&stdout_path).map_err(|e| BenchError::io(&stdout_path, e))?;
        let stderr = File::create(&stderr_path).map_err(|e| BenchError::io(&stderr_path, e))?;
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| BenchError::Usage("empty server command".into()))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| BenchError::io(program, e))?;
        let mut server = ServerProcess {
            child,
            stdout_path,
            stderr_path,
            argv,
        };
        let start = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(BenchError::Server(format!(
                    "{} exited before listening ({status}): {}",
                    server.argv.join(" "),
                    server.stderr_tail()
                )));
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(BenchError::Server(format!(
                    "{} created no socket in {START_TIMEOUT:?}: {}",
                    server.argv.join(" "),
                    server.stderr_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(SETTLE);
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the server is still running (it must be, after a client run).
    pub fn check_alive(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Server(format!(
                "server exited during the run ({status}): {}",
                self.stderr_tail()
            ))),
            Err(e) => Err(BenchError::Server(format!("cannot query the server: {e}"))),
        }
    }

    /// SIGTERM, then wait (SIGKILL after a timeout). Returns the exit status and what the server
    /// printed on stdout (uringblk prints its final stats as JSON there).
    pub fn stop(mut self) -> Result<(ExitStatus, String), BenchError> {
        let status = self.terminate()?;
        let stdout = std::fs::read_to_string(&self.stdout_path).unwrap_or_default();
        Ok((status, stdout))
    }

    fn terminate(&mut self) -> Result<ExitStatus, BenchError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|_| BenchError::Server("pid out of range".into()))?;
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet (try_wait
        // above returned None), so the pid cannot have been reused.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if start.elapsed() > STOP_TIMEOUT => {
                    let _ = self.child.kill();
                    let status = self
                        .child
                        .wait()
                        .map_err(|e| BenchError::Server(format!("wait after SIGKILL: {e}")))?;
                    return Err(BenchError::Server(format!(
                        "server ignored SIGTERM for {STOP_TIMEOUT:?}, killed ({status})"
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(BenchError::Server(format!("wait: {e}"))),
            }
        }
    }

    /// The last lines of the server's stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join(" | ")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup<'a>(cpus: &'a [usize], image: &'a Path) -> ServerSetup<'a> {
        ServerSetup {
            uringblk: Path::new("/bin/uringblk"),
            qsd: Path::new("/usr/bin/qemu-storage-daemon"),
            image,
            null_size: 1 << 30,
            socket: Path::new("/tmp/x/s.sock"),
            queues: 2,
            iothreads: 1,
            cpus,
            rbd: None,
        }
    }

    #[test]
    fn target_names_round_trip() {
        for t in Target::ALL {
            assert_eq!(t.name().parse::<Target>().unwrap(), t);
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                format!("\"{}\"", t.name())
            );
        }
        assert!("nope".parse::<Target>().is_err());
    }

    #[test]
    fn uringblk_file_command_is_pinned_and_sized() {
        let argv = server_command(
            Server::Uringblk,
            Backend::File,
            &setup(&[1], Path::new("/img")),
        );
        assert_eq!(
            argv.join(" "),
            "taskset -c 1 /bin/uringblk --socket /tmp/x/s.sock --image /img \
             --queues 2 --iothreads 1 --cpus 1"
        );
    }

    #[test]
    fn uringblk_null_uses_the_image_size() {
        let argv = server_command(
            Server::Uringblk,
            Backend::Null,
            &setup(&[1, 0], Path::new("/img")),
        );
        let line = argv.join(" ");
        assert!(line.starts_with("taskset -c 1,0 "), "{line}");
        assert!(line.contains("--null 1073741824"), "{line}");
        assert!(line.ends_with("--cpus 1,0"), "{line}");
    }

    #[test]
    fn qsd_file_export_matches_the_issue() {
        let argv = server_command(
            Server::Qsd,
            Backend::File,
            &setup(&[1], Path::new("/a,b.img")),
        );
        assert_eq!(
            &argv[..4],
            ["taskset", "-c", "1", "/usr/bin/qemu-storage-daemon"]
        );
        assert_eq!(
            argv[argv.iter().position(|a| a == "--blockdev").unwrap() + 1],
            "driver=file,node-name=disk0,filename=/a,,b.img,cache.direct=on,aio=io_uring"
        );
        let export = &argv[argv.iter().position(|a| a == "--export").unwrap() + 1];
        assert!(export.contains("num-queues=2,iothread=io0"), "{export}");
        assert!(export.contains("addr.path=/tmp/x/s.sock,"), "{export}");
        assert!(argv.contains(&"iothread,id=io0".to_string()));
    }

    #[test]
    fn qsd_null_uses_null_co() {
        let argv = server_command(Server::Qsd, Backend::Null, &setup(&[1], Path::new("/img")));
        assert!(argv.contains(&"driver=null-co,node-name=disk0,size=1073741824".to_string()));
    }
}
