//! From raw run records to per-point medians, ratio tables (markdown), latest.json and the
//! results section of bench/README.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::clients::ClientKind;
use crate::machine::MachineInfo;
use crate::matrix::Phase;
use crate::record::RunRecord;
use crate::stats::{ratio, Spread};
use crate::steal_guard::StealGuardReport;
use crate::targets::{Backend, Target};

/// Medians (with min and max) over the repetitions of one point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointSummary {
    pub phase: Phase,
    pub target: Target,
    pub client: ClientKind,
    pub job: String,
    pub queues: u32,
    pub iothreads: u32,
    pub server_cpus: Vec<usize>,
    pub runs_ok: usize,
    pub runs_failed: usize,
    pub first_error: Option<String>,
    pub iops: Option<Spread>,
    pub mib_per_s: Option<Spread>,
    pub lat_p50_us: Option<Spread>,
    pub lat_p99_us: Option<Spread>,
    pub lat_p99_9_us: Option<Spread>,
    pub server_cores_busy: Option<Spread>,
    pub iops_per_server_cpu_s: Option<Spread>,
    /// VM accelerator(s) of guest fio runs, e.g. "tcg".
    #[serde(default)]
    pub accelerator: Option<String>,
    /// The hypervisor's steal over the runs, as a fraction of the machine's CPU time.
    #[serde(default)]
    pub host_steal: Option<Spread>,
    /// Runs of this point left out and made again because steal passed the guard's limit.
    #[serde(default)]
    pub reruns_for_steal: usize,
    /// Cache-line round trip between the client's and the server's CPUs over the runs, in ns
    /// (placement.rs): how far apart the two vCPUs were.
    #[serde(default)]
    pub cpu_round_trip_ns: Option<Spread>,
}

/// How the runs were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub mode: String,
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub reps: u32,
    pub completion: String,
    /// The load generator's completion mode on the null backends of the matrix (older results:
    /// the same as `completion`).
    #[serde(default)]
    pub null_completion: Option<String>,
    pub image: String,
    pub image_bytes: u64,
    pub server_cpus: Vec<usize>,
    pub client_cpus: Vec<usize>,
    pub targets: Vec<Target>,
    pub jobs: Vec<String>,
    pub queue_counts: Vec<u32>,
    pub scaling: bool,
    #[serde(default)]
    pub guest: bool,
    /// Extra arguments every uringblk server got (none: its defaults).
    #[serde(default)]
    pub uringblk_args: Vec<String>,
}

/// Everything a report is drawn from; saved as bench/results/latest.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub run_id: String,
    pub date: String,
    pub raw_file: String,
    pub settings: Settings,
    pub machine: MachineInfo,
    pub points: Vec<PointSummary>,
    /// What the steal guard did (older results: none).
    #[serde(default)]
    pub steal_guard: Option<StealGuardReport>,
}

type PointKey = (Phase, Target, String, u32, u32);

/// Groups records by point (phase, target, job, queues, iothreads), in order of first appearance.
/// Runs the steal guard discarded count only as reruns.
pub fn summarize(records: &[RunRecord]) -> Vec<PointSummary> {
    let mut order: Vec<PointKey> = Vec::new();
    let mut groups: BTreeMap<PointKey, Vec<&RunRecord>> = BTreeMap::new();
    for r in records {
        let key = (r.phase, r.target, r.job.name.clone(), r.queues, r.iothreads);
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(r);
    }
    order
        .into_iter()
        .filter_map(|key| {
            let runs = groups.remove(&key)?;
            let reruns_for_steal = runs.iter().filter(|r| r.discarded.is_some()).count();
            let runs: Vec<&RunRecord> =
                runs.into_iter().filter(|r| r.discarded.is_none()).collect();
            let first = *runs.first()?;
            let good: Vec<&RunRecord> = runs.iter().copied().filter(|r| r.ok()).collect();
            let spread = |f: &dyn Fn(&RunRecord) -> Option<f64>| {
                Spread::of(good.iter().filter_map(|r| f(r)))
            };
            Some(PointSummary {
                phase: key.0,
                target: key.1,
                client: first.client,
                job: key.2,
                queues: key.3,
                iothreads: key.4,
                server_cpus: first.server_cpus.clone(),
                runs_ok: good.len(),
                runs_failed: runs.len() - good.len(),
                first_error: runs.iter().find_map(|r| r.error.clone()),
                iops: spread(&|r| r.measurement.as_ref().map(|m| m.iops)),
                mib_per_s: spread(&|r| r.measurement.as_ref().map(|m| m.mib_per_s)),
                lat_p50_us: spread(&|r| r.measurement.as_ref().map(|m| m.lat_p50_us)),
                lat_p99_us: spread(&|r| r.measurement.as_ref().map(|m| m.lat_p99_us)),
                lat_p99_9_us: spread(&|r| r.measurement.as_ref().map(|m| m.lat_p99_9_us)),
                server_cores_busy: spread(&|r| r.server_cores_busy()),
                iops_per_server_cpu_s: spread(&|r| r.iops_per_server_cpu_s()),
                accelerator: accelerators(&runs),
                host_steal: spread(&|r| r.host_steal),
                reruns_for_steal,
                cpu_round_trip_ns: spread(&|r| r.cpu_round_trip_ns),
            })
        })
        .collect()
}

/// The distinct accelerators of a point's runs, e.g. "tcg" (or "kvm, tcg" if they differed).
fn accelerators(runs: &[&RunRecord]) -> Option<String> {
    let mut seen: Vec<&str> = runs
        .iter()
        .filter_map(|r| r.accelerator.as_deref())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    (!seen.is_empty()).then(|| seen.join(", "))
}

impl Summary {
    pub fn point(
        &self,
        phase: Phase,
        target: Target,
        job: &str,
        queues: u32,
    ) -> Option<&PointSummary> {
        self.points
            .iter()
            .find(|p| p.phase == phase && p.target == target && p.job == job && p.queues == queues)
    }

