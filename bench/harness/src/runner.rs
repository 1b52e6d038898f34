//! Executes a plan: for each run, start the target's server, run the client, stop the server,
//! and append the record to the raw JSON lines file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use uringblk_loadgen::CompletionMode;

use crate::clients::{self, ClientKind, ClientOutcome, Timing};
use crate::matrix::{Phase, RunSpec};
use crate::record::RunRecord;
use crate::steal_guard::{StealGuard, Verdict};
use crate::targets::{server_command, Backend, Server, ServerProcess, ServerSetup};
use crate::BenchError;
use crate::{placement, procstat};

/// Programs, files and pinning shared by every run.
#[derive(Debug, Clone)]
pub struct Environment {
    pub run_id: String,
    pub uringblk: PathBuf,
    pub qsd: PathBuf,
    pub fio: PathBuf,
    pub loadgen: PathBuf,
    pub image: PathBuf,
    pub image_size: u64,
    pub client_cpus: Vec<usize>,
    /// How the load generator waits for completions.
    pub completion: CompletionMode,
    /// The same for the null backends in the matrix phase.
    pub null_completion: CompletionMode,
    /// Sockets and server logs.
    pub workdir: PathBuf,
    /// The built measurement guest, for guest fio runs.
    pub guest_dir: Option<PathBuf>,
    /// Extra arguments appended to every uringblk command line.
    pub uringblk_args: Vec<String>,
    /// The RBD targets' image, when they run.
    pub rbd: Option<crate::targets::RbdSetup>,
}

impl Environment {
    /// The load generator's completion mode for a run.
    pub fn completion_for(&self, spec: &RunSpec) -> CompletionMode {
        if spec.phase == Phase::Matrix && spec.target.backend() == Backend::Null {
            self.null_completion
        } else {
            self.completion
        }
    }
}

/// One planned run and how long it lasts.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    pub spec: RunSpec,
    pub timing: Timing,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Runs one point once. Never fails: a failure is recorded in the returned record.
pub fn run_one(env: &Environment, planned: &PlannedRun, seq: usize) -> RunRecord {
    let spec = &planned.spec;
    let client = match (spec.phase, spec.target.server()) {
        (Phase::Guest, _) => ClientKind::GuestFio,
        (_, Some(_)) => ClientKind::Loadgen,
        (_, None) => ClientKind::HostFio,
    };
    let mut record = RunRecord {
        run_id: env.run_id.clone(),
        seq,
        phase: spec.phase,
        target: spec.target,
        client,
        job: spec.job.clone(),
        queues: spec.queues,
        iothreads: spec.iothreads,
        server_cpus: spec.server_cpus.clone(),
        client_cpus: env.client_cpus.clone(),
        rep: spec.rep,
        started_at: now_rfc3339(),
        measurement: None,
        server_cpu: None,
        host_steal: None,
        cpu_round_trip_ns: None,
        discarded: None,
        error: None,
        warnings: Vec::new(),
        server_argv: None,
        client_argv: Vec::new(),
        server_stats: None,
        client_report: Value::Null,
        accelerator: None,
    };
    let round_trip = || client_server_round_trip_ns(&env.client_cpus, &spec.server_cpus);
    let round_trip_before = round_trip();
    let ticks_before = procstat::machine_ticks();
    let result = run_client_and_server(env, planned, seq, &mut record);
    if let (Ok(before), Ok(after)) = (ticks_before, procstat::machine_ticks()) {
        record.host_steal = before.steal_fraction_until(&after);
    }
    record.cpu_round_trip_ns = match (round_trip_before, round_trip()) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    match result {
        Ok(outcome) => {
            record.measurement = Some(outcome.measurement);
            record.server_cpu = outcome.server_cpu;
            record.client_argv = outcome.argv;
            record.client_report = outcome.raw;
        }
        Err(e) => record.error = Some(e.to_string()),
    }
    record
}

/// The placement probe (placement.rs) between the first client and the first server CPU.
fn client_server_round_trip_ns(client_cpus: &[usize], server_cpus: &[usize]) -> Option<f64> {
    const PROBE: Duration = Duration::from_millis(20);
    placement::cache_line_round_trip_ns(*client_cpus.first()?, *server_cpus.first()?, PROBE)
}

