//! The clients that drive a target and measure it: `uringblk-loadgen` for vhost-user targets,
//! fio with io_uring for the host. (The guest fio client, fio inside a VM whose disk is the
//! target's socket, slots in beside them as one more `ClientKind`.)

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uringblk_loadgen::{CompletionMode, LoadgenReport, RwPattern};

use crate::matrix::Job;
use crate::measurement::{parse_fio, Measurement};
use crate::procstat;
use crate::targets::cpu_list;
use crate::BenchError;

/// Which client produced a run's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientKind {
    /// `uringblk-loadgen`: libblkio on the host, no VM; measures the server's dataplane.
    Loadgen,
    /// fio with `ioengine=io_uring,direct=1` on the image, no virtualization (the `host` target).
    HostFio,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub runtime: Duration,
    pub ramp: Duration,
}

/// What a client run produced.
#[derive(Debug)]
pub struct ClientOutcome {
    pub measurement: Measurement,
    /// The client's own report, kept verbatim in the raw records.
    pub raw: Value,
    pub argv: Vec<String>,
    /// Server CPU time over the measured window and the window's wall time, when a server ran.
    pub server_cpu: Option<ServerCpu>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ServerCpu {
    pub cpu_s: f64,
    pub wall_s: f64,
}

/// Extra time a client may take beyond ramp + runtime before it is considered hung.
const CLIENT_GRACE: Duration = Duration::from_secs(60);

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

pub fn loadgen_command(
    loadgen: &Path,
    socket: &Path,
    job: &Job,
    queues: u32,
    timing: Timing,
    completion: CompletionMode,
    client_cpus: &[usize],
) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "taskset".into(),
        "-c".into(),
        cpu_list(client_cpus),
        loadgen.display().to_string(),
        "--socket".into(),
        socket.display().to_string(),
        "--rw".into(),
        job.pattern.to_string(),
        "--bs".into(),
        job.block_size.to_string(),
        "--iodepth".into(),
        job.iodepth.to_string(),
        "--queues".into(),
        queues.to_string(),
        "--completion".into(),
        completion.to_string(),
        "--runtime".into(),
        ms(timing.runtime),
        "--ramp".into(),
        ms(timing.ramp),
        "--cpus".into(),
        cpu_list(client_cpus),
        "--json".into(),
        "--phase-markers".into(),
    ];
    if job.pattern == RwPattern::RandRw {
        argv.extend(["--rwmixread".into(), job.rwmixread.to_string()]);
    }
    argv
}

/// fio on the image with the same job parameters: one fio job per queue (`numjobs`), sequential
/// jobs on disjoint slices as the load generator does.
pub fn host_fio_command(
    fio: &Path,
    image: &Path,
    region: u64,
    job: &Job,
    queues: u32,
    timing: Timing,
    client_cpus: &[usize],
) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "taskset".into(),
        "-c".into(),
        cpu_list(client_cpus),
        fio.display().to_string(),
        format!("--name={}", job.name),
        format!("--filename={}", image.display()),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--rw={}", job.pattern.fio_name()),
        format!("--bs={}", job.block_size),
        format!("--iodepth={}", job.iodepth),
        format!("--numjobs={queues}"),
        "--group_reporting".into(),
        "--unified_rw_reporting=mixed".into(),
        "--time_based".into(),
        format!("--runtime={}", ms(timing.runtime)),
        format!("--ramp_time={}", ms(timing.ramp)),
        "--lat_percentiles=1".into(),
        "--percentile_list=50:99:99.9".into(),
        "--output-format=json".into(),
    ];
    if job.pattern.is_random() || queues <= 1 {
        argv.push(format!("--size={region}"));
    } else {
        let slice = region / u64::from(queues) / job.block_size * job.block_size;
        argv.push(format!("--size={slice}"));
        argv.push(format!("--offset_increment={slice}"));
    }
    if job.pattern == RwPattern::RandRw {
        argv.push(format!("--rwmixread={}", job.rwmixread));
    }
    argv
}