    /// (job, queues) of the matrix, in matrix order.
    pub fn matrix_rows(&self) -> Vec<(String, u32)> {
        self.rows_of(Phase::Matrix)
    }

    /// (job, queues) that `phase` has points for, in matrix order.
    pub fn rows_of(&self, phase: Phase) -> Vec<(String, u32)> {
        let mut rows: Vec<(String, u32)> = Vec::new();
        for p in self.points.iter().filter(|p| p.phase == phase) {
            let row = (p.job.clone(), p.queues);
            if !rows.contains(&row) {
                rows.push(row);
            }
        }
        // Group by job in matrix order, queues ascending within a job.
        let job_order: Vec<String> = self.settings.jobs.clone();
        rows.sort_by_key(|(job, q)| {
            (
                job_order
                    .iter()
                    .position(|j| j == job)
                    .unwrap_or(usize::MAX),
                *q,
            )
        });
        rows
    }

    fn median(
        &self,
        target: Target,
        job: &str,
        queues: u32,
        f: fn(&PointSummary) -> Option<Spread>,
    ) -> Option<f64> {
        self.point(Phase::Matrix, target, job, queues)
            .and_then(f)
            .map(|s| s.median)
    }
}

/// 1234 -> "1.2k", 1234567 -> "1.23M".
pub fn fmt_count(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// Microseconds with a sensible number of digits.
pub fn fmt_us(x: f64) -> String {
    if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

pub fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".into(), |r| format!("{r:.2}×"))
}

fn fmt_spread(s: Option<Spread>, f: fn(f64) -> String) -> String {
    match s {
        Some(s) if s.samples > 1 => format!("{} [{}–{}]", f(s.median), f(s.min), f(s.max)),
        Some(s) => f(s.median),
        None => "n/a".into(),
    }
}

fn table(out: &mut String, header: &[String], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(
        out,
        "|{}|",
        header
            .iter()
            .enumerate()
            .map(|(i, _)| if i < 2 { "---" } else { "---:" })
            .collect::<Vec<_>>()
            .join("|")
    );
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out.push('\n');
}

/// The peer and limit of a uringblk target.
fn peers(backend: Backend) -> (Target, Target, Option<Target>) {
    match backend {
        Backend::File => (Target::UringblkFile, Target::QsdFile, Some(Target::Host)),
        Backend::Null => (Target::UringblkNull, Target::QsdNull, None),
        Backend::Rbd => (Target::UringblkRbd, Target::QsdRbd, None),
    }
}

pub fn machine_line(m: &MachineInfo) -> String {
    format!(
        "{} ({} CPUs online, {} available to the harness), {:.1} GiB RAM, Linux {}",
        m.cpu_model,
        m.cpus_online,
        m.cpus_available.len(),
        m.memory_gib,
        m.kernel
    )
}

/// One comparison where uringblk loses to qemu-storage-daemon.
#[derive(Debug, Clone, PartialEq)]
pub struct Shortfall {
    pub job: String,
    pub queues: u32,
    pub backend: Backend,
    pub what: &'static str,
    pub ratio: f64,
    /// The runs' min–max ranges of the two targets overlap: the gap is within run-to-run noise.
    pub within_spread: bool,
    /// Median steal over the runs of uringblk and of qemu-storage-daemon at this point.
    pub steal: Option<(f64, f64)>,
    /// The client-server cache-line round trip over the runs of uringblk and of qsd.
    pub round_trip_ns: Option<(Spread, Spread)>,
}

fn spread_of(
    summary: &Summary,
    target: Target,
    job: &str,
    queues: u32,
    f: fn(&PointSummary) -> Option<Spread>,
) -> Option<Spread> {
    summary
        .point(Phase::Matrix, target, job, queues)
        .and_then(f)
}

/// The median steal of two targets' runs at one point, if both have it.
fn steal_pair(
    summary: &Summary,
    ours: Target,
    peer: Target,
    job: &str,
    queues: u32,
) -> Option<(f64, f64)> {
    Some((
        summary.median(ours, job, queues, |p| p.host_steal)?,
        summary.median(peer, job, queues, |p| p.host_steal)?,
    ))
}

/// The cache-line round trip over two targets' runs at one point, if both have it.
fn round_trip_pair(
    summary: &Summary,
    ours: Target,
    peer: Target,
    job: &str,
    queues: u32,
) -> Option<(Spread, Spread)> {
    let of = |t| spread_of(summary, t, job, queues, |p| p.cpu_round_trip_ns);
    Some((of(ours)?, of(peer)?))
}

/// The client-server placement over a run's points, in words: the typical cache-line round
/// trip and the largest; `None` for results recorded without it.
fn placement_words(summary: &Summary) -> Option<String> {
    let trips: Vec<Spread> = summary
        .points
        .iter()
        .filter_map(|p| p.cpu_round_trip_ns)
        .collect();
    let typical = Spread::of(trips.iter().map(|s| s.median))?;
    let most = trips.iter().map(|s| s.max).fold(0.0, f64::max);
    Some(format!(
        "Placement (round trip of a cache line between the client's and the server's CPU, \
         the larger of the figures just before and just after each run): {:.0} ns typical \
         (median of the points' medians), {:.0} ns at most. A run with a long round trip had \
         its two vCPUs placed farther apart, which slows a polling client and server that \
         trade virtqueue cache lines on every request: mostly the null backends.",
        typical.median, most
    ))
}

/// The steal over a run's points, in words: the median of the points' medians, the most any
/// kept run saw, and what the steal guard did; `None` for results recorded without steal.
fn steal_words(summary: &Summary) -> Option<String> {
    let steal: Vec<Spread> = summary.points.iter().filter_map(|p| p.host_steal).collect();
    let typical = Spread::of(steal.iter().map(|s| s.median))?;
    let most = steal.iter().map(|s| s.max).fold(0.0, f64::max);
    let mut words = format!(
        "Steal (CPU time the hypervisor took from this VM while a run lasted): {:.1} % typical \
         (median of the points' medians), {:.1} % at most. A stolen stretch slows \
         every target that runs in it, so compare points whose runs saw alike steal.",
        typical.median * 100.0,
        most * 100.0
    );
    match summary.steal_guard.as_ref() {
        Some(StealGuardReport {
            limit: Some(limit),
            reruns,
            waited_s,
            kept_above_limit,
        }) => {
            let _ = write!(
                words,
                " The steal guard (limit {:.1} %) waited {:.0} s for stolen stretches to pass \
                 before runs, made {reruns} stolen-from run(s) again (the discarded ones stay \
                 in the raw file) and kept {kept_above_limit} above the limit once its \
                 budgets ran out.",
                limit * 100.0,
                waited_s
            );
            // Made again per target: a target that drew more steal onto itself would show here.
            let mut by_target: Vec<(Target, usize)> = Vec::new();
            for p in summary.points.iter().filter(|p| p.reruns_for_steal > 0) {
                match by_target.iter_mut().find(|(t, _)| *t == p.target) {
                    Some((_, n)) => *n += p.reruns_for_steal,
                    None => by_target.push((p.target, p.reruns_for_steal)),
                }
            }
            if !by_target.is_empty() {
                let list: Vec<String> = by_target.iter().map(|(t, n)| format!("{t} {n}")).collect();
                let _ = write!(words, " Made again, by target: {}.", list.join(", "));
            }
        }
        Some(_) => words.push_str(" The steal guard was off (--steal-limit 0)."),
        None => {}
    }
    Some(words)
}

/// Whether two points' min–max ranges overlap.
fn overlap(a: Option<Spread>, b: Option<Spread>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a.min <= b.max && b.min <= a.max)
}

