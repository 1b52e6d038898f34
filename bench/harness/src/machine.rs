//! A description of the machine a run happened on, for the README and latest.json.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub cpu_model: String,
    pub cpus_online: usize,
    /// CPUs this process may run on (what the scaling sweep can use).
    pub cpus_available: Vec<usize>,
    pub kernel: String,
    pub memory_gib: f64,
    /// `findmnt` of the image: device and filesystem under the benchmark.
    pub image_filesystem: String,
    pub fio_version: String,
    pub qsd_version: String,
    pub uringblk_revision: String,
    /// /proc/loadavg before the first run and after the last: others' load shows here.
    pub loadavg_start: String,
    pub loadavg_end: String,
}

/// The first "model name" of /proc/cpuinfo.
pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// MemTotal of /proc/meminfo in GiB.
pub fn parse_mem_total_gib(meminfo: &str) -> Option<f64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

/// CPUs in this process's affinity mask.
pub fn available_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 means this thread; the size matches the set passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..n).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the capacity of `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

fn first_line_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

pub fn collect(image: &Path, fio: &Path, qsd: &Path, repo: &Path) -> MachineInfo {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let fs = first_line_of(
        "findmnt",
        &[
            "-n",
            "-o",
            "SOURCE,FSTYPE",
            "-T",
            &image.display().to_string(),
        ],
    );
    let revision = first_line_of(
        "git",
        &[
            "-C",
            &repo.display().to_string(),
            "describe",
            "--always",
            "--dirty",
        ],
    );
    MachineInfo {
        cpu_model: parse_cpu_model(&read("/proc/cpuinfo")).unwrap_or_else(|| "unknown".into()),
        cpus_online: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpus_available: available_cpus(),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        memory_gib: parse_mem_total_gib(&read("/proc/meminfo")).unwrap_or(0.0),
        image_filesystem: fs.split_whitespace().collect::<Vec<_>>().join(" "),
        fio_version: first_line_of(&fio.display().to_string(), &["--version"]),
        qsd_version: first_line_of(&qsd.display().to_string(), &["--version"]),
        uringblk_revision: revision,
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_model_and_memory_from_proc_text() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n";
        assert_eq!(parse_cpu_model(cpuinfo).as_deref(), Some("AMD EPYC"));
        assert_eq!(parse_cpu_model("nothing"), None);
        let meminfo = "MemTotal:       24684092 kB\nMemFree:        23331072 kB\n";
        let gib = parse_mem_total_gib(meminfo).unwrap();
        assert!((gib - 23.54).abs() < 0.01, "{gib}");
    }

    #[test]
    fn this_process_may_run_somewhere() {
        assert!(!available_cpus().is_empty());
    }
}