/// Output of a finished child process.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `argv`, feeding each stderr line to `on_stderr_line` as it arrives; kills the child if it
/// is still running at `deadline`.
fn run_child(
    argv: &[String],
    deadline: Instant,
    on_stderr_line: &mut (dyn FnMut(&str) + Send),
) -> Result<Finished, BenchError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| BenchError::Usage("empty client command".into()))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::io(program, e))?;
    let mut stdout_pipe = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Client("no stdout pipe".into()))?;
    let stderr_pipe = child
        .stderr
        .take()
        .ok_or_else(|| BenchError::Client("no stderr pipe".into()))?;
    std::thread::scope(|scope| {
        let stdout_reader = scope.spawn(move || {
            let mut text = String::new();
            let _ = stdout_pipe.read_to_string(&mut text);
            text
        });
        let stderr_reader = scope.spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                on_stderr_line(&line);
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(BenchError::Client(format!(
                        "{} did not finish in time; killed",
                        argv.join(" ")
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => break Err(BenchError::Client(format!("wait: {e}"))),
            }
        };
        let stdout = stdout_reader.join().unwrap_or_default();
        let stderr = stderr_reader.join().unwrap_or_default();
        Ok(Finished {
            status: status?,
            stdout,
            stderr,
        })
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Runs the load generator against `socket`; samples the server's CPU time (process `server_pid`)
/// when the load generator announces the start and the end of its measured window.
pub fn run_loadgen(
    argv: Vec<String>,
    timing: Timing,
    server_pid: u32,
) -> Result<ClientOutcome, BenchError> {
    let deadline = Instant::now() + timing.ramp + timing.runtime + CLIENT_GRACE;
    let mut window_start: Option<(Instant, Result<Duration, BenchError>)> = None;
    let mut window_end: Option<(Instant, Result<Duration, BenchError>)> = None;
    let mut on_line = |line: &str| {
        if line == uringblk_loadgen::PHASE_MEASURE_START {
            window_start = Some((Instant::now(), procstat::cpu_time(server_pid)));
        } else if line == uringblk_loadgen::PHASE_MEASURE_END {
            window_end = Some((Instant::now(), procstat::cpu_time(server_pid)));
        }
    };
    let finished = run_child(&argv, deadline, &mut on_line)?;
    let report: Option<LoadgenReport> = serde_json::from_str(finished.stdout.trim()).ok();
    if !finished.status.success() {
        let detail = report
            .as_ref()
            .and_then(|r| r.first_error.clone())
            .unwrap_or_else(|| tail(&finished.stderr, 5));
        return Err(BenchError::Client(format!(
            "uringblk-loadgen failed ({}): {detail}",
            finished.status
        )));
    }
    let report = report.ok_or_else(|| {
        BenchError::Parse(format!(
            "uringblk-loadgen printed no report: {}",
            tail(&finished.stdout, 3)
        ))
    })?;
    let server_cpu = match (window_start, window_end) {
        (Some((t0, cpu0)), Some((t1, cpu1))) => Some(ServerCpu {
            cpu_s: cpu1?.saturating_sub(cpu0?).as_secs_f64(),
            wall_s: t1.saturating_duration_since(t0).as_secs_f64(),
        }),
        _ => {
            return Err(BenchError::Client(
                "uringblk-loadgen did not mark its measured window".into(),
            ))
        }
    };
    let raw = serde_json::to_value(&report).map_err(|e| BenchError::Parse(e.to_string()))?;
    Ok(ClientOutcome {
        measurement: Measurement::from_loadgen(&report),
        raw,
        argv,
        server_cpu,
    })
}

/// Runs fio on the host (no server).
pub fn run_host_fio(argv: Vec<String>, timing: Timing) -> Result<ClientOutcome, BenchError> {
    let deadline = Instant::now() + timing.ramp + timing.runtime + CLIENT_GRACE;
    let finished = run_child(&argv, deadline, &mut |_| {})?;
    if !finished.status.success() {
        return Err(BenchError::Client(format!(
            "fio failed ({}): {}",
            finished.status,
            tail(&finished.stderr, 5)
        )));
    }
    let measurement = parse_fio(&finished.stdout)?;
    let raw = serde_json::from_str(finished.stdout.trim()).unwrap_or(Value::Null);
    Ok(ClientOutcome {
        measurement,
        raw,
        argv,
        server_cpu: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::default_jobs;

    fn timing() -> Timing {
        Timing {
            runtime: Duration::from_secs(3),
            ramp: Duration::from_millis(500),
        }
    }

    fn job(name: &str) -> Job {
        default_jobs().into_iter().find(|j| j.name == name).unwrap()
    }

    #[test]
    fn loadgen_command_carries_the_job() {
        let argv = loadgen_command(
            Path::new("/b/uringblk-loadgen"),
            Path::new("/s.sock"),
            &job("randrw70-4k-qd32"),
            2,
            timing(),
            CompletionMode::Blocking,
            &[0],
        );
        let line = argv.join(" ");
        assert!(line.starts_with("taskset -c 0 /b/uringblk-loadgen --socket /s.sock"));
        for part in [
            "--rw randrw",
            "--bs 4096",
            "--iodepth 32",
            "--queues 2",
            "--runtime 3000ms",
            "--ramp 500ms",
            "--rwmixread 70",
            "--phase-markers",
        ] {
            assert!(line.contains(part), "{part} missing: {line}");
        }
    }

    #[test]
    fn host_fio_command_mirrors_the_job() {
        let argv = host_fio_command(
            Path::new("fio"),
            Path::new("/img"),
            1 << 30,
            &job("randread-4k-qd32"),
            2,
            timing(),
            &[0],
        );
        for part in [
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randread",
            "--bs=4096",
            "--iodepth=32",
            "--numjobs=2",
            "--size=1073741824",
            "--unified_rw_reporting=mixed",
            "--lat_percentiles=1",
            "--runtime=3000ms",
        ] {
            assert!(argv.iter().any(|a| a == part), "{part} missing: {argv:?}");
        }
        assert!(!argv.iter().any(|a| a.starts_with("--offset_increment")));
    }

    #[test]
    fn sequential_host_jobs_get_disjoint_slices() {
        let argv = host_fio_command(
            Path::new("fio"),
            Path::new("/img"),
            1 << 30,
            &job("read-128k-qd8"),
            2,
            timing(),
            &[0],
        );
        assert!(argv.contains(&"--size=536870912".to_string()));
        assert!(argv.contains(&"--offset_increment=536870912".to_string()));
    }

    #[test]
    fn child_output_and_stderr_lines_are_collected() {
        let argv: Vec<String> = ["sh", "-c", "echo out; echo one >&2; echo two >&2"]
            .map(String::from)
            .to_vec();
        let mut seen = Vec::new();
        let finished = run_child(
            &argv,
            Instant::now() + Duration::from_secs(10),
            &mut |l: &str| seen.push(l.to_string()),
        )
        .unwrap();
        assert!(finished.status.success());
        assert_eq!(finished.stdout, "out\n");
        assert_eq!(seen, ["one", "two"]);
    }

    #[test]
    fn hung_child_is_killed_at_the_deadline() {
        let argv: Vec<String> = ["sleep", "30"].map(String::from).to_vec();
        let start = Instant::now();
        let result = run_child(
            &argv,
            Instant::now() + Duration::from_millis(200),
            &mut |_| {},
        );
        assert!(result.is_err());
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}