/// Where uringblk's median is worse than qemu-storage-daemon's: fewer IOPS, or (for the QD1
/// latency job) a higher p99.
pub fn shortfalls(summary: &Summary) -> Vec<Shortfall> {
    comparisons(summary).1
}

/// (number of uringblk-vs-qsd comparisons possible, the ones uringblk loses).
fn comparisons(summary: &Summary) -> (usize, Vec<Shortfall>) {
    let mut compared = 0;
    let mut found = Vec::new();
    for (job, q) in summary.matrix_rows() {
        for backend in [Backend::File, Backend::Null, Backend::Rbd] {
            let (ours, peer, _) = peers(backend);
            let iops = ratio(
                summary.median(ours, &job, q, |p| p.iops),
                summary.median(peer, &job, q, |p| p.iops),
            );
            compared += usize::from(iops.is_some());
            if let Some(r) = iops.filter(|r| *r < 1.0) {
                found.push(Shortfall {
                    job: job.clone(),
                    queues: q,
                    backend,
                    what: "IOPS",
                    ratio: r,
                    within_spread: overlap(
                        spread_of(summary, ours, &job, q, |p| p.iops),
                        spread_of(summary, peer, &job, q, |p| p.iops),
                    ),
                    steal: steal_pair(summary, ours, peer, &job, q),
                    round_trip_ns: round_trip_pair(summary, ours, peer, &job, q),
                });
            }
            if job.ends_with("-qd1") {
                let p99 = ratio(
                    summary.median(ours, &job, q, |p| p.lat_p99_us),
                    summary.median(peer, &job, q, |p| p.lat_p99_us),
                );
                compared += usize::from(p99.is_some());
                if let Some(r) = p99.filter(|r| *r > 1.0) {
                    found.push(Shortfall {
                        job: job.clone(),
                        queues: q,
                        backend,
                        what: "p99 latency",
                        ratio: r,
                        within_spread: overlap(
                            spread_of(summary, ours, &job, q, |p| p.lat_p99_us),
                            spread_of(summary, peer, &job, q, |p| p.lat_p99_us),
                        ),
                        steal: steal_pair(summary, ours, peer, &job, q),
                        round_trip_ns: round_trip_pair(summary, ours, peer, &job, q),
                    });
                }
            }
        }
    }
    (compared, found)
}

/// How the load generator waited, in words: one mode, or one for the null backends' matrix
/// points and another for the rest.
fn completion_words(s: &Settings) -> String {
    match s.null_completion.as_deref() {
        Some(null)
            if null != s.completion && s.targets.iter().any(|t| t.backend() == Backend::Null) =>
        {
            format!(
                "{} completions on the null backends so that the server, not the client's \
                 wake-up, is the limit there, {} completions elsewhere",
                null, s.completion
            )
        }
        _ => format!("{} completions", s.completion),
    }
}

