//! `uringblk-bench`: run the benchmark matrix (and, in full mode, the scaling sweep) and write
//! bench/results/{raw/<run-id>.jsonl, latest.json, table.md, *.png} and the results section of
//! bench/README.md. `bench/run.sh quick|full` builds everything and calls this.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, SystemTime};

use clap::Parser;
use uringblk_bench::clients::Timing;
use uringblk_bench::matrix::{self, RunSpec};
use uringblk_bench::report::{self, Settings, Summary};
use uringblk_bench::runner::{self, Environment, PlannedRun};
use uringblk_bench::steal_guard::{StealGuard, StealPolicy};
use uringblk_bench::targets::{cpu_list, Target};
use uringblk_bench::{charts, image, machine, rbd, targets, BenchError};
use uringblk_loadgen::spec::{parse_duration, parse_size, CpuList};
use uringblk_loadgen::CompletionMode;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "uringblk vs qemu-storage-daemon vs host: the benchmark harness"
)]
struct Cli {
    /// Short runs, no scaling sweep: a few minutes (the default).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Longer runs plus the per-core scaling sweep.
    #[arg(long)]
    full: bool,
    /// Targets to run (default: all but the RBD ones): uringblk-file, qsd-file, host,
    /// uringblk-null, qsd-null, uringblk-rbd, qsd-rbd.
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<Target>>,
    /// Jobs to run (default: all of the matrix), by name, e.g. randread-4k-qd32.
    #[arg(long, value_delimiter = ',')]
    jobs: Option<Vec<String>>,
    /// Queue counts of the matrix.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    queues: Vec<u32>,
    /// Repetitions of every point (default: 3 quick, 6 full). The targets take turns, one run
    /// each per round: more, shorter rounds spread a disk's slow minutes over every target.
    #[arg(long)]
    reps: Option<u32>,
    /// Measured time per run (default: 1s quick, 5s full).
    #[arg(long, value_parser = duration_arg)]
    runtime: Option<Duration>,
    /// Warm-up per run, not measured (default: 0.5s quick, 1s full).
    #[arg(long, value_parser = duration_arg)]
    ramp: Option<Duration>,
    /// The steal guard's limit, in percent of the machine's CPU time: a run waits to start while
    /// the hypervisor takes more than this (sampled over 2 s), and a run that saw more is made
    /// again. Stolen stretches slow whichever target runs in them; 0 turns the guard off.
    #[arg(long, default_value_t = 5.0, value_name = "PCT")]
    steal_limit: f64,
    /// How many times one stolen-from run is made again before it is kept as it is.
    #[arg(long, default_value_t = 2, value_name = "N")]
    steal_reruns: u32,
    /// Longest wait for stolen stretches to pass, over the whole run (default: 2m quick, 20m
    /// full); after it runs go on and keep their steal on record.
    #[arg(long, value_parser = duration_arg, value_name = "DURATION")]
    steal_wait: Option<Duration>,
    /// Run the scaling sweep (default: only in full mode).
    #[arg(long, overrides_with = "no_scaling")]
    scaling: bool,
    /// Skip the scaling sweep.
    #[arg(long)]
    no_scaling: bool,
    /// Also run the matrix with fio inside a QEMU guest (crates/guestvm): the whole path. Each
    /// run boots a VM (KVM where it works, else TCG, whose figures measure the emulator more
    /// than the server).
    #[arg(long)]
    guest: bool,
    /// Repetitions of guest points (default: --reps).
    #[arg(long)]
    guest_reps: Option<u32>,
    /// The image file for the file backends and the host target (created and filled if
    /// missing). Put it on the disk you want to measure.
    #[arg(long, default_value = "bench/work/bench.img")]
    image: PathBuf,
    /// Image size; also the size of the null backends.
    #[arg(long, default_value = "1G", value_parser = size_arg)]
    image_size: u64,
    /// CPUs of the server (default: the last available CPU).
    #[arg(long)]
    server_cpus: Option<CpuList>,
    /// CPUs of the client (default: the first available CPU).
    #[arg(long)]
    client_cpus: Option<CpuList>,
    /// How the load generator waits for completions on the file and RBD backends, and in the
    /// scaling sweep (where a client may share a CPU with a server).
    #[arg(long, value_enum, default_value = "blocking")]
    completion: CompletionMode,
    /// How it waits on the null backends in the matrix. `poll` (the default) keeps the client
    /// from being the bottleneck, so that the null figures measure the server's dataplane: a
    /// sleeping client's wake-up costs more than the server's work per batch.
    #[arg(long, value_enum, default_value = "poll")]
    null_completion: CompletionMode,
    /// Where results go.
    #[arg(long, default_value = "bench/results")]
    results_dir: PathBuf,
    /// README whose results section is rewritten.
    #[arg(long, default_value = "bench/README.md")]
    readme: PathBuf,
    /// Leave the README alone.
    #[arg(long)]
    no_readme: bool,
    /// uringblk binary (default: next to this program).
    #[arg(long)]
    uringblk: Option<PathBuf>,
    /// uringblk-loadgen binary (default: next to this program).
    #[arg(long)]
    loadgen: Option<PathBuf>,
    /// Extra argument for every uringblk server (repeatable), e.g. --uringblk-arg=--poll-us=0.
    #[arg(long = "uringblk-arg", allow_hyphen_values = true)]
    uringblk_args: Vec<String>,
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    #[arg(long, default_value = "fio")]
    fio: PathBuf,
    /// Ceph cluster of the RBD targets (default: a single-node one that
    /// scripts/ceph-cluster.sh starts in bench/work/ceph for the run, and stops after).
    #[arg(long)]
    ceph_conf: Option<PathBuf>,
    /// The RBD targets' image, POOL/IMAGE: created (--image-size) and filled if missing.
    #[arg(long, default_value = "rbd/uringblk-bench")]
    rbd_image: String,
    /// Print the plan and exit.
    #[arg(long)]
    dry_run: bool,
    /// Redraw table, charts and README from <results-dir>/latest.json without running anything.
    #[arg(long)]
    render_only: bool,
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}

