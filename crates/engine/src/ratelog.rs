//! Rate-limited error logging: a failing disk fails every request, and a log line per request
//! would bury the first ones (and cost more than the I/O). The first ten of a kind are logged,
//! then every thousandth, each with its running count.

#[derive(Debug, Default)]
pub(crate) struct RateLimited {
    count: u64,
}

impl RateLimited {
    /// Counts one more; Some(count) when this one should be logged.
    pub(crate) fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        (self.count <= 10 || self.count.is_multiple_of(1000)).then_some(self.count)
    }
}