/// The tables, in markdown. `image_prefix` is prepended to chart file names (`None`: no charts).
pub fn render_markdown(summary: &Summary, image_prefix: Option<&str>) -> String {
    let s = &summary.settings;
    let m = &summary.machine;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Run `{}` ({} mode), {}. Machine: {}. Image: {} MiB file `{}` on {}. \
         Server pinned to CPU {}, client to CPU {}; {} × {:.1} s per point after a {:.1} s ramp; \
         one server iothread. Clients: `uringblk-loadgen` (libblkio virtio-blk-vhost-user, {}, \
         no VM) for uringblk and qemu-storage-daemon; {} (`ioengine=io_uring, \
         direct=1`) for host. {}; uringblk {}. Load average {} at start, {} at end. \
         Raw runs: `{}`.\n",
        summary.run_id,
        s.mode,
        summary.date,
        machine_line(m),
        s.image_bytes >> 20,
        s.image,
        m.image_filesystem,
        crate::targets::cpu_list(&s.server_cpus),
        crate::targets::cpu_list(&s.client_cpus),
        s.reps,
        s.runtime_s,
        s.ramp_s,
        completion_words(s),
        m.fio_version,
        m.qsd_version,
        m.uringblk_revision,
        m.loadavg_start,
        m.loadavg_end,
        summary.raw_file,
    );
    for words in [steal_words(summary), placement_words(summary)]
        .into_iter()
        .flatten()
    {
        let _ = writeln!(out, "{words}\n");
    }
    if !s.uringblk_args.is_empty() {
        let _ = writeln!(
            out,
            "uringblk ran with extra arguments: `{}`.\n",
            s.uringblk_args.join(" ")
        );
    }
    if let Some(prefix) = image_prefix {
        let _ = writeln!(out, "![IOPS per job and target]({prefix}iops.png)\n");
        let _ = writeln!(out, "![Latency per job and target]({prefix}latency.png)\n");
    }

    let rows = summary.matrix_rows();
    let has = |t: Target| s.targets.contains(&t);
    let cols: Vec<Target> = Target::ALL.iter().copied().filter(|t| has(*t)).collect();
    let iops_cell = |t: Target, job: &str, q: u32| {
        fmt_spread(
            summary.point(Phase::Matrix, t, job, q).and_then(|p| p.iops),
            fmt_count,
        )
    };
    let r = |a: Target, b: Target, job: &str, q: u32, f: fn(&PointSummary) -> Option<Spread>| {
        fmt_ratio(ratio(
            summary.median(a, job, q, f),
            summary.median(b, job, q, f),
        ))
    };

    // IOPS and the ratios the issue asks for.
    let _ = writeln!(out, "#### IOPS: median [min–max] of {} runs\n", s.reps);
    let header: Vec<String> = [
        "job",
        "queues",
        "uringblk file",
        "qsd file",
        "host",
        "**uringblk / qsd**",
        "**uringblk / host**",
        "uringblk null",
        "qsd null",
        "**uringblk / qsd (null)**",
    ]
    .map(String::from)
    .to_vec();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|(job, q)| {
            vec![
                job.clone(),
                q.to_string(),
                iops_cell(Target::UringblkFile, job, *q),
                iops_cell(Target::QsdFile, job, *q),
                iops_cell(Target::Host, job, *q),
                r(Target::UringblkFile, Target::QsdFile, job, *q, |p| p.iops),
                r(Target::UringblkFile, Target::Host, job, *q, |p| p.iops),
                iops_cell(Target::UringblkNull, job, *q),
                iops_cell(Target::QsdNull, job, *q),
                r(Target::UringblkNull, Target::QsdNull, job, *q, |p| p.iops),
            ]
        })
        .collect();
    table(&mut out, &header, &body);

    if has(Target::UringblkRbd) || has(Target::QsdRbd) {
        let _ = writeln!(
            out,
            "#### Ceph RBD: IOPS median [min–max], p99 µs (a single-node cluster on this \
             machine: one mon, one memstore OSD, pool size 1, sharing the CPUs)\n"
        );
        let header: Vec<String> = [
            "job",
            "queues",
            "uringblk rbd",
            "qsd rbd",
            "**uringblk / qsd (rbd)**",
            "uringblk p99",
            "qsd p99",
        ]
        .map(String::from)
        .to_vec();
        let p99 = |t: Target, job: &str, q: u32| {
            summary
                .median(t, job, q, |p| p.lat_p99_us)
                .map_or("–".into(), fmt_us)
        };
        let body: Vec<Vec<String>> = rows
            .iter()
            .filter(|(job, q)| {
                summary
                    .point(Phase::Matrix, Target::UringblkRbd, job, *q)
                    .is_some()
                    || summary
                        .point(Phase::Matrix, Target::QsdRbd, job, *q)
                        .is_some()
            })
            .map(|(job, q)| {
                vec![
                    job.clone(),
                    q.to_string(),
                    iops_cell(Target::UringblkRbd, job, *q),
                    iops_cell(Target::QsdRbd, job, *q),
                    r(Target::UringblkRbd, Target::QsdRbd, job, *q, |p| p.iops),
                    p99(Target::UringblkRbd, job, *q),
                    p99(Target::QsdRbd, job, *q),
                ]
            })
            .collect();
        table(&mut out, &header, &body);
    }

    // Latency.
    let _ = writeln!(
        out,
        "#### Latency, µs: p50 / p99 / p99.9 (medians of the runs); ratio = uringblk p99 / qsd p99 (lower is better)\n"
    );
    let mut header: Vec<String> = vec!["job".into(), "queues".into()];
    header.extend(cols.iter().map(|t| t.name().to_string()));
    header.extend(["p99 ratio file".into(), "p99 ratio null".into()]);
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|(job, q)| {
            let mut row = vec![job.clone(), q.to_string()];
            row.extend(
                cols.iter()
                    .map(|t| match summary.point(Phase::Matrix, *t, job, *q) {
                        Some(p) => match (p.lat_p50_us, p.lat_p99_us, p.lat_p99_9_us) {
                            (Some(a), Some(b), Some(c)) => format!(
                                "{} / {} / {}",
                                fmt_us(a.median),
                                fmt_us(b.median),
                                fmt_us(c.median)
                            ),
                            _ => "n/a".into(),
                        },
                        None => "n/a".into(),
                    }),
            );
            row.push(r(Target::UringblkFile, Target::QsdFile, job, *q, |p| {
                p.lat_p99_us
            }));
            row.push(r(Target::UringblkNull, Target::QsdNull, job, *q, |p| {
                p.lat_p99_us
            }));
            row
        })
        .collect();
    table(&mut out, &header, &body);

    // Bandwidth.
    let _ = writeln!(out, "#### Throughput, MiB/s (median)\n");
    let mut header: Vec<String> = vec!["job".into(), "queues".into()];
    header.extend(cols.iter().map(|t| t.name().to_string()));
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|(job, q)| {
            let mut row = vec![job.clone(), q.to_string()];
            row.extend(cols.iter().map(|t| {
                summary
                    .median(*t, job, *q, |p| p.mib_per_s)
                    .map_or_else(|| "n/a".into(), |v| format!("{v:.0}"))
            }));
            row
        })
        .collect();
    table(&mut out, &header, &body);

    // Efficiency.
    let _ = writeln!(
        out,
        "#### Server CPU: cores busy during the measured window, and IOPS per server CPU-second (medians)\n"
    );
    let header: Vec<String> = [
        "job",
        "queues",
        "uringblk file",
        "qsd file",
        "**ratio file**",
        "uringblk null",
        "qsd null",
        "**ratio null**",
    ]
    .map(String::from)
    .to_vec();
    let cpu_cell = |t: Target, job: &str, q: u32| match summary.point(Phase::Matrix, t, job, q) {
        Some(p) => match (p.server_cores_busy, p.iops_per_server_cpu_s) {
            (Some(c), Some(e)) => format!("{:.2} cores, {}", c.median, fmt_count(e.median)),
            _ => "n/a".into(),
        },
        None => "n/a".into(),
    };
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|(job, q)| {
            vec![
                job.clone(),
                q.to_string(),
                cpu_cell(Target::UringblkFile, job, *q),
                cpu_cell(Target::QsdFile, job, *q),
                r(Target::UringblkFile, Target::QsdFile, job, *q, |p| {
                    p.iops_per_server_cpu_s
                }),
                cpu_cell(Target::UringblkNull, job, *q),
                cpu_cell(Target::QsdNull, job, *q),
                r(Target::UringblkNull, Target::QsdNull, job, *q, |p| {
                    p.iops_per_server_cpu_s
                }),
            ]
        })
        .collect();
    table(&mut out, &header, &body);

    // Where uringblk loses.
    let (compared, losses) = comparisons(summary);
    let _ = writeln!(
        out,
        "#### Where uringblk is behind qemu-storage-daemon in this run\n"
    );
    if compared == 0 {
        let _ = writeln!(
            out,
            "No comparison: this run lacks uringblk or qemu-storage-daemon results.\n"
        );
    } else if losses.is_empty() {
        let _ = writeln!(
            out,
            "Nowhere: uringblk's median is at least qemu-storage-daemon's on every job.\n"
        );
    } else {
        for l in &losses {
            let _ = writeln!(
                out,
                "- {} q{} ({}): {} ratio {:.2}{}{}{}",
                l.job,
                l.queues,
                l.backend.name(),
                l.what,
                l.ratio,
                if l.within_spread {
                    " (within run-to-run spread: the min–max ranges overlap)"
                } else {
                    ""
                },
                l.steal
                    .map(|(ours, peer)| format!(
                        "; steal in its runs {:.1} % (uringblk), {:.1} % (qsd)",
                        ours * 100.0,
                        peer * 100.0
                    ))
                    .unwrap_or_default(),
                l.round_trip_ns
                    .map(|(ours, peer)| format!(
                        "; cache-line round trip in its runs {:.0}–{:.0} ns (uringblk), \
                         {:.0}–{:.0} ns (qsd)",
                        ours.min, ours.max, peer.min, peer.max
                    ))
                    .unwrap_or_default()
            );
        }
        out.push('\n');
    }

    render_guest(&mut out, summary);
    render_scaling(&mut out, summary, image_prefix);
    render_failures(&mut out, summary);
    out
}

