//! `uringblk-loadgen`: drive a vhost-user-blk socket and report IOPS, bandwidth and latency.
//! Exit status: 0 success, 1 the run failed (including any failed I/O), 2 bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use uringblk_loadgen::spec::{parse_duration, parse_size, CpuList};
use uringblk_loadgen::{CompletionMode, JobSpec, LoadgenError, RwPattern};

#[derive(Parser, Debug)]
#[command(version, about = "vhost-user-blk load generator (libblkio, no VM)")]
struct Cli {
    /// vhost-user-blk socket of the server under test.
    #[arg(long)]
    socket: PathBuf,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: RwPattern,
    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmixread: u8,
    /// Block size of every I/O (binary units: 4k = 4096).
    #[arg(long, default_value = "4k", value_parser = size_arg)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    iodepth: u32,
    /// Virtqueues, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// How to wait for completions.
    #[arg(long, value_enum, default_value = "blocking")]
    completion: CompletionMode,
    /// Measured time (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    runtime: std::time::Duration,
    /// Warm-up before measuring.
    #[arg(long, default_value = "0s", value_parser = duration_arg)]
    ramp: std::time::Duration,
    /// Bytes of the device to cover from offset 0 (default: all of it).
    #[arg(long, value_parser = size_arg)]
    size: Option<u64>,
    /// CPUs for the queue threads (queue i on the i-th CPU of the list, cycling), e.g. 0 or 0-1.
    #[arg(long)]
    cpus: Option<CpuList>,
    /// Seed of the random offsets.
    #[arg(long, default_value_t = 0x7572_696e_67)]
    seed: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Print marker lines on stderr when the measured window starts and ends.
    #[arg(long)]
    phase_markers: bool,
}

fn size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

fn duration_arg(text: &str) -> Result<std::time::Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}

fn spec_of(cli: &Cli) -> JobSpec {
    JobSpec {
        pattern: cli.rw,
        rwmixread: cli.rwmixread,
        block_size: cli.bs,
        iodepth: cli.iodepth,
        queues: cli.queues,
        completion: cli.completion,
        runtime: cli.runtime,
        ramp: cli.ramp,
        region_size: cli.size,
        cpus: cli.cpus.clone().map(|c| c.0).unwrap_or_default(),
        seed: cli.seed,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let spec = spec_of(&cli);
    match uringblk_loadgen::run(&cli.socket, &spec, cli.phase_markers) {
        Ok(report) => {
            if cli.json {
                match serde_json::to_string(&report) {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        eprintln!("uringblk-loadgen: cannot encode the report: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println!("{report}");
            }
            if report.errors > 0 {
                eprintln!(
                    "uringblk-loadgen: {} I/O(s) failed; first: {}",
                    report.errors,
                    report.first_error.as_deref().unwrap_or("?")
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e @ LoadgenError::InvalidArgument(_)) => {
            eprintln!("uringblk-loadgen: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("uringblk-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_parses_into_the_spec() {
        let cli = Cli::try_parse_from([
            "uringblk-loadgen",
            "--socket",
            "/s",
            "--rw",
            "randrw",
            "--rwmixread",
            "60",
            "--bs",
            "128k",
            "--iodepth",
            "8",
            "--queues",
            "2",
            "--completion",
            "poll",
            "--runtime",
            "3s",
            "--ramp",
            "500ms",
            "--size",
            "1G",
            "--cpus",
            "0-1",
            "--json",
            "--phase-markers",
        ])
        .unwrap();
        let spec = spec_of(&cli);
        assert_eq!(spec.pattern, RwPattern::RandRw);
        assert_eq!(spec.rwmixread, 60);
        assert_eq!(spec.block_size, 128 * 1024);
        assert_eq!((spec.iodepth, spec.queues), (8, 2));
        assert_eq!(spec.completion, CompletionMode::Poll);
        assert_eq!(spec.runtime, std::time::Duration::from_secs(3));
        assert_eq!(spec.ramp, std::time::Duration::from_millis(500));
        assert_eq!(spec.region_size, Some(1 << 30));
        assert_eq!(spec.cpus, vec![0, 1]);
        assert!(cli.json && cli.phase_markers);
    }

    #[test]
    fn bad_values_are_rejected() {
        for bad in [
            ["--rw", "sideways"],
            ["--rwmixread", "101"],
            ["--bs", "four"],
            ["--cpus", "1-0"],
            ["--runtime", "soon"],
        ] {
            let mut args = vec!["uringblk-loadgen", "--socket", "/s"];
            args.extend(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?} accepted");
        }
    }
}
