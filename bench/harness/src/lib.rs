//! The benchmark harness behind `bench/run.sh`: it starts each target (uringblk,
//! qemu-storage-daemon, or nothing for the host), pinned, runs a client against it, repeats
//! every point alternating targets, and turns the raw runs into tables, charts and the results
//! section of bench/README.md.

pub mod charts;
pub mod clients;
pub mod image;
pub mod machine;
pub mod matrix;
pub mod measurement;
pub mod placement;
pub mod procstat;
pub mod rbd;
pub mod record;
pub mod report;
pub mod runner;
pub mod stats;
pub mod steal_guard;
pub mod targets;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse error: {0}")]
    Parse(String),
    #[error("client: {0}")]
    Client(String),
    #[error("server: {0}")]
    Server(String),
    #[error("{0}")]
    Usage(String),
    #[error("chart: {0}")]
    Chart(String),
}

impl BenchError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> BenchError {
        BenchError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}