/// qemu-storage-daemon 7.2 serves an export from one iothread whatever the queue count: say so
/// rather than print the sweep's nominal thread count.
fn scaling_threads_label(p: &PointSummary) -> String {
    match p.target.server() {
        Some(crate::targets::Server::Qsd) if p.iothreads > 1 => {
            format!("1 ({} queues)", p.queues)
        }
        _ => p.iothreads.to_string(),
    }
}

fn render_scaling(out: &mut String, summary: &Summary, image_prefix: Option<&str>) {
    let points: Vec<&PointSummary> = summary
        .points
        .iter()
        .filter(|p| p.phase == Phase::Scaling)
        .collect();
    let _ = writeln!(
        out,
        "#### Per-core scaling (iothreads = queues, randread 4k QD32 per queue)\n"
    );
    if points.is_empty() {
        let _ = writeln!(out, "Not run in this mode (`bench/run.sh full` runs it).\n");
        return;
    }
    let _ = writeln!(
        out,
        "uringblk gets one iothread per server CPU; qemu-storage-daemon's export runs on one \
         iothread at every point (all QEMU 7.2 offers), with the same queues and CPUs. \
         \"IOPS per server core\" divides by the CPUs given to the server, \"IOPS per server \
         CPU-s\" by the CPU time it used.\n"
    );
    if let Some(prefix) = image_prefix {
        let _ = writeln!(out, "![Scaling]({prefix}scaling.png)\n");
    }
    let header: Vec<String> = [
        "target",
        "iothreads",
        "server CPUs",
        "IOPS",
        "IOPS per server core",
        "IOPS per server CPU-s",
        "cores busy",
        "p99 µs",
    ]
    .map(String::from)
    .to_vec();
    let mut sorted = points.clone();
    sorted.sort_by_key(|p| (p.target.backend() == Backend::Null, p.target, p.iothreads));
    let body: Vec<Vec<String>> = sorted
        .iter()
        .map(|p| {
            let per_core = p.iops.map(|s| s.median / p.server_cpus.len().max(1) as f64);
            vec![
                p.target.name().to_string(),
                scaling_threads_label(p),
                crate::targets::cpu_list(&p.server_cpus),
                fmt_spread(p.iops, fmt_count),
                per_core.map_or_else(|| "n/a".into(), fmt_count),
                p.iops_per_server_cpu_s
                    .map_or_else(|| "n/a".into(), |s| fmt_count(s.median)),
                p.server_cores_busy
                    .map_or_else(|| "n/a".into(), |s| format!("{:.2}", s.median)),
                p.lat_p99_us
                    .map_or_else(|| "n/a".into(), |s| fmt_us(s.median)),
            ]
        })
        .collect();
    table(out, &header, &body);
}

