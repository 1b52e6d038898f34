//! One line of `bench/results/raw/<run-id>.jsonl`: everything about one run, failed or not.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clients::{ClientKind, ServerCpu};
use crate::matrix::{Job, Phase};
use crate::measurement::Measurement;
use crate::targets::Target;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    /// 1-based number of the run, in the order runs were made (runs made again included).
    pub seq: usize,
    pub phase: Phase,
    pub target: Target,
    pub client: ClientKind,
    pub job: Job,
    pub queues: u32,
    pub iothreads: u32,
    pub server_cpus: Vec<usize>,
    pub client_cpus: Vec<usize>,
    pub rep: u32,
    pub started_at: String,
    pub measurement: Option<Measurement>,
    pub server_cpu: Option<ServerCpu>,
    /// The share of the machine's CPU time the hypervisor took (steal) while the run lasted,
    /// server start to stop: a VM's neighbours show here, and they slow every target.
    #[serde(default)]
    pub host_steal: Option<f64>,
    /// Round trip of a cache line between the client's and the server's first CPUs, in ns,
    /// the larger of the figures taken just before and just after the run (placement.rs): how
    /// far apart the hypervisor had put the two vCPUs. `None` where it could not be measured.
    #[serde(default)]
    pub cpu_round_trip_ns: Option<f64>,
    /// Why this run was left out of the results and made again (steal_guard.rs); `None` for a
    /// run that counts.
    #[serde(default)]
    pub discarded: Option<String>,
    /// Why the run failed; `None` for a good run.
    pub error: Option<String>,
    /// Things that went wrong without spoiling the measurement (e.g. an unclean server exit).
    #[serde(default)]
    pub warnings: Vec<String>,
    pub server_argv: Option<Vec<String>>,
    pub client_argv: Vec<String>,
    /// What the server printed on stdout at exit (uringblk: final stats JSON), if JSON.
    pub server_stats: Option<Value>,
    pub client_report: Value,
    /// The VM accelerator (kvm or tcg) of a guest fio run.
    #[serde(default)]
    pub accelerator: Option<String>,
}

impl RunRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.measurement.is_some()
    }

    /// Server CPUs kept busy on average during the measured window (1.0 = one full core).
    pub fn server_cores_busy(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (cpu.wall_s > 0.0).then(|| cpu.cpu_s / cpu.wall_s)
    }

    /// I/Os completed per second of server CPU time: the efficiency figure.
    pub fn iops_per_server_cpu_s(&self) -> Option<f64> {
        let iops = self.measurement.as_ref()?.iops;
        let busy = self.server_cores_busy()?;
        (busy > 0.0).then(|| iops / busy)
    }
}

/// A good run of `target` with the given IOPS and (cpu_s, wall_s), for tests.
#[cfg(test)]
pub(crate) fn sample_record(target: Target, iops: f64, cpu: Option<(f64, f64)>) -> RunRecord {
    use crate::matrix::default_jobs;
    RunRecord {
        run_id: "r".into(),
        seq: 1,
        phase: Phase::Matrix,
        target,
        client: ClientKind::Loadgen,
        job: default_jobs()[0].clone(),
        queues: 1,
        iothreads: 1,
        server_cpus: vec![1],
        client_cpus: vec![0],
        rep: 1,
        started_at: "t".into(),
        measurement: Some(Measurement {
            iops,
            mib_per_s: 0.0,
            lat_mean_us: 0.0,
            lat_p50_us: 0.0,
            lat_p99_us: 0.0,
            lat_p99_9_us: 0.0,
            ios: 0,
            runtime_s: 1.0,
        }),
        server_cpu: cpu.map(|(cpu_s, wall_s)| ServerCpu { cpu_s, wall_s }),
        host_steal: None,
        cpu_round_trip_ns: None,
        discarded: None,
        error: None,
        warnings: vec![],
        server_argv: None,
        client_argv: vec![],
        server_stats: None,
        client_report: Value::Null,
        accelerator: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(iops: f64, cpu: Option<(f64, f64)>) -> RunRecord {
        sample_record(Target::QsdNull, iops, cpu)
    }

    #[test]
    fn efficiency_divides_by_busy_cores() {
        let r = record(100_000.0, Some((1.0, 2.0)));
        assert_eq!(r.server_cores_busy(), Some(0.5));
        assert_eq!(r.iops_per_server_cpu_s(), Some(200_000.0));
    }

    #[test]
    fn no_server_or_idle_server_gives_no_efficiency() {
        assert_eq!(record(1.0, None).iops_per_server_cpu_s(), None);
        assert_eq!(record(1.0, Some((0.0, 1.0))).iops_per_server_cpu_s(), None);
        assert_eq!(record(1.0, Some((1.0, 0.0))).server_cores_busy(), None);
    }

    #[test]
    fn records_round_trip_through_json() {
        let r = record(5.0, Some((1.0, 1.0)));
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<RunRecord>(&line).unwrap(), r);
    }
}
