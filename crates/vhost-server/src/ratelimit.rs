//! Log lines that a misbehaving host or guest could repeat at the event rate: at most a few
//! per second, and a count of what was left out.

use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(1);
const PER_WINDOW: u32 = 5;

pub(crate) struct RateLimit {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    pub(crate) const fn new() -> RateLimit {
        RateLimit {
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Some(lines left out since the last one logged) if this line may be logged now.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        self.in_window += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Logs at error level through `limit`, saying how many lines were left out before it.
macro_rules! error_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(left_out) = $limit.allow() {
            if left_out > 0 {
                log::error!("{} ({left_out} similar lines left out)", format_args!($($arg)+));
            } else {
                log::error!($($arg)+);
            }
        }
    };
}
pub(crate) use error_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_lines_a_second_then_a_count_of_the_rest() {
        let mut limit = RateLimit::new();
        for _ in 0..PER_WINDOW {
            assert_eq!(limit.allow(), Some(0));
        }
        for _ in 0..100 {
            assert_eq!(limit.allow(), None);
        }
        // The next window's first line says how many were left out.
        limit.window_start = limit.window_start.map(|s| s - WINDOW);
        assert_eq!(limit.allow(), Some(100));
        assert_eq!(limit.allow(), Some(0));
    }
}
