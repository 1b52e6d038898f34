//! A single-node Ceph cluster for the RBD tests: scripts/ceph-cluster.sh starts one per test
//! binary (on first use, shared by its tests) and stops it when the binary exits. Images are
//! made and removed with the `rbd` tool. Without Ceph's packages the tests print SKIPPED (and
//! fail under CI=true, where scripts/install-deps.sh must have installed them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use guestvm::testing::tool_or_skip;

const HINT: &str = "apt-get install ceph-mon ceph-osd ceph-common (scripts/install-deps.sh)";

/// The running cluster of this test binary.
pub struct Cluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-cluster.sh")
}

extern "C" fn stop_at_exit() {
    if let Some(Some(cluster)) = CLUSTER.get() {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&cluster.dir)
            .status();
    }
}

/// The cluster, started on first use; None (after printing SKIPPED) when Ceph is missing.
pub fn cluster(test: &str) -> Option<&'static Cluster> {
    for tool in ["ceph-mon", "ceph-osd", "rbd"] {
        if !tool_or_skip(test, tool, HINT) {
            return None;
        }
    }
    CLUSTER
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("uringblk-ceph-{}", std::process::id()));
            let out = Command::new("bash")
                .arg(script())
                .arg("start")
                .arg(&dir)
                .output()
                .expect("run scripts/ceph-cluster.sh");
            assert!(
                out.status.success(),
                "scripts/ceph-cluster.sh start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // SAFETY: registers a plain extern "C" fn with no arguments; it runs at exit.
            unsafe { libc::atexit(stop_at_exit) };
            Some(Cluster {
                conf: dir.join("ceph.conf"),
                dir,
            })
        })
        .as_ref()
}

impl Cluster {
    pub fn conf_arg(&self) -> &str {
        self.conf.to_str().expect("UTF-8 path")
    }

    /// `rbd -c CONF ARGS`, which must succeed.
    pub fn rbd(&self, args: &[&str]) -> Output {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("run rbd");
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A new image of `size` (e.g. "64M") in pool `rbd`, removed when dropped.
    pub fn image(&self, size: &str) -> RbdImage<'_> {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.rbd(&["create", &format!("rbd/{name}"), "--size", size]);
        RbdImage {
            cluster: self,
            name,
        }
    }

    /// The OSD's pid (for the outage test).
    pub fn osd_pid(&self) -> i32 {
        let pid = std::fs::read_to_string(self.dir.join("run/osd.0.pid")).expect("OSD pid file");
        pid.trim().parse().expect("OSD pid")
    }
}

pub struct RbdImage<'a> {
    pub cluster: &'a Cluster,
    pub name: String,
}

impl RbdImage<'_> {
    /// "rbd/NAME", as --rbd takes it.
    pub fn spec(&self) -> String {
        format!("rbd/{}", self.name)
    }

    /// The image's content now (rbd export), in a file of the caller's directory.
    pub fn export(&self, to: &Path) -> PathBuf {
        let path = to.join(format!("{}.raw", self.name));
        let _ = std::fs::remove_file(&path);
        self.cluster
            .rbd(&["export", &self.spec(), path.to_str().expect("UTF-8 path")]);
        path
    }

    pub fn size(&self) -> u64 {
        let out = self
            .cluster
            .rbd(&["info", "--format", "json", &self.spec()]);
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rbd info JSON");
        info["size"].as_u64().expect("size")
    }
}

impl Drop for RbdImage<'_> {
    fn drop(&mut self) {
        // Snapshots first; failures (an image a test left open) are not the test's result.
        let _ = Command::new("rbd")
            .arg("-c")
            .arg(&self.cluster.conf)
            .args(["snap", "purge", &self.spec()])
            .output();
        let _ = Command::new("rbd")
            .arg("-c")
            .arg(&self.cluster.conf)
            .args(["rm", &self.spec()])
            .output();
    }
}