fn size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("uringblk-bench: some runs failed; see the tables' \"Failed runs\" section");
            ExitCode::FAILURE
        }
        Err(e @ BenchError::Usage(_)) => {
            eprintln!("uringblk-bench: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("uringblk-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn run_id(mode: &str) -> String {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let compact: String = stamp.chars().filter(|c| *c != '-' && *c != ':').collect();
    format!("{compact}-{mode}")
}

/// Fails unless `program --version` runs.
fn require_tool(program: &Path, why: &str) -> Result<(), BenchError> {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(BenchError::Usage(format!(
            "{} is needed {why} but does not run; install it (Debian 12: apt-get install fio \
             qemu-system-common util-linux) or drop the target with --targets",
            program.display()
        )))
    }
}

fn run(cli: Cli) -> Result<bool, BenchError> {
    let mode = if cli.full { "full" } else { "quick" };
    if cli.render_only {
        let latest = cli.results_dir.join("latest.json");
        let text = std::fs::read_to_string(&latest).map_err(|e| BenchError::io(&latest, e))?;
        let summary: Summary =
            serde_json::from_str(&text).map_err(|e| BenchError::Parse(e.to_string()))?;
        write_outputs(&summary, &cli)?;
        return Ok(true);
    }
    let runtime =
        cli.runtime
            .unwrap_or(Duration::from_millis(if cli.full { 5_000 } else { 1_000 }));
    let ramp = cli
        .ramp
        .unwrap_or(Duration::from_millis(if cli.full { 1_000 } else { 500 }));
    let reps = cli.reps.unwrap_or(if cli.full { 6 } else { 3 });
    if !(0.0..100.0).contains(&cli.steal_limit) {
        return Err(BenchError::Usage(format!(
            "--steal-limit {} is not a percentage below 100 (0 turns the guard off)",
            cli.steal_limit
        )));
    }
    let steal_policy = StealPolicy {
        limit: (cli.steal_limit > 0.0).then_some(cli.steal_limit / 100.0),
        reruns_per_run: cli.steal_reruns,
        wait_budget: cli.steal_wait.unwrap_or(Duration::from_secs(if cli.full {
            20 * 60
        } else {
            2 * 60
        })),
        sample: Duration::from_secs(2),
    };
    let scaling = (cli.full || cli.scaling) && !cli.no_scaling;
    let guest = cli.guest;
    let targets: Vec<Target> = cli
        .targets
        .clone()
        .unwrap_or_else(|| Target::DEFAULT.to_vec());
    let jobs = matrix::select_jobs(cli.jobs.as_deref())?;
    if reps == 0 || cli.queues.is_empty() || cli.queues.contains(&0) {
        return Err(BenchError::Usage(
            "reps and queue counts must be at least 1".into(),
        ));
    }

    let available = machine::available_cpus();
    let server_cpus = cli
        .server_cpus
        .clone()
        .map(|c| c.0)
        .unwrap_or_else(|| available.last().copied().into_iter().collect());
    let client_cpus = cli
        .client_cpus
        .clone()
        .map(|c| c.0)
        .unwrap_or_else(|| available.first().copied().into_iter().collect());
    for cpu in server_cpus.iter().chain(&client_cpus) {
        if !available.contains(cpu) {
            return Err(BenchError::Usage(format!(
                "CPU {cpu} is not available (available: {})",
                cpu_list(&available)
            )));
        }
    }
    if server_cpus.iter().any(|c| client_cpus.contains(c)) {
        eprintln!(
            "uringblk-bench: WARNING: server CPUs {} and client CPUs {} overlap; figures will \
             include their contention",
            cpu_list(&server_cpus),
            cpu_list(&client_cpus)
        );
    }

    let uringblk = cli
        .uringblk
        .clone()
        .unwrap_or_else(|| sibling_binary("uringblk"));
    let loadgen = cli
        .loadgen
        .clone()
        .unwrap_or_else(|| sibling_binary("uringblk-loadgen"));

    // Plan: the matrix, then the scaling sweep over the targets that have a server.
    let matrix_timing = Timing { runtime, ramp };
    let mut plan: Vec<PlannedRun> =
        matrix::matrix_plan(&jobs, &cli.queues, &targets, reps, &server_cpus)
            .into_iter()
            .map(|spec| PlannedRun {
                spec,
                timing: matrix_timing,
            })
            .collect();
    if scaling {
        let scaling_targets: Vec<Target> = [
            Target::UringblkNull,
            Target::QsdNull,
            Target::UringblkFile,
            Target::QsdFile,
        ]
        .into_iter()
        .filter(|t| targets.contains(t))
        .collect();
        let order = matrix::scaling_cpu_order(&server_cpus, &available);
        plan.extend(
            matrix::scaling_plan(&scaling_targets, available.len() as u32, reps, &order)
                .into_iter()
                .map(|spec| PlannedRun {
                    spec,
                    timing: matrix_timing,
                }),
        );
    }
    if guest {
        plan.extend(
            matrix::guest_plan(
                &jobs,
                &cli.queues,
                &targets,
                cli.guest_reps.unwrap_or(reps).max(1),
                &server_cpus,
            )
            .into_iter()
            .map(|spec| PlannedRun {
                spec,
                timing: matrix_timing,
            }),
        );
    }
    let per_run = runtime + ramp + Duration::from_millis(400);
    eprintln!(
        "uringblk-bench: {mode} mode, {} runs (about {} min), server CPU {}, client CPU {}",
        plan.len(),
        (per_run * plan.len() as u32).as_secs().div_ceil(60),
        cpu_list(&server_cpus),
        cpu_list(&client_cpus)
    );
    if cli.dry_run {
        for (i, p) in plan.iter().enumerate() {
            println!("[{}/{}] {}", i + 1, plan.len(), runner::describe(&p.spec));
        }
        return Ok(true);
    }

    // Prerequisites.
    require_tool(Path::new("taskset"), "to pin servers and clients")?;
    if targets.iter().any(|t| t.server().is_some()) && !loadgen.is_file() {
        return Err(BenchError::Usage(format!(
            "{} not found: build it with cargo build --release -p uringblk-loadgen",
            loadgen.display()
        )));
    }
    if targets.iter().any(|t| t.name().starts_with("uringblk")) && !uringblk.is_file() {
        return Err(BenchError::Usage(format!(
            "{} not found: build it with cargo build --release -p uringblk, or drop the \
             uringblk targets with --targets",
            uringblk.display()
        )));
    }
    if targets.iter().any(|t| t.name().starts_with("qsd")) {
        require_tool(&cli.qsd, "for the qemu-storage-daemon targets")?;
    }
    if targets.contains(&Target::Host) {
        require_tool(&cli.fio, "for the host target")?;
    }

    let guest_dir = if guest {
        let missing = guestvm::missing_prerequisites();
        if !missing.is_empty() {
            return Err(BenchError::Usage(format!(
                "guest runs need {} (or run with --no-guest)",
                missing.join(", ")
            )));
        }
        let dir = guestvm::default_guest_dir();
        eprintln!(
            "uringblk-bench: building the measurement guest in {} if needed",
            dir.display()
        );
        guestvm::build_guest(&dir).map_err(|e| BenchError::Client(format!("guest build: {e}")))?;
        Some(dir)
    } else {
        None
    };

    let created = image::ensure_image(&cli.image, cli.image_size, &mut |done| {
        eprintln!("uringblk-bench: writing the image: {} MiB", done >> 20);
    })?;
    if created {
        eprintln!(
            "uringblk-bench: wrote {} ({} MiB of data)",
            cli.image.display(),
            cli.image_size >> 20
        );
    }
    let image = std::fs::canonicalize(&cli.image).map_err(|e| BenchError::io(&cli.image, e))?;

    let run_id = run_id(mode);
    let raw_dir = cli.results_dir.join("raw");
    std::fs::create_dir_all(&raw_dir).map_err(|e| BenchError::io(&raw_dir, e))?;
    let raw_path = raw_dir.join(format!("{run_id}.jsonl"));
    let workdir = tempfile::Builder::new()
        .prefix("uringblk-bench-")
        .tempdir()
        .map_err(|e| BenchError::io("temporary directory", e))?;
    let mut env = Environment {
        run_id: run_id.clone(),
        uringblk,
        qsd: cli.qsd.clone(),
        fio: cli.fio.clone(),
        loadgen,
        image: image.clone(),
        image_size: cli.image_size,
        client_cpus: client_cpus.clone(),
        completion: cli.completion,
        null_completion: cli.null_completion,
        workdir: workdir.path().to_path_buf(),
        guest_dir,
        uringblk_args: cli.uringblk_args.clone(),
        rbd: None,
    };

    let _cluster;
    if targets.iter().any(|t| t.backend() == targets::Backend::Rbd) {
        let (setup, started) =
            rbd::prepare(cli.ceph_conf.as_deref(), &cli.rbd_image, cli.image_size)?;
        env.rbd = Some(setup);
        _cluster = started;
    }

    preflight(&env, &targets, &jobs, &cli.queues, &server_cpus)?;

    let repo = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let mut machine_info = machine::collect(&image, &cli.fio, &cli.qsd, &repo);
    let mut guard = StealGuard::new(steal_policy);
    let records = runner::run_plan(&env, &plan, &raw_path, &mut guard)?;
    machine_info.loadavg_end = machine::loadavg();

    let summary = Summary {
        run_id,
        date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        raw_file: raw_path.display().to_string(),
        settings: Settings {
            mode: mode.into(),
            runtime_s: runtime.as_secs_f64(),
            ramp_s: ramp.as_secs_f64(),
            reps,
            completion: cli.completion.to_string(),
            null_completion: Some(cli.null_completion.to_string()),
            image: image.display().to_string(),
            image_bytes: cli.image_size,
            server_cpus,
            client_cpus,
            targets,
            jobs: jobs.iter().map(|j| j.name.clone()).collect(),
            queue_counts: cli.queues.clone(),
            scaling,
            guest,
            uringblk_args: cli.uringblk_args.clone(),
        },
        machine: machine_info,
        points: report::summarize(&records),
        steal_guard: Some(guard.report()),
    };
    let latest = cli.results_dir.join("latest.json");
    let text =
        serde_json::to_string_pretty(&summary).map_err(|e| BenchError::Parse(e.to_string()))?;
    std::fs::write(&latest, text + "\n").map_err(|e| BenchError::io(&latest, e))?;
    write_outputs(&summary, &cli)?;
    Ok(records.iter().all(|r| r.ok() || r.discarded.is_some()))
}

/// Starts every target once, briefly, before the real runs: a target that cannot run at all
/// stops the harness now rather than failing every one of its runs.
fn preflight(
    env: &Environment,
    targets: &[Target],
    jobs: &[matrix::Job],
    queue_counts: &[u32],
    server_cpus: &[usize],
) -> Result<(), BenchError> {
    let Some(job) = jobs.first() else {
        return Ok(());
    };
    let queues = queue_counts.iter().copied().max().unwrap_or(1);
    for (i, target) in targets.iter().enumerate() {
        let planned = PlannedRun {
            spec: RunSpec {
                phase: matrix::Phase::Matrix,
                target: *target,
                job: job.clone(),
                queues,
                iothreads: 1,
                server_cpus: server_cpus.to_vec(),
                rep: 0,
            },
            timing: Timing {
                runtime: Duration::from_millis(300),
                ramp: Duration::ZERO,
            },
        };
        let record = runner::run_one(env, &planned, 1_000_000 + i);
        match record.error {
            None => eprintln!("uringblk-bench: preflight {target}: ok"),
            Some(e) => {
                return Err(BenchError::Usage(format!(
                    "preflight of target {target} failed: {e}\n(drop it with --targets)"
                )))
            }
        }
    }
    Ok(())
}

fn write_outputs(summary: &Summary, cli: &Cli) -> Result<(), BenchError> {
    let dir = &cli.results_dir;
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    let charts_ok = match charts::load_font().and_then(|_| charts::draw_all(summary, dir)) {
        Ok(files) => {
            for f in files {
                eprintln!("uringblk-bench: wrote {}", f.display());
            }
            true
        }
        Err(e) => {
            eprintln!("uringblk-bench: WARNING: no charts: {e}");
            false
        }
    };
    let table_path = dir.join("table.md");
    let tables = report::render_markdown(summary, charts_ok.then_some(""));
    std::fs::write(&table_path, format!("## Benchmark results\n\n{tables}"))
        .map_err(|e| BenchError::io(&table_path, e))?;
    eprintln!("uringblk-bench: wrote {}", table_path.display());
    if !cli.no_readme {
        let readme = std::fs::read_to_string(&cli.readme).unwrap_or_default();
        let prefix = relative_prefix(&cli.readme, dir);
        let section = report::render_markdown(summary, charts_ok.then_some(prefix.as_str()));
        let updated = report::replace_results_section(&readme, &section);
        std::fs::write(&cli.readme, updated).map_err(|e| BenchError::io(&cli.readme, e))?;
        eprintln!("uringblk-bench: updated {}", cli.readme.display());
    }
    Ok(())
}

/// Path prefix from the README's directory to the results directory, for image links
/// (bench/README.md and bench/results -> "results/").
fn relative_prefix(readme: &Path, results: &Path) -> String {
    let base = readme.parent().unwrap_or(Path::new(""));
    match results.strip_prefix(base) {
        Ok(rel) if !rel.as_os_str().is_empty() => format!("{}/", rel.display()),
        Ok(_) => String::new(),
        Err(_) => format!("{}/", results.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "uringblk-bench",
            "--full",
            "--targets",
            "qsd-null,host",
            "--jobs",
            "randread-4k-qd1",
            "--queues",
            "1,2",
            "--reps",
            "5",
            "--runtime",
            "2s",
            "--ramp",
            "1s",
            "--server-cpus",
            "2-3",
            "--client-cpus",
            "0",
            "--image-size",
            "2G",
            "--no-scaling",
            "--uringblk-arg=--poll-us=0",
            "--uringblk-arg",
            "--queue-size=512",
        ])
        .unwrap();
        assert!(cli.full && cli.no_scaling);
        assert_eq!(cli.targets, Some(vec![Target::QsdNull, Target::Host]));
        assert_eq!(cli.queues, [1, 2]);
        assert_eq!(cli.server_cpus, Some(CpuList(vec![2, 3])));
        assert_eq!(cli.client_cpus, Some(CpuList(vec![0])));
        assert_eq!(cli.image_size, 2 << 30);
        assert_eq!(cli.uringblk_args, ["--poll-us=0", "--queue-size=512"]);
        assert_eq!(cli.runtime, Some(Duration::from_secs(2)));
        assert!(Cli::try_parse_from(["uringblk-bench", "--quick", "--full"]).is_err());
        assert!(Cli::try_parse_from(["uringblk-bench", "--targets", "nope"]).is_err());
    }

    #[test]
    fn image_links_are_relative_to_the_readme() {
        assert_eq!(
            relative_prefix(Path::new("bench/README.md"), Path::new("bench/results")),
            "results/"
        );
        assert_eq!(
            relative_prefix(Path::new("/x/README.md"), Path::new("/y/res")),
            "/y/res/"
        );
    }

    #[test]
    fn run_ids_sort_by_time_and_name_the_mode() {
        let id = run_id("quick");
        assert!(id.ends_with("Z-quick"), "{id}");
        assert!(!id.contains(':'));
    }
}