fn render_guest(out: &mut String, summary: &Summary) {
    let rows = summary.rows_of(Phase::Guest);
    if rows.is_empty() {
        if !summary.settings.guest {
            let _ = writeln!(out, "#### fio in a guest\n\nNot run (`--guest` adds it).\n");
        }
        return;
    }
    let mut accels: Vec<&str> = summary
        .points
        .iter()
        .filter(|p| p.phase == Phase::Guest)
        .filter_map(|p| p.accelerator.as_deref())
        .collect();
    accels.sort_unstable();
    accels.dedup();
    let accel = if accels.is_empty() {
        "unknown".to_string()
    } else {
        accels.join(", ")
    };
    let _ = writeln!(
        out,
        "#### fio in a guest (QEMU, accelerator: **{accel}**): IOPS median [min–max], p99 µs\n"
    );
    if accel.contains("tcg") {
        let _ = writeln!(
            out,
            "Under TCG the guest's CPU is emulated: these figures measure the emulator far more \
             than the server, and the ratios say little about the dataplane.\n"
        );
    }
    let guest_point = |t: Target, job: &str, q: u32| {
        summary
            .points
            .iter()
            .find(|p| p.phase == Phase::Guest && p.target == t && p.job == job && p.queues == q)
    };
    let served: Vec<Target> = Target::ALL
        .iter()
        .copied()
        .filter(|t| t.server().is_some() && summary.settings.targets.contains(t))
        .collect();
    let mut header: Vec<String> = vec!["job".into(), "queues".into()];
    header.extend(served.iter().map(|t| t.name().to_string()));
    header.extend([
        "**uringblk / qsd**".into(),
        "**uringblk / qsd (null)**".into(),
    ]);
    let median = |t: Target, job: &str, q: u32| {
        guest_point(t, job, q)
            .and_then(|p| p.iops)
            .map(|s| s.median)
    };
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|(job, q)| {
            let mut row = vec![job.clone(), q.to_string()];
            row.extend(served.iter().map(|t| match guest_point(*t, job, *q) {
                Some(p) => format!(
                    "{}, p99 {}",
                    fmt_spread(p.iops, fmt_count),
                    p.lat_p99_us.map_or_else(|| "n/a".into(), |s| fmt_us(s.median))
                ),
                None => "n/a".into(),
            }));
            row.push(fmt_ratio(ratio(
                median(Target::UringblkFile, job, *q),
                median(Target::QsdFile, job, *q),
            )));
            row.push(fmt_ratio(ratio(
                median(Target::UringblkNull, job, *q),
                median(Target::QsdNull, job, *q),
            )));
            row
        })
        .collect();
    table(out, &header, &body);
}

fn render_failures(out: &mut String, summary: &Summary) {
    let failed: Vec<&PointSummary> = summary
        .points
        .iter()
        .filter(|p| p.runs_failed > 0)
        .collect();
    if failed.is_empty() {
        return;
    }
    let _ = writeln!(out, "#### Failed runs\n");
    for p in failed {
        let _ = writeln!(
            out,
            "- {} {} q{} t{}: {} of {} runs failed; first error: {}",
            p.target,
            p.job,
            p.queues,
            p.iothreads,
            p.runs_failed,
            p.runs_failed + p.runs_ok,
            p.first_error.as_deref().unwrap_or("?").replace('\n', " ")
        );
    }
    out.push('\n');
}

pub const RESULTS_BEGIN: &str =
    "<!-- BEGIN RESULTS (generated by uringblk-bench; edits here are overwritten) -->";
pub const RESULTS_END: &str = "<!-- END RESULTS -->";

