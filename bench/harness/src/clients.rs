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
    /// fio inside a QEMU guest whose virtio-blk disk is the target's socket: the whole path.
    GuestFio,
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

/// fio options (name, value) for `job`, shared by the host and the guest fio clients: one fio
/// job per queue (`numjobs`), sequential jobs on disjoint slices as the load generator does, and
/// the output settings `parse_fio` needs.
pub fn fio_job_options(
    job: &Job,
    queues: u32,
    timing: Timing,
    region: u64,
) -> Vec<(String, String)> {
    let mut options: Vec<(String, String)> = [
        ("ioengine", "io_uring".to_string()),
        ("direct", "1".into()),
        ("rw", job.pattern.fio_name().into()),
        ("bs", job.block_size.to_string()),
        ("iodepth", job.iodepth.to_string()),
        ("numjobs", queues.to_string()),
        ("group_reporting", "1".into()),
        ("unified_rw_reporting", "mixed".into()),
        ("time_based", "1".into()),
        ("runtime", ms(timing.runtime)),
        ("ramp_time", ms(timing.ramp)),
        ("lat_percentiles", "1".into()),
        ("percentile_list", "50:99:99.9".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if job.pattern.is_random() || queues <= 1 {
        options.push(("size".into(), region.to_string()));
    } else {
        let slice = region / u64::from(queues) / job.block_size * job.block_size;
        options.push(("size".into(), slice.to_string()));
        options.push(("offset_increment".into(), slice.to_string()));
    }
    if job.pattern == RwPattern::RandRw {
        options.push(("rwmixread".into(), job.rwmixread.to_string()));
    }
    options
}

/// fio on the image, on the host: the `host` target.
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
        "--output-format=json".into(),
    ];
    argv.extend(
        fio_job_options(job, queues, timing, region)
            .into_iter()
            .map(|(k, v)| format!("--{k}={v}")),
    );
    argv
}

/// The fio job file the guest runs against its virtio-blk disk (`/dev/vda`).
pub fn guest_fio_job(job: &Job, queues: u32, timing: Timing, region: u64) -> String {
    let mut text = String::from("[global]\nfilename=/dev/vda\n");
    for (k, v) in fio_job_options(job, queues, timing, region) {
        text.push_str(&format!("{k}={v}\n"));
    }
    text.push_str(&format!("[{}]\n", job.name));
    text
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

/// Sets the calling thread's CPU affinity; processes it spawns afterwards inherit it.
fn pin_current_thread(cpus: &[usize]) -> Result<(), BenchError> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(BenchError::Usage(format!("CPU {cpu} out of range")));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE, the capacity of `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(BenchError::Client(format!(
            "cannot pin to CPUs {}: {}",
            cpu_list(cpus),
            std::io::Error::last_os_error()
        )))
    }
}

/// Extra time a guest run may take beyond ramp + runtime: boot and power-off under TCG.
const GUEST_GRACE: Duration = Duration::from_secs(120);

/// Boots the measurement guest (crates/guestvm) on `socket`, pinned to the client CPUs, and runs
/// `job_text` with fio inside it. The accelerator that ran is returned in the raw report.
pub fn run_guest_fio(
    socket: &Path,
    guest_dir: &Path,
    job_text: String,
    queues: u32,
    timing: Timing,
    client_cpus: &[usize],
) -> Result<(ClientOutcome, String), BenchError> {
    let config = guestvm::VmConfig::new(socket, guest_dir)
        .fio_job(job_text.clone())
        .queues(queues)
        .vcpus(queues)
        .timeout(timing.ramp + timing.runtime + GUEST_GRACE);
    // QEMU inherits the affinity of the thread that starts it; pin a thread of its own.
    let run = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                pin_current_thread(client_cpus)?;
                guestvm::run(&config).map_err(|e| BenchError::Client(format!("guest: {e}")))
            })
            .join()
            .map_err(|_| BenchError::Client("guest runner thread panicked".into()))?
    })?;
    let fio = run
        .fio()
        .map_err(|e| BenchError::Client(format!("guest: {e}")))?;
    let measurement = crate::measurement::parse_fio_value(fio)?;
    let accel = run.accel.to_string();
    let raw = serde_json::json!({
        "accelerator": accel,
        "vm_elapsed_s": run.elapsed.as_secs_f64(),
        "fio_job": job_text,
        "fio": fio,
    });
    let argv = vec![
        "scripts/run-vm.sh".into(),
        "--socket".into(),
        socket.display().to_string(),
        "--queues".into(),
        queues.to_string(),
        "--vcpus".into(),
        queues.to_string(),
    ];
    Ok((
        ClientOutcome {
            measurement,
            raw,
            argv,
            server_cpu: None,
        },
        accel,
    ))
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
    fn guest_job_file_has_the_same_options_on_the_guest_disk() {
        let text = guest_fio_job(&job("randrw70-4k-qd32"), 2, timing(), 1 << 30);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "[global]");
        assert_eq!(lines[1], "filename=/dev/vda");
        for line in [
            "ioengine=io_uring",
            "direct=1",
            "rw=randrw",
            "rwmixread=70",
            "numjobs=2",
            "unified_rw_reporting=mixed",
            "lat_percentiles=1",
            "runtime=3000ms",
            "ramp_time=500ms",
        ] {
            assert!(lines.contains(&line), "{line} missing:\n{text}");
        }
        assert_eq!(lines.last(), Some(&"[randrw70-4k-qd32]"));
    }

    #[test]
    fn pinning_this_thread_to_an_available_cpu_works() {
        let cpus = crate::machine::available_cpus();
        let all = cpus.clone();
        std::thread::spawn(move || {
            pin_current_thread(&cpus[..1]).unwrap();
            assert_eq!(crate::machine::available_cpus(), cpus[..1]);
            pin_current_thread(&all).unwrap();
        })
        .join()
        .unwrap();
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
