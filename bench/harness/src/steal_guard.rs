//! Keeping the hypervisor's steal out of the figures. On a VM whose host is shared, stretches of
//! minutes come where the host takes 10–30 % of this machine's CPU time; every target that runs
//! in one loses about half its IOPS, so which target's runs land in it, not the target, decides
//! the comparison (bench/README.md, "Steal"). The guard waits before a run while the machine is
//! being stolen from, and runs again a run that was stolen from anyway, within time and count
//! budgets so that a host that never calms down still gets a finished benchmark, with the steal
//! recorded on every run.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The guard's limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StealPolicy {
    /// Steal (a fraction of the machine's CPU time) above which a run is stolen from; `None`
    /// turns the guard off.
    pub limit: Option<f64>,
    /// How many times one run is made again after it was stolen from.
    pub reruns_per_run: u32,
    /// Waiting for steal to pass, over the whole plan.
    pub wait_budget: Duration,
    /// The window steal is sampled over while waiting.
    pub sample: Duration,
}

/// What the guard did over a plan; saved with the results.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StealGuardReport {
    /// The limit, as a fraction; `None` when the guard was off.
    pub limit: Option<f64>,
    /// Runs made again because steal passed the limit while they ran.
    pub reruns: usize,
    /// Seconds spent waiting for steal to fall below the limit before a run.
    pub waited_s: f64,
    /// Runs kept although steal passed the limit (their reruns or the wait budget ran out).
    pub kept_above_limit: usize,
}

/// The guard's state over one plan.
#[derive(Debug)]
pub struct StealGuard {
    policy: StealPolicy,
    waited: Duration,
    /// Whether the last run (or the last wait's sample) saw steal above the limit: only then is
    /// it worth sampling before the next run (a 2 s sample before every run would cost more
    /// than the stretches do).
    last_stolen: bool,
    report: StealGuardReport,
}

/// What to do with a run that has finished.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Keep,
    /// Make it again; the string says why, for the discarded record.
    RunAgain(String),
}

impl StealGuard {
    pub fn new(policy: StealPolicy) -> StealGuard {
        StealGuard {
            policy,
            waited: Duration::ZERO,
            last_stolen: false,
            report: StealGuardReport {
                limit: policy.limit,
                ..StealGuardReport::default()
            },
        }
    }

    /// Before a run, if the last one was stolen from: while the machine still is (`sample_steal`
    /// measures one window and returns its steal), wait, as long as the plan's wait budget lasts. `progress` hears
    /// the steal seen, the time waited so far and the budget left, about every ten seconds.
    pub fn wait_for_calm(
        &mut self,
        sample_steal: &mut dyn FnMut(Duration) -> Option<f64>,
        progress: &mut dyn FnMut(f64, Duration, Duration),
    ) {
        let Some(limit) = self.policy.limit.filter(|_| self.last_stolen) else {
            return;
        };
        let window = self.policy.sample.max(Duration::from_millis(1));
        let mut waited_here = Duration::ZERO;
        let mut last_progress = Duration::ZERO;
        while self.waited + window <= self.policy.wait_budget {
            // An unreadable /proc/stat is no steal: the guard must not stop the benchmark.
            let steal = match sample_steal(window) {
                Some(steal) if steal > limit => steal,
                _ => {
                    self.last_stolen = false;
                    break;
                }
            };
            self.waited += window;
            waited_here += window;
            if waited_here >= last_progress + Duration::from_secs(10) {
                last_progress = waited_here;
                progress(steal, waited_here, self.wait_left());
            }
        }
        self.report.waited_s = self.waited.as_secs_f64();
    }

    /// After a run that was made `reruns` times before: keep it, or make it again.
    pub fn verdict(&mut self, steal: Option<f64>, reruns: u32) -> Verdict {
        let (Some(limit), Some(steal)) = (self.policy.limit, steal) else {
            self.last_stolen = false;
            return Verdict::Keep;
        };
        self.last_stolen = steal > limit;
        if steal <= limit {
            return Verdict::Keep;
        }
        if reruns < self.policy.reruns_per_run {
            self.report.reruns += 1;
            return Verdict::RunAgain(format!(
                "steal {:.1} % > {:.1} %: run again",
                steal * 100.0,
                limit * 100.0
            ));
        }
        self.report.kept_above_limit += 1;
        Verdict::Keep
    }

    /// Time left for waiting.
    pub fn wait_left(&self) -> Duration {
        self.policy.wait_budget.saturating_sub(self.waited)
    }