fn run_client_and_server(
    env: &Environment,
    planned: &PlannedRun,
    seq: usize,
    record: &mut RunRecord,
) -> Result<ClientOutcome, BenchError> {
    let spec = &planned.spec;
    let Some(server) = spec.target.server() else {
        let argv = clients::host_fio_command(
            &env.fio,
            &env.image,
            env.image_size,
            &spec.job,
            spec.queues,
            planned.timing,
            &env.client_cpus,
        );
        record.client_argv = argv.clone();
        return clients::run_host_fio(argv, planned.timing);
    };
    let socket = env.workdir.join(format!("run-{seq}.sock"));
    // A socket left by a crashed server would make the readiness check pass too early.
    let _ = std::fs::remove_file(&socket);
    let setup = ServerSetup {
        uringblk: &env.uringblk,
        qsd: &env.qsd,
        image: &env.image,
        null_size: env.image_size,
        socket: &socket,
        queues: spec.queues,
        iothreads: spec.iothreads,
        cpus: &spec.server_cpus,
        rbd: env.rbd.as_ref(),
    };
    let mut server_argv = server_command(server, spec.target.backend(), &setup);
    if server == Server::Uringblk {
        server_argv.extend(env.uringblk_args.iter().cloned());
    }
    record.server_argv = Some(server_argv.clone());
    let mut process = ServerProcess::start(
        server_argv,
        &socket,
        &env.workdir,
        &format!("run-{seq}-{}", spec.target),
    )?;
    if spec.phase == Phase::Guest {
        let guest_dir = env
            .guest_dir
            .as_deref()
            .ok_or_else(|| BenchError::Usage("guest runs need the built guest".into()))?;
        let job_text =
            clients::guest_fio_job(&spec.job, spec.queues, planned.timing, env.image_size);
        let (outcome, accel) = clients::run_guest_fio(
            &socket,
            guest_dir,
            job_text,
            spec.queues,
            planned.timing,
            &env.client_cpus,
        )?;
        record.accelerator = Some(accel);
        record.client_argv = outcome.argv.clone();
        process.check_alive()?;
        stop_server(process, record);
        let _ = std::fs::remove_file(&socket);
        return Ok(outcome);
    }
    let argv = clients::loadgen_command(
        &env.loadgen,
        &socket,
        &spec.job,
        spec.queues,
        planned.timing,
        env.completion_for(spec),
        &env.client_cpus,
    );
    record.client_argv = argv.clone();
    let outcome = clients::run_loadgen(argv, planned.timing, process.pid());
    let outcome = match (outcome, process.check_alive()) {
        (Ok(outcome), Ok(())) => outcome,
        (Err(e), Err(server_gone)) => {
            return Err(BenchError::Client(format!("{e}; {server_gone}")));
        }
        (Err(e), Ok(())) => {
            return Err(BenchError::Client(format!(
                "{e} (server log: {})",
                process.stderr_tail()
            )))
        }
        (Ok(_), Err(server_gone)) => return Err(server_gone),
    };
    stop_server(process, record);
    let _ = std::fs::remove_file(&socket);
    Ok(outcome)
}

/// Stops the server; an unclean exit is a warning on the record, not a failed measurement.
fn stop_server(process: ServerProcess, record: &mut RunRecord) {
    match process.stop() {
        Ok((status, stdout)) => {
            if !status.success() {
                record
                    .warnings
                    .push(format!("server exit after SIGTERM: {status}"));
            }
            record.server_stats = serde_json::from_str(stdout.trim()).ok();
        }
        Err(e) => record.warnings.push(e.to_string()),
    }
}

/// One-line description of a run, as printed in progress lines.
pub fn describe(spec: &RunSpec) -> String {
    match spec.phase {
        Phase::Matrix => format!(
            "{} {} q{} rep {}",
            spec.target, spec.job.name, spec.queues, spec.rep
        ),
        Phase::Guest => format!(
            "guest-fio {} {} q{} rep {}",
            spec.target, spec.job.name, spec.queues, spec.rep
        ),
        Phase::Scaling => format!(
            "scaling {} {} t{} q{} rep {}",
            spec.target, spec.job.name, spec.iothreads, spec.queues, spec.rep
        ),
    }
}

