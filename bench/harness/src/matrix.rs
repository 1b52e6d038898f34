//! The job matrix and the order runs happen in.

use serde::{Deserialize, Serialize};
use uringblk_loadgen::RwPattern;

use crate::targets::Target;
use crate::BenchError;

/// One workload, identical for every target and client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Stable name used in tables, charts and raw records, e.g. `randread-4k-qd32`.
    pub name: String,
    pub pattern: RwPattern,
    pub block_size: u64,
    /// In flight per queue.
    pub iodepth: u32,
    pub rwmixread: u8,
}

impl Job {
    fn new(pattern: RwPattern, block_size: u64, iodepth: u32) -> Job {
        let kib = block_size / 1024;
        let name = match pattern {
            RwPattern::RandRw => format!("randrw70-{kib}k-qd{iodepth}"),
            _ => format!("{pattern}-{kib}k-qd{iodepth}"),
        };
        Job {
            name,
            pattern,
            block_size,
            iodepth,
            rwmixread: 70,
        }
    }
}

/// The issue's matrix: QD1 latency, QD32 random 4k, QD8 sequential 128k, a 70/30 mix.
pub fn default_jobs() -> Vec<Job> {
    vec![
        Job::new(RwPattern::RandRead, 4096, 1),
        Job::new(RwPattern::RandRead, 4096, 32),
        Job::new(RwPattern::RandWrite, 4096, 32),
        Job::new(RwPattern::Read, 128 * 1024, 8),
        Job::new(RwPattern::Write, 128 * 1024, 8),
        Job::new(RwPattern::RandRw, 4096, 32),
    ]
}

/// The workload of the scaling sweep: 4k random reads, QD32 per queue.
pub fn scaling_job() -> Job {
    Job::new(RwPattern::RandRead, 4096, 32)
}

/// Keeps the default jobs whose names are listed (all of them for `None`).
pub fn select_jobs(names: Option<&[String]>) -> Result<Vec<Job>, BenchError> {
    let all = default_jobs();
    let Some(names) = names else {
        return Ok(all);
    };
    names
        .iter()
        .map(|name| {
            all.iter()
                .find(|j| &j.name == name)
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<&str> = all.iter().map(|j| j.name.as_str()).collect();
                    BenchError::Usage(format!("unknown job {name:?}; known: {}", known.join(", ")))
                })
        })
        .collect()
}

/// Which part of the benchmark a run belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The job matrix, measured with the load generator (vhost-user targets) or host fio.
    Matrix,
    /// The per-core scaling sweep.
    Scaling,
    /// The job matrix again, measured with fio inside a VM (the whole path).
    Guest,
}

/// One run: a target serving one job with a given number of queues and iothreads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub phase: Phase,
    pub target: Target,
    pub job: Job,
    pub queues: u32,
    pub iothreads: u32,
    /// CPUs the server runs on (one per iothread in the scaling sweep).
    pub server_cpus: Vec<usize>,
    /// 1-based repetition number.
    pub rep: u32,
}

/// Matrix runs: for each (job, queues) point, `reps` rounds over the targets, starting each
/// round one target later, so that slow drift (thermal, page cache, neighbours) spreads over
/// all targets instead of hitting whichever runs last.
pub fn matrix_plan(
    jobs: &[Job],
    queue_counts: &[u32],
    targets: &[Target],
    reps: u32,
    server_cpus: &[usize],
) -> Vec<RunSpec> {
    let mut plan = Vec::new();
    for job in jobs {
        for &queues in queue_counts {
            for rep in 1..=reps {
                for target in rotated(targets, rep) {
                    plan.push(RunSpec {
                        phase: Phase::Matrix,
                        target,
                        job: job.clone(),
                        queues,
                        // One iothread, as the issue fixes for qemu-storage-daemon; the same
                        // for uringblk so that the comparison is core for core.
                        iothreads: 1,
                        server_cpus: server_cpus.to_vec(),
                        rep,
                    });
                }
            }
        }
    }
    plan
}

/// Guest runs: the matrix over the targets with a server, measured by fio in a VM.
pub fn guest_plan(
    jobs: &[Job],
    queue_counts: &[u32],
    targets: &[Target],
    reps: u32,
    server_cpus: &[usize],
) -> Vec<RunSpec> {
    let served: Vec<Target> = targets
        .iter()
        .copied()
        .filter(|t| t.server().is_some())
        .collect();
    let mut plan = matrix_plan(jobs, queue_counts, &served, reps, server_cpus);
    for run in &mut plan {
        run.phase = Phase::Guest;
    }
    plan
}