    pub fn report(&self) -> StealGuardReport {
        self.report.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(limit: Option<f64>) -> StealPolicy {
        StealPolicy {
            limit,
            reruns_per_run: 2,
            wait_budget: Duration::from_secs(30),
            sample: Duration::from_secs(2),
        }
    }

    /// A steal source that replays `values`, then reports no steal.
    fn replay(values: &[f64]) -> impl FnMut(Duration) -> Option<f64> + '_ {
        let mut next = values.iter();
        move |_| Some(next.next().copied().unwrap_or(0.0))
    }

    #[test]
    fn a_stolen_run_is_made_again_up_to_the_limit_then_kept() {
        let mut guard = StealGuard::new(policy(Some(0.05)));
        assert_eq!(guard.verdict(Some(0.01), 0), Verdict::Keep);
        assert!(
            matches!(guard.verdict(Some(0.20), 0), Verdict::RunAgain(why) if why.contains("20.0 %"))
        );
        assert!(matches!(guard.verdict(Some(0.20), 1), Verdict::RunAgain(_)));
        assert_eq!(guard.verdict(Some(0.20), 2), Verdict::Keep);
        let report = guard.report();
        assert_eq!((report.reruns, report.kept_above_limit), (2, 1));
    }

    #[test]
    fn without_a_limit_or_a_steal_figure_every_run_is_kept() {
        let mut off = StealGuard::new(policy(None));
        assert_eq!(off.verdict(Some(0.9), 0), Verdict::Keep);
        let mut on = StealGuard::new(policy(Some(0.05)));
        assert_eq!(on.verdict(None, 0), Verdict::Keep);
        assert_eq!(on.report().reruns, 0);
    }

    /// A guard whose last run was stolen from.
    fn after_a_stolen_run() -> StealGuard {
        let mut guard = StealGuard::new(policy(Some(0.05)));
        assert!(matches!(guard.verdict(Some(0.3), 0), Verdict::RunAgain(_)));
        guard
    }

    #[test]
    fn waiting_lasts_while_steal_is_above_the_limit() {
        let mut guard = after_a_stolen_run();
        let mut heard = Vec::new();
        // Six stolen windows of 2 s, then a calm one.
        let stolen = [0.3, 0.2, 0.25, 0.1, 0.12, 0.08, 0.01];
        guard.wait_for_calm(&mut replay(&stolen), &mut |s, w, left| {
            heard.push((s, w, left))
        });
        assert_eq!(guard.report().waited_s, 12.0);
        assert_eq!(
            heard,
            [(0.12, Duration::from_secs(10), Duration::from_secs(20))]
        );
        assert_eq!(guard.wait_left(), Duration::from_secs(18));
    }

    #[test]
    fn waiting_stops_when_the_budget_is_spent_and_never_starts_again() {
        let mut guard = after_a_stolen_run();
        guard.wait_for_calm(&mut |_| Some(0.5), &mut |_, _, _| {});
        assert_eq!(guard.report().waited_s, 30.0);
        let mut sampled = false;
        guard.wait_for_calm(
            &mut |_| {
                sampled = true;
                Some(0.5)
            },
            &mut |_, _, _| {},
        );
        assert!(!sampled, "no budget left: no waiting");
    }

    #[test]
    fn a_calm_machine_or_an_unreadable_one_is_not_waited_for() {
        let mut guard = after_a_stolen_run();
        guard.wait_for_calm(&mut replay(&[0.01]), &mut |_, _, _| {});
        let mut guard = after_a_stolen_run();
        guard.wait_for_calm(&mut |_| None, &mut |_, _, _| {});
        assert_eq!(guard.report().waited_s, 0.0);
    }

    #[test]
    fn after_a_calm_run_the_machine_is_not_sampled() {
        let mut guard = StealGuard::new(policy(Some(0.05)));
        let sampled = std::cell::Cell::new(0);
        let mut count = |_| {
            sampled.set(sampled.get() + 1);
            Some(0.5)
        };
        guard.wait_for_calm(&mut count, &mut |_, _, _| {});
        assert_eq!(guard.verdict(Some(0.01), 0), Verdict::Keep);
        guard.wait_for_calm(&mut count, &mut |_, _, _| {});
        assert_eq!(sampled.get(), 0, "no run was stolen from: no 2 s samples");
        // A stolen run kept for want of reruns still makes the next run wait.
        assert_eq!(guard.verdict(Some(0.5), 2), Verdict::Keep);
        guard.wait_for_calm(&mut count, &mut |_, _, _| {});
        assert!(sampled.get() > 0);
    }
}
