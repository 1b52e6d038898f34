//! What a load generator run does: access pattern, sizes, queues, timing. Parsing of the
//! human-friendly values the CLI accepts (sizes, durations, CPU lists) lives here too, so that the
//! harness can build the same values without going through a command line.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::LoadgenError;

/// The access pattern, named as fio names it (`--rw`), so both clients share one vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RwPattern {
    #[value(name = "randread")]
    RandRead,
    #[value(name = "randwrite")]
    RandWrite,
    #[value(name = "read")]
    Read,
    #[value(name = "write")]
    Write,
    #[value(name = "randrw")]
    RandRw,
}

impl RwPattern {
    /// The fio `rw=` value for the same pattern.
    pub fn fio_name(self) -> &'static str {
        match self {
            RwPattern::RandRead => "randread",
            RwPattern::RandWrite => "randwrite",
            RwPattern::Read => "read",
            RwPattern::Write => "write",
            RwPattern::RandRw => "randrw",
        }
    }

    pub fn is_random(self) -> bool {
        matches!(
            self,
            RwPattern::RandRead | RwPattern::RandWrite | RwPattern::RandRw
        )
    }

    /// Percentage of reads among the I/Os, given the mix requested for `randrw`.
    pub fn read_percentage(self, rwmixread: u8) -> u8 {
        match self {
            RwPattern::RandRead | RwPattern::Read => 100,
            RwPattern::RandWrite | RwPattern::Write => 0,
            RwPattern::RandRw => rwmixread.min(100),
        }
    }
}

impl fmt::Display for RwPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.fio_name())
    }
}

impl FromStr for RwPattern {
    type Err = LoadgenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <RwPattern as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| LoadgenError::InvalidArgument(format!("unknown rw pattern {s:?}")))
    }
}

/// How a queue thread waits for completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CompletionMode {
    /// Sleep on the queue's completion eventfd (interrupt-driven, like a guest without polling).
    Blocking,
    /// Busy-poll the used ring (libblkio poll queues): lowest latency, burns the client CPU.
    Poll,
}

impl fmt::Display for CompletionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CompletionMode::Blocking => "blocking",
            CompletionMode::Poll => "poll",
        })
    }
}

/// One load generator run against one vhost-user-blk socket.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub pattern: RwPattern,
    /// Percentage of reads for `randrw`; ignored by the other patterns.
    pub rwmixread: u8,
    pub block_size: u64,
    /// Requests kept in flight per queue.
    pub iodepth: u32,
    /// Virtqueues, one client thread each.
    pub queues: u32,
    pub completion: CompletionMode,
    /// Measured time, after the ramp.
    pub runtime: Duration,
    /// Warm-up time whose I/Os are not counted.
    pub ramp: Duration,
    /// Bytes of the device the I/Os cover, from offset 0; `None` means the whole device.
    pub region_size: Option<u64>,
    /// CPUs the queue threads are pinned to (queue i on `cpus[i % len]`); empty means unpinned.
    pub cpus: Vec<usize>,
    /// Seed of the offset generator, so that runs are repeatable.
    pub seed: u64,
}

impl JobSpec {
    /// Checks what can be checked before connecting to the device.
    pub fn validate(&self) -> Result<(), LoadgenError> {
        let invalid = |msg: String| Err(LoadgenError::InvalidArgument(msg));
        if self.block_size == 0 || self.block_size % 512 != 0 {
            return invalid(format!(
                "block size {} is not a positive multiple of 512",
                self.block_size
            ));
        }
        if self.block_size > u64::from(u32::MAX) {
            return invalid(format!("block size {} is too large", self.block_size));
        }
        if self.iodepth == 0 {
            return invalid("iodepth must be at least 1".into());
        }
        if self.queues == 0 {
            return invalid("queues must be at least 1".into());
        }
        if self.rwmixread > 100 {
            return invalid(format!("rwmixread {} is over 100", self.rwmixread));
        }
        if self.runtime.is_zero() {
            return invalid("runtime must be positive".into());
        }
        Ok(())
    }
}

/// Parses a byte size such as `4k`, `128K`, `1G`, `512` (binary units: k = 1024).
pub fn parse_size(text: &str) -> Result<u64, LoadgenError> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(text.trim())
        .map_err(|e| LoadgenError::InvalidArgument(format!("bad size {text:?}: {e}")))
}

/// Parses a duration such as `10s`, `500ms`, `2m`; a bare number means seconds (as in fio).
pub fn parse_duration(text: &str) -> Result<Duration, LoadgenError> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Ok(Duration::from_secs_f64(seconds));
        }
    }
    humantime::parse_duration(text)
        .map_err(|e| LoadgenError::InvalidArgument(format!("bad duration {text:?}: {e}")))
}

/// A CPU list as one command-line value (`0-2,5`), so that clap keeps it as one argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

impl FromStr for CpuList {
    type Err = LoadgenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_cpu_list(s).map(CpuList)
    }
}

/// Parses a CPU list in the kernel's format: `0`, `1,3`, `0-2,5`.
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>, LoadgenError> {
    let bad = || LoadgenError::InvalidArgument(format!("bad CPU list {text:?}"));
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let first: usize = first.trim().parse().map_err(|_| bad())?;
                let last: usize = last.trim().parse().map_err(|_| bad())?;
                if first > last || last - first > 4096 {
                    return Err(bad());
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("128K").unwrap(), 128 * 1024);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn cpu_lists_expand_ranges() {
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("a").is_err());
    }

    #[test]
    fn read_percentage_follows_pattern() {
        assert_eq!(RwPattern::RandRead.read_percentage(70), 100);
        assert_eq!(RwPattern::Write.read_percentage(70), 0);
        assert_eq!(RwPattern::RandRw.read_percentage(70), 70);
        assert_eq!(RwPattern::RandRw.read_percentage(200), 100);
    }

    #[test]
    fn validate_rejects_unaligned_block_size_and_zero_depth() {
        let spec = JobSpec {
            pattern: RwPattern::RandRead,
            rwmixread: 70,
            block_size: 4096,
            iodepth: 1,
            queues: 1,
            completion: CompletionMode::Blocking,
            runtime: Duration::from_secs(1),
            ramp: Duration::ZERO,
            region_size: None,
            cpus: vec![],
            seed: 1,
        };
        assert!(spec.validate().is_ok());
        assert!(JobSpec {
            block_size: 1000,
            ..spec.clone()
        }
        .validate()
        .is_err());
        assert!(JobSpec {
            iodepth: 0,
            ..spec.clone()
        }
        .validate()
        .is_err());
        assert!(JobSpec {
            rwmixread: 101,
            ..spec
        }
        .validate()
        .is_err());
    }
}