/// Scaling runs: iothreads k = 1..=max_threads with k queues, the server on k CPUs taken from
/// `server_cpu_order` (preferred CPUs first), targets alternating as in the matrix.
pub fn scaling_plan(
    targets: &[Target],
    max_threads: u32,
    reps: u32,
    server_cpu_order: &[usize],
) -> Vec<RunSpec> {
    let job = scaling_job();
    let mut plan = Vec::new();
    for threads in 1..=max_threads.max(1) {
        let cpus: Vec<usize> = server_cpu_order
            .iter()
            .copied()
            .take(threads as usize)
            .collect();
        for rep in 1..=reps {
            for target in rotated(targets, rep) {
                plan.push(RunSpec {
                    phase: Phase::Scaling,
                    target,
                    job: job.clone(),
                    queues: threads,
                    iothreads: threads,
                    server_cpus: cpus.clone(),
                    rep,
                });
            }
        }
    }
    plan
}

fn rotated(targets: &[Target], rep: u32) -> Vec<Target> {
    if targets.is_empty() {
        return Vec::new();
    }
    let shift = (rep as usize).saturating_sub(1) % targets.len();
    targets[shift..]
        .iter()
        .chain(&targets[..shift])
        .copied()
        .collect()
}

/// The server CPUs of the scaling sweep, in order of use: the configured server CPUs first, then
/// the remaining available CPUs from the highest down (so the client's CPU is taken last).
pub fn scaling_cpu_order(server_cpus: &[usize], available: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = server_cpus.to_vec();
    let mut rest: Vec<usize> = available
        .iter()
        .copied()
        .filter(|c| !order.contains(c))
        .collect();
    rest.sort_unstable_by(|a, b| b.cmp(a));
    order.extend(rest);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_matrix_has_the_issue_jobs() {
        let names: Vec<String> = default_jobs().into_iter().map(|j| j.name).collect();
        assert_eq!(
            names,
            [
                "randread-4k-qd1",
                "randread-4k-qd32",
                "randwrite-4k-qd32",
                "read-128k-qd8",
                "write-128k-qd8",
                "randrw70-4k-qd32"
            ]
        );
    }

    #[test]
    fn job_selection_by_name() {
        let picked = select_jobs(Some(&["read-128k-qd8".to_string()])).unwrap();
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].block_size, 128 * 1024);
        assert!(select_jobs(Some(&["nope".to_string()])).is_err());
        assert_eq!(select_jobs(None).unwrap().len(), 6);
    }

    #[test]
    fn targets_rotate_between_repetitions() {
        let targets = [Target::UringblkFile, Target::QsdFile, Target::Host];
        let plan = matrix_plan(&default_jobs()[..1], &[1], &targets, 3, &[1]);
        let order: Vec<Target> = plan.iter().map(|r| r.target).collect();
        assert_eq!(
            order,
            [
                Target::UringblkFile,
                Target::QsdFile,
                Target::Host,
                Target::QsdFile,
                Target::Host,
                Target::UringblkFile,
                Target::Host,
                Target::UringblkFile,
                Target::QsdFile,
            ]
        );
        assert_eq!(
            plan.iter().map(|r| r.rep).collect::<Vec<_>>(),
            [1, 1, 1, 2, 2, 2, 3, 3, 3]
        );
    }

    #[test]
    fn matrix_size_is_jobs_times_queues_times_targets_times_reps() {
        let targets = [Target::UringblkNull, Target::QsdNull];
        let plan = matrix_plan(&default_jobs(), &[1, 2], &targets, 3, &[1]);
        assert_eq!(plan.len(), 6 * 2 * 2 * 3);
        assert!(plan
            .iter()
            .all(|r| r.iothreads == 1 && r.server_cpus == [1]));
    }

    #[test]
    fn scaling_grows_threads_queues_and_cpus_together() {
        let plan = scaling_plan(&[Target::UringblkNull], 2, 1, &[1, 0]);
        assert_eq!(plan.len(), 2);
        assert_eq!((plan[0].iothreads, plan[0].queues), (1, 1));
        assert_eq!(plan[0].server_cpus, [1]);
        assert_eq!((plan[1].iothreads, plan[1].queues), (2, 2));
        assert_eq!(plan[1].server_cpus, [1, 0]);
    }

    #[test]
    fn guest_plan_skips_the_host() {
        let plan = guest_plan(
            &default_jobs()[..2],
            &[1],
            &[Target::Host, Target::QsdNull],
            2,
            &[1],
        );
        assert_eq!(plan.len(), 4);
        assert!(plan
            .iter()
            .all(|r| r.phase == Phase::Guest && r.target == Target::QsdNull));
    }

    #[test]
    fn scaling_cpus_take_the_client_cpu_last() {
        assert_eq!(scaling_cpu_order(&[1], &[0, 1]), [1, 0]);
        assert_eq!(scaling_cpu_order(&[2], &[0, 1, 2, 3]), [2, 3, 1, 0]);
    }
}
