//! CPU time of a process from `/proc/<pid>/stat` (utime + stime, summed over all its threads),
//! and the machine's steal time (CPU time the hypervisor gave to others) from `/proc/stat`.

use std::time::Duration;

use crate::BenchError;

/// user + system CPU time in clock ticks, parsed from the text of `/proc/<pid>/stat`.
pub fn parse_cpu_ticks(stat: &str) -> Result<u64, BenchError> {
    let bad = |why: &str| BenchError::Parse(format!("/proc stat: {why}"));
    // The command name (field 2) is in parentheses and may itself contain spaces and ')', so
    // fields are counted from the last ')'.
    let close = stat
        .rfind(')')
        .ok_or_else(|| bad("no ')' after the command name"))?;
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After ')': field 3 (state) is index 0, so utime (field 14) is index 11, stime index 12.
    let field = |index: usize, name: &str| -> Result<u64, BenchError> {
        fields
            .get(index)
            .ok_or_else(|| bad(&format!("missing {name}")))?
            .parse()
            .map_err(|_| bad(&format!("{name} is not a number")))
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// CPU time consumed so far by process `pid`.
pub fn cpu_time(pid: u32) -> Result<Duration, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| BenchError::io(&path, e))?;
    let ticks = parse_cpu_ticks(&text)?;
    Ok(Duration::from_secs_f64(
        ticks as f64 / ticks_per_second() as f64,
    ))
}

/// The machine's CPU time so far, summed over its CPUs: all of it, and the part stolen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineTicks {
    /// user + nice + system + idle + iowait + irq + softirq + steal (guest time is in user).
    pub total: u64,
    pub steal: u64,
}

impl MachineTicks {
    /// The share of the machine's CPU time between `self` and `later` that the hypervisor took
    /// (0.0–1.0); `None` if no time passed.
    pub fn steal_fraction_until(&self, later: &MachineTicks) -> Option<f64> {
        let total = later.total.checked_sub(self.total)?;
        let steal = later.steal.checked_sub(self.steal)?;
        (total > 0).then(|| steal as f64 / total as f64)
    }
}

/// The aggregate `cpu` line of `/proc/stat`'s text.
pub fn parse_machine_ticks(stat: &str) -> Result<MachineTicks, BenchError> {
    let bad = |why: &str| BenchError::Parse(format!("/proc/stat: {why}"));
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| bad("no aggregate cpu line"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().map_err(|_| bad("a cpu field is not a number")))
        .collect::<Result<_, _>>()?;
    // Kernels since 2.6.11 have the steal field, the eighth.
    let steal = *fields.get(7).ok_or_else(|| bad("no steal field"))?;
    Ok(MachineTicks {
        total: fields.iter().sum(),
        steal,
    })
}

/// The machine's CPU ticks now.
pub fn machine_ticks() -> Result<MachineTicks, BenchError> {
    let path = "/proc/stat";
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
    parse_machine_ticks(&text)
}

/// The machine's steal over the next `window` (sleeps that long); `None` if `/proc/stat`
/// cannot be read.
pub fn steal_over(window: Duration) -> Option<f64> {
    let before = machine_ticks().ok()?;
    std::thread::sleep(window);
    before.steal_fraction_until(&machine_ticks().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line from this machine (qemu-storage-daemon), utime 1234 and stime 567 substituted.
    const QSD_STAT: &str = "8739 (qemu-storage-d) S 8700 8739 8700 0 -1 4194560 1380 0 0 0 \
        1234 567 0 0 20 0 3 0 1215077 1262116864 4421 18446744073709551615 1 1 0 0 0 0 0 4096 \
        17030 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn sums_utime_and_stime() {
        assert_eq!(parse_cpu_ticks(QSD_STAT).unwrap(), 1234 + 567);
    }

    #[test]
    fn command_names_with_spaces_and_parens_do_not_shift_fields() {
        let tricky = QSD_STAT.replace("(qemu-storage-d)", "(a) b (c))");
        assert_eq!(parse_cpu_ticks(&tricky).unwrap(), 1801);
    }

    #[test]
    fn truncated_or_garbled_lines_are_errors() {
        assert!(parse_cpu_ticks("123 (x) S 1 2 3").is_err());
        assert!(parse_cpu_ticks("no parens at all").is_err());
        let garbled = QSD_STAT.replace(" 1234 ", " x ");
        assert!(parse_cpu_ticks(&garbled).is_err());
    }

    // The first lines of this machine's /proc/stat.
    const PROC_STAT: &str = "cpu  1213740 592 234789 12712823 88945 0 34945 180424 2 0\n\
        cpu0 579814 179 106323 6371649 86461 0 10813 79043 0 0\n\
        cpu1 633926 412 128466 6341173 2483 0 24131 101380 2 0\n";

    #[test]
    fn machine_ticks_come_from_the_aggregate_line() {
        let t = parse_machine_ticks(PROC_STAT).unwrap();
        assert_eq!(t.steal, 180424);
        assert_eq!(
            t.total,
            1213740 + 592 + 234789 + 12712823 + 88945 + 34945 + 180424
        );
        assert!(parse_machine_ticks("cpu0 1 2 3 4 5 6 7 8\n").is_err());
        assert!(
            parse_machine_ticks("cpu  1 2 3 4 5 6 7\n").is_err(),
            "no steal field"
        );
    }

    #[test]
    fn steal_fraction_is_the_stolen_share_of_the_time_between_samples() {
        let a = MachineTicks {
            total: 1000,
            steal: 10,
        };
        let b = MachineTicks {
            total: 1400,
            steal: 110,
        };
        assert_eq!(a.steal_fraction_until(&b), Some(0.25));
        assert_eq!(a.steal_fraction_until(&a), None, "no time passed");
        assert_eq!(b.steal_fraction_until(&a), None, "backwards");
    }

    #[test]
    fn this_machine_reports_its_ticks() {
        let t = machine_ticks().unwrap();
        assert!(t.total > 0 && t.steal <= t.total);
    }

    #[test]
    fn own_process_has_readable_cpu_time() {
        // Burn a little CPU so that the reading is not trivially zero on a fresh process.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let used = cpu_time(std::process::id()).unwrap();
        assert!(used >= Duration::from_millis(10), "{used:?}");
    }
}
