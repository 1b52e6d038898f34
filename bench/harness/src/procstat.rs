//! CPU time of a process from `/proc/<pid>/stat` (utime + stime, summed over all its threads).

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
