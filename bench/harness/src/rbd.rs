//! The RBD targets' cluster and image: the cluster of --ceph-conf, or a single-node one that
//! scripts/ceph-cluster.sh starts for the run (and stops when the returned guard drops); the
//! image is created and filled (sequential 4 MiB writes, so that reads hit real objects) if
//! it does not exist.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::targets::RbdSetup;
use crate::BenchError;

/// Stops the cluster the harness started.
pub struct ClusterGuard {
    dir: PathBuf,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg("scripts/ceph-cluster.sh")
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

fn rbd(conf: &Path, args: &[&str]) -> Result<std::process::Output, BenchError> {
    Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .map_err(|e| BenchError::io("rbd", e))
}

/// Sets up the cluster and the image `spec` (POOL/IMAGE) of `size` bytes.
pub fn prepare(
    conf: Option<&Path>,
    spec: &str,
    size: u64,
) -> Result<(RbdSetup, Option<ClusterGuard>), BenchError> {
    let (pool, image) = spec
        .split_once('/')
        .filter(|(p, i)| !p.is_empty() && !i.is_empty())
        .ok_or_else(|| BenchError::Usage(format!("--rbd-image {spec:?} is not POOL/IMAGE")))?;
    let (conf, guard) = match conf {
        Some(conf) => (conf.to_path_buf(), None),
        None => {
            let dir = std::env::current_dir()
                .map_err(|e| BenchError::io(".", e))?
                .join("bench/work/ceph");
            // A cluster a crashed run left behind.
            let _ = Command::new("bash")
                .arg("scripts/ceph-cluster.sh")
                .arg("stop")
                .arg(&dir)
                .status();
            eprintln!(
                "uringblk-bench: starting a single-node Ceph cluster in {}",
                dir.display()
            );
            let status = Command::new("bash")
                .arg("scripts/ceph-cluster.sh")
                .arg("start")
                .arg(&dir)
                .status()
                .map_err(|e| BenchError::io("scripts/ceph-cluster.sh", e))?;
            if !status.success() {
                return Err(BenchError::Server(format!(
                    "scripts/ceph-cluster.sh start failed ({status}); give --ceph-conf or \
                     install Ceph (scripts/install-deps.sh)"
                )));
            }
            (dir.join("ceph.conf"), Some(ClusterGuard { dir }))
        }
    };
    if !rbd(&conf, &["info", spec])?.status.success() {
        let out = rbd(
            &conf,
            &["create", spec, "--size", &format!("{}M", size >> 20)],
        )?;
        if !out.status.success() {
            return Err(BenchError::Server(format!(
                "rbd create {spec}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        eprintln!("uringblk-bench: filling {spec} ({} MiB)", size >> 20);
        let total = size.to_string();
        let out = rbd(
            &conf,
            &[
                "bench",
                "--io-type",
                "write",
                "--io-size",
                "4M",
                "--io-pattern",
                "seq",
                "--io-total",
                &total,
                spec,
            ],
        )?;
        if !out.status.success() {
            return Err(BenchError::Server(format!(
                "rbd bench (fill) {spec}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok((
        RbdSetup {
            conf,
            pool: pool.into(),
            image: image.into(),
        },
        guard,
    ))
}