/// Replaces the text between the result markers of `readme` with `section` (markers appended
/// at the end if absent).
pub fn replace_results_section(readme: &str, section: &str) -> String {
    let block = format!("{RESULTS_BEGIN}\n{}\n{RESULTS_END}", section.trim_end());
    match (readme.find(RESULTS_BEGIN), readme.find(RESULTS_END)) {
        (Some(begin), Some(end)) if begin < end => {
            let after = end + RESULTS_END.len();
            format!("{}{block}{}", &readme[..begin], &readme[after..])
        }
        _ => format!("{}\n\n{block}\n", readme.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::sample_record;

    fn machine() -> MachineInfo {
        MachineInfo {
            cpu_model: "AMD EPYC".into(),
            cpus_online: 2,
            cpus_available: vec![0, 1],
            kernel: "6.1".into(),
            memory_gib: 23.5,
            image_filesystem: "/dev/vda ext4".into(),
            fio_version: "fio-3.33".into(),
            qsd_version: "qemu-storage-daemon version 7.2".into(),
            uringblk_revision: "abc123".into(),
            loadavg_start: "0.1 0.2 0.3".into(),
            loadavg_end: "0.4 0.5 0.6".into(),
        }
    }

    fn settings(targets: Vec<Target>) -> Settings {
        Settings {
            mode: "quick".into(),
            runtime_s: 1.0,
            ramp_s: 0.5,
            reps: 3,
            completion: "blocking".into(),
            null_completion: Some("poll".into()),
            image: "/img".into(),
            image_bytes: 1 << 30,
            server_cpus: vec![1],
            client_cpus: vec![0],
            targets,
            jobs: vec!["randread-4k-qd1".into()],
            queue_counts: vec![1],
            scaling: false,
            guest: false,
            uringblk_args: vec![],
        }
    }

    fn records(target: Target, iops: &[f64]) -> Vec<RunRecord> {
        iops.iter()
            .enumerate()
            .map(|(i, &v)| {
                let mut r = sample_record(target, v, Some((0.5, 1.0)));
                r.rep = i as u32 + 1;
                if let Some(m) = r.measurement.as_mut() {
                    m.lat_p99_us = 1e6 / v;
                }
                r
            })
            .collect()
    }

    fn summary_of(records: Vec<RunRecord>, targets: Vec<Target>) -> Summary {
        Summary {
            run_id: "20260101T000000Z-quick".into(),
            date: "2026-01-01T00:00:00Z".into(),
            raw_file: "bench/results/raw/x.jsonl".into(),
            settings: settings(targets),
            machine: machine(),
            points: summarize(&records),
            steal_guard: None,
        }
    }

    #[test]
    fn summary_takes_medians_per_point_and_counts_failures() {
        let mut recs = records(Target::QsdFile, &[100.0, 300.0, 200.0]);
        let mut failed = sample_record(Target::QsdFile, 0.0, None);
        failed.measurement = None;
        failed.error = Some("boom".into());
        recs.push(failed);
        recs.extend(records(Target::Host, &[1000.0]));
        let points = summarize(&recs);
        assert_eq!(points.len(), 2);
        let qsd = &points[0];
        assert_eq!(qsd.target, Target::QsdFile);
        assert_eq!((qsd.runs_ok, qsd.runs_failed), (3, 1));
        assert_eq!(qsd.first_error.as_deref(), Some("boom"));
        let iops = qsd.iops.unwrap();
        assert_eq!((iops.median, iops.min, iops.max), (200.0, 100.0, 300.0));
        assert_eq!(qsd.server_cores_busy.unwrap().median, 0.5);
        assert_eq!(qsd.iops_per_server_cpu_s.unwrap().median, 400.0);
        assert_eq!(points[1].iops.unwrap().samples, 1);
    }

    /// The shortfall line of the file backend's randread-4k-qd1 q1 IOPS in `md`.
    fn file_iops_shortfall_line(md: &str) -> &str {
        md.lines()
            .find(|l| l.starts_with("- randread-4k-qd1 q1 (file): IOPS"))
            .unwrap_or_else(|| panic!("no shortfall line in:\n{md}"))
    }

    /// The report of records that carry neither steal nor placement (older results).
    fn markdown_of_plain_records() -> String {
        let summary = summary_of(
            records(Target::UringblkFile, &[90.0]),
            vec![Target::UringblkFile],
        );
        render_markdown(&summary, None)
    }

    #[test]
    fn steal_is_summarised_in_the_header_and_beside_each_shortfall() {
        let with_steal = |target, iops: &[f64], steal: f64| {
            let mut recs = records(target, iops);
            for r in &mut recs {
                r.host_steal = Some(steal);
            }
            recs
        };
        let mut recs = with_steal(Target::UringblkFile, &[90.0, 95.0], 0.25);
        recs.extend(with_steal(Target::QsdFile, &[100.0, 100.0], 0.05));
        let summary = summary_of(recs, vec![Target::UringblkFile, Target::QsdFile]);
        let md = render_markdown(&summary, None);
        assert!(
            md.contains("15.0 % typical") && md.contains("25.0 % at most"),
            "{md}"
        );
        let line = file_iops_shortfall_line(&md);
        assert!(
            line.ends_with("steal in its runs 25.0 % (uringblk), 5.0 % (qsd)"),
            "{line}"
        );
        // Results recorded before steal was: no steal words at all.
        assert!(!markdown_of_plain_records().contains("Steal"));
    }

    #[test]
    fn placement_is_summarised_in_the_header_and_beside_each_shortfall() {
        let placed = |target, iops: &[f64], trips: &[f64]| {
            let mut recs = records(target, iops);
            for (r, t) in recs.iter_mut().zip(trips) {
                r.cpu_round_trip_ns = Some(*t);
            }
            recs
        };
        let mut recs = placed(
            Target::UringblkFile,
            &[90.0, 95.0, 92.0],
            &[93.0, 420.0, 95.0],
        );
        recs.extend(placed(
            Target::QsdFile,
            &[100.0, 100.0, 100.0],
            &[90.0, 91.0, 96.0],
        ));
        let summary = summary_of(recs, vec![Target::UringblkFile, Target::QsdFile]);
        let md = render_markdown(&summary, None);
        assert!(
            md.contains("93 ns typical") && md.contains("420 ns at most"),
            "{md}"
        );
        let line = file_iops_shortfall_line(&md);
        assert!(
            line.ends_with(
                "cache-line round trip in its runs 93–420 ns (uringblk), 90–96 ns (qsd)"
            ),
            "{line}"
        );
        // Results recorded before placement was: no placement words at all.
        assert!(!markdown_of_plain_records().contains("Placement"));
    }

    #[test]
    fn runs_the_steal_guard_discarded_count_only_as_reruns() {
        let mut recs = records(Target::QsdFile, &[100.0, 300.0, 200.0]);
        let mut stolen = sample_record(Target::QsdFile, 5.0, None);
        stolen.host_steal = Some(0.3);
        stolen.discarded = Some("steal 30.0 % > 5.0 %: run again".into());
        recs.insert(1, stolen);
        let mut summary = summary_of(recs, vec![Target::QsdFile]);
        let qsd = &summary.points[0];
        assert_eq!((qsd.runs_ok, qsd.reruns_for_steal), (3, 1));
        assert_eq!(qsd.iops.unwrap().min, 100.0);
        assert_eq!(
            qsd.host_steal, None,
            "the discarded run's steal is not the point's"
        );
        summary.points[0].host_steal = Spread::of([0.01]);
        summary.steal_guard = Some(StealGuardReport {
            limit: Some(0.05),
            reruns: 1,
            waited_s: 42.0,
            kept_above_limit: 0,
        });
        let md = render_markdown(&summary, None);
        assert!(
            md.contains("limit 5.0 %) waited 42 s")
                && md.contains("made 1 stolen-from run(s)")
                && md.contains("by target: qsd-file 1."),
            "{md}"
        );
    }

    #[test]
    fn table_shows_ratios_against_qsd_and_host() {
        let mut recs = records(Target::UringblkFile, &[150.0, 160.0, 170.0]);
        recs.extend(records(Target::QsdFile, &[100.0, 80.0, 120.0]));
        recs.extend(records(Target::Host, &[200.0, 200.0, 200.0]));
        let summary = summary_of(
            recs,
            vec![Target::UringblkFile, Target::QsdFile, Target::Host],
        );
        let md = render_markdown(&summary, None);
        let row = md
            .lines()
            .find(|l| l.starts_with("| randread-4k-qd1 | 1 | 160 [150–170]"))
            .unwrap_or_else(|| panic!("no IOPS row in:\n{md}"));
        // 160 / 100 and 160 / 200; the null columns have no data.
        assert!(row.contains("| 1.60× | 0.80× |"), "{row}");
        assert!(row.ends_with("| n/a | n/a | n/a |"), "{row}");
        assert!(
            md.contains("Nowhere: uringblk's median is at least"),
            "{md}"
        );
        assert!(md.contains("Not run in this mode"));
    }

    #[test]
    fn header_says_how_the_client_waited_on_each_backend() {
        let recs = records(Target::UringblkNull, &[100.0]);
        let mut summary = summary_of(
            recs.clone(),
            vec![Target::UringblkNull, Target::UringblkFile],
        );
        let md = render_markdown(&summary, None);
        assert!(
            md.contains("poll completions on the null backends")
                && md.contains("blocking completions elsewhere"),
            "{md}"
        );
        // Without a null target (or with one mode for all) it is one mode.
        summary = summary_of(recs, vec![Target::UringblkFile]);
        let md = render_markdown(&summary, None);
        assert!(
            md.contains("(libblkio virtio-blk-vhost-user, blocking completions, no VM)"),
            "{md}"
        );
    }

    #[test]
    fn guest_section_names_the_accelerator_and_ratio() {
        let mut recs = Vec::new();
        for (target, iops) in [(Target::UringblkNull, 300.0), (Target::QsdNull, 200.0)] {
            for mut r in records(target, &[iops]) {
                r.phase = Phase::Guest;
                r.client = ClientKind::GuestFio;
                r.accelerator = Some("tcg".into());
                recs.push(r);
            }
        }
        let mut summary = summary_of(recs, vec![Target::UringblkNull, Target::QsdNull]);
        summary.settings.guest = true;
        let md = render_markdown(&summary, None);
        assert!(md.contains("accelerator: **tcg**"), "{md}");
        assert!(md.contains("Under TCG"), "{md}");
        let row = md
            .lines()
            .find(|l| l.starts_with("| randread-4k-qd1 | 1 | 300, p99"))
            .unwrap_or_else(|| panic!("no guest row:\n{md}"));
        assert!(row.ends_with("| n/a | 1.50× |"), "{row}");
        // Guest points stay out of the loadgen tables.
        assert!(md.contains("No comparison: this run lacks"), "{md}");
    }

    #[test]
    fn scaling_table_divides_by_server_cores_and_labels_qsd_threads() {
        let mut recs = Vec::new();
        for (target, iops) in [(Target::UringblkNull, 2000.0), (Target::QsdNull, 1000.0)] {
            for mut r in records(target, &[iops]) {
                r.phase = Phase::Scaling;
                r.iothreads = 2;
                r.queues = 2;
                r.server_cpus = vec![1, 0];
                recs.push(r);
            }
        }
        let md = render_markdown(
            &summary_of(recs, vec![Target::UringblkNull, Target::QsdNull]),
            None,
        );
        // IOPS / 2 CPUs, and IOPS / 0.5 busy cores.
        assert!(
            md.contains("| uringblk-null | 2 | 1,0 | 2.0k | 1.0k | 4.0k | 0.50 |"),
            "{md}"
        );
        assert!(
            md.contains("| qsd-null | 1 (2 queues) | 1,0 | 1.0k | 500 | 2.0k | 0.50 |"),
            "{md}"
        );
    }

    #[test]
    fn no_uringblk_results_means_no_verdict() {
        let summary = summary_of(records(Target::QsdFile, &[100.0]), vec![Target::QsdFile]);
        let md = render_markdown(&summary, None);
        assert!(md.contains("No comparison: this run lacks"), "{md}");
        assert!(!md.contains("Nowhere"));
    }

    #[test]
    fn slower_jobs_are_called_out() {
        let mut recs = records(Target::UringblkNull, &[90.0]);
        recs.extend(records(Target::QsdNull, &[100.0]));
        let summary = summary_of(recs, vec![Target::UringblkNull, Target::QsdNull]);
        let found = shortfalls(&summary);
        // Fewer IOPS, and (latency = 1e6 / IOPS in these records) a higher QD1 p99.
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].what, "IOPS");
        assert!((found[0].ratio - 0.9).abs() < 1e-9);
        assert_eq!(found[1].what, "p99 latency");
        let md = render_markdown(&summary, None);
        assert!(
            md.contains("- randread-4k-qd1 q1 (null): IOPS ratio 0.90"),
            "{md}"
        );
    }

    #[test]
    fn overlapping_ranges_are_marked_as_noise() {
        let mut recs = records(Target::UringblkFile, &[90.0, 95.0, 120.0]);
        recs.extend(records(Target::QsdFile, &[100.0, 100.0, 110.0]));
        let summary = summary_of(recs, vec![Target::UringblkFile, Target::QsdFile]);
        let found = shortfalls(&summary);
        assert_eq!(found[0].what, "IOPS");
        assert!(found[0].within_spread);
        assert!(render_markdown(&summary, None).contains("ratio 0.95 (within run-to-run spread"));
    }

    #[test]
    fn readme_section_is_replaced_between_markers_only() {
        let readme = format!("# Title\nintro\n{RESULTS_BEGIN}\nold table\n{RESULTS_END}\nafter\n");
        let new = replace_results_section(&readme, "new table\n");
        assert_eq!(
            new,
            format!("# Title\nintro\n{RESULTS_BEGIN}\nnew table\n{RESULTS_END}\nafter\n")
        );
        // Idempotent, and markers are added when missing.
        assert_eq!(replace_results_section(&new, "new table"), new);
        let appended = replace_results_section("# Only a title\n", "t");
        assert!(appended.starts_with("# Only a title\n\n"));
        assert!(appended.contains(&format!("{RESULTS_BEGIN}\nt\n{RESULTS_END}")));
    }

    #[test]
    fn number_formats() {
        assert_eq!(fmt_count(999.4), "999");
        assert_eq!(fmt_count(12_345.0), "12.3k");
        assert_eq!(fmt_count(1_234_567.0), "1.23M");
        assert_eq!(fmt_us(5.54), "5.5");
        assert_eq!(fmt_us(1234.4), "1234");
        assert_eq!(fmt_ratio(Some(1.234)), "1.23×");
        assert_eq!(fmt_ratio(None), "n/a");
    }

    #[test]
    fn summary_round_trips_through_json() {
        let summary = summary_of(records(Target::Host, &[1.0, 2.0]), vec![Target::Host]);
        let text = serde_json::to_string_pretty(&summary).unwrap();
        assert_eq!(serde_json::from_str::<Summary>(&text).unwrap(), summary);
    }
}