fn format_eta(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Runs every planned run in order, appending each record to `raw` as soon as it exists and
/// printing a progress line on stderr. The steal guard holds a run back while the hypervisor is
/// taking this machine's CPU time and makes a stolen-from run again; the runs it discards are
/// returned and kept in `raw` like the others, marked `discarded` (the report counts them as
/// reruns and leaves them out of the medians).
pub fn run_plan(
    env: &Environment,
    plan: &[PlannedRun],
    raw_path: &Path,
    guard: &mut StealGuard,
) -> Result<Vec<RunRecord>, BenchError> {
    let mut raw = File::options()
        .create(true)
        .append(true)
        .open(raw_path)
        .map_err(|e| BenchError::io(raw_path, e))?;
    let started = Instant::now();
    let total = plan.len();
    let mut records = Vec::with_capacity(total);
    let mut runs_made = 0;
    for (index, planned) in plan.iter().enumerate() {
        let position = index + 1;
        let mut reruns = 0;
        loop {
            guard.wait_for_calm(&mut procstat::steal_over, &mut |steal, waited, left| {
                eprintln!(
                    "[{position}/{total}] steal {:.0} %: waiting for it to pass ({} so far, {} \
                     of the wait budget left)",
                    steal * 100.0,
                    format_eta(waited.as_secs_f64()),
                    format_eta(left.as_secs_f64())
                );
            });
            runs_made += 1;
            let mut record = run_one(env, planned, runs_made);
            let verdict = guard.verdict(record.host_steal, reruns);
            if let Verdict::RunAgain(why) = &verdict {
                record.discarded = Some(why.clone());
            }
            let line =
                serde_json::to_string(&record).map_err(|e| BenchError::Parse(e.to_string()))?;
            writeln!(raw, "{line}").map_err(|e| BenchError::io(raw_path, e))?;
            let elapsed = started.elapsed().as_secs_f64();
            let eta = elapsed / position as f64 * (total - position) as f64;
            let mut result = match (&record.measurement, &record.error) {
                (Some(m), None) => format!("{:.0} IOPS", m.iops),
                (_, Some(e)) => format!("FAILED: {e}"),
                (None, None) => "no measurement".into(),
            };
            if let Some(why) = &record.discarded {
                result = format!("{result}; {why}");
            }
            eprintln!(
                "[{position}/{total}] {}: {result} (eta {})",
                describe(&planned.spec),
                format_eta(eta)
            );
            records.push(record);
            match verdict {
                Verdict::Keep => break,
                Verdict::RunAgain(_) => reruns += 1,
            }
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::Target;

    fn environment() -> Environment {
        Environment {
            run_id: "test".into(),
            uringblk: "uringblk".into(),
            qsd: "qemu-storage-daemon".into(),
            fio: "fio".into(),
            loadgen: "uringblk-loadgen".into(),
            image: "/img".into(),
            image_size: 1 << 30,
            client_cpus: vec![0],
            completion: CompletionMode::Blocking,
            null_completion: CompletionMode::Poll,
            workdir: "/tmp".into(),
            guest_dir: None,
            uringblk_args: vec![],
            rbd: None,
        }
    }

    #[test]
    fn null_matrix_points_use_the_null_completion_mode_and_the_rest_the_other() {
        let env = environment();
        let jobs = crate::matrix::select_jobs(Some(&["randread-4k-qd32".to_string()])).unwrap();
        let targets = [
            Target::UringblkNull,
            Target::QsdNull,
            Target::UringblkFile,
            Target::Host,
        ];
        let matrix = crate::matrix::matrix_plan(&jobs, &[1], &targets, 1, &[1]);
        for spec in &matrix {
            let expected = if spec.target.backend() == Backend::Null {
                CompletionMode::Poll
            } else {
                CompletionMode::Blocking
            };
            assert_eq!(env.completion_for(spec), expected, "{:?}", spec.target);
        }
        // In the sweep a client may share a CPU with a server: a polling one would starve it.
        let sweep = crate::matrix::scaling_plan(&[Target::UringblkNull], 2, 1, &[1, 0]);
        assert!(!sweep.is_empty());
        for spec in &sweep {
            assert_eq!(env.completion_for(spec), CompletionMode::Blocking);
        }
    }

    #[test]
    fn eta_is_readable() {
        assert_eq!(format_eta(5.4), "5s");
        assert_eq!(format_eta(125.0), "2m05s");
        assert_eq!(format_eta(-3.0), "0s");
    }
}
