//! A circuit breaker per feature source (DynamoDB, Redis).
//!
//! A source that is down or hung costs every request its whole deadline
//! (50 ms for Redis, 100 ms for DynamoDB) before its columns fall back to the
//! registry defaults. After `failures` consecutive failures or timeouts the
//! breaker **opens**: requests skip the source at once (defaults, degraded
//! "circuit open") instead of waiting for it. After `cooldown` one request
//! **probes** it; a success closes the breaker, a failure opens it for
//! another `cooldown`. A probe that never reports (its request cancelled) is
//! replaced by the next request after another `cooldown`, so the breaker
//! never wedges open.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Breaker settings (`[breaker]`).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures (errors or missed deadlines) that open it.
    pub failures: u32,
    /// How long it stays open before one request probes the source.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failures: 5, cooldown: Duration::from_secs(1) }
    }
}

impl BreakerConfig {
    /// Validation.
    pub fn validate(&self) -> Result<(), adserve_core::Invalid> {
        adserve_core::check_range("breaker.failures", self.failures, 1..=10_000)?;
        adserve_core::check_duration(
            "breaker.cooldown",
            self.cooldown,
            Duration::from_millis(10),
            Duration::from_secs(300),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { since: Instant },
    Probing { since: Instant },
}

/// What a request may do with the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Call it (closed).
    Call,
    /// Call it as the probe of an open breaker.
    Probe,
    /// Skip it: the breaker is open (the next probe is due in this long).
    Skip {
        /// Until the next probe may go.
        next_probe_in: Duration,
    },
}

/// One source's breaker.
#[derive(Debug)]
pub struct Breaker {
    source: &'static str,
    config: BreakerConfig,
    state: Mutex<State>,
}

impl Breaker {
    /// A closed breaker for `source`.
    pub fn new(source: &'static str, config: BreakerConfig) -> Self {
        metrics::gauge!("adserve_feature_breaker_open", "source" => source).set(0.0);
        Self { source, config, state: Mutex::new(State::Closed { failures: 0 }) }
    }

    /// The consecutive failures that open it.
    pub fn threshold(&self) -> u32 {
        self.config.failures
    }

    /// Whether a request at `now` may call the source.
    pub fn admit(&self, now: Instant) -> Admit {
        let Ok(mut state) = self.state.lock() else { return Admit::Call };
        match *state {
            State::Closed { .. } => Admit::Call,
            State::Open { since } | State::Probing { since } => {
                let waited = now.saturating_duration_since(since);
                if waited >= self.config.cooldown {
                    *state = State::Probing { since: now };
                    Admit::Probe
                } else {
                    metrics::counter!("adserve_feature_breaker_skipped_total", "source" => self.source).increment(1);
                    Admit::Skip { next_probe_in: self.config.cooldown - waited }
                }
            }
        }
    }

    /// Records the outcome of a call made at `now`.
    pub fn record(&self, ok: bool, now: Instant) {
        let Ok(mut state) = self.state.lock() else { return };
        let next = match (*state, ok) {
            (State::Closed { .. }, true) => State::Closed { failures: 0 },
            (_, true) => {
                tracing::info!(source = self.source, "feature source answered again; circuit closed");
                metrics::gauge!("adserve_feature_breaker_open", "source" => self.source).set(0.0);
                State::Closed { failures: 0 }
            }
            (State::Closed { failures }, false) if failures + 1 < self.config.failures => {
                State::Closed { failures: failures + 1 }
            }
            (State::Closed { .. }, false) => {
                tracing::warn!(
                    source = self.source,
                    failures = self.config.failures,
                    cooldown_ms = self.config.cooldown.as_millis() as u64,
                    "feature source keeps failing; circuit open (requests skip it and serve defaults)"
                );
                metrics::gauge!("adserve_feature_breaker_open", "source" => self.source).set(1.0);
                metrics::counter!("adserve_feature_breaker_opened_total", "source" => self.source).increment(1);
                State::Open { since: now }
            }
            (State::Open { .. } | State::Probing { .. }, false) => State::Open { since: now },
        };
        *state = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new("test", BreakerConfig { failures: 3, cooldown: Duration::from_millis(100) })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let (b, t) = (breaker(), Instant::now());
        b.record(false, t);
        b.record(false, t);
        b.record(true, t);
        b.record(false, t);
        b.record(false, t);
        assert_eq!(b.admit(t), Admit::Call, "a success in between starts the count over");
        b.record(false, t);
        assert_eq!(b.admit(t), Admit::Skip { next_probe_in: Duration::from_millis(100) });
        assert_eq!(b.admit(t + Duration::from_millis(40)), Admit::Skip { next_probe_in: Duration::from_millis(60) });
    }

    #[test]
    fn one_probe_after_the_cooldown_closes_or_reopens_it() {
        let (b, t) = (breaker(), Instant::now());
        for _ in 0..3 {
            b.record(false, t);
        }
        let later = t + Duration::from_millis(100);
        assert_eq!(b.admit(later), Admit::Probe);
        assert!(matches!(b.admit(later), Admit::Skip { .. }), "one probe at a time");
        b.record(false, later);
        assert!(matches!(b.admit(later + Duration::from_millis(50)), Admit::Skip { .. }), "open again");
        let again = later + Duration::from_millis(100);
        assert_eq!(b.admit(again), Admit::Probe);
        b.record(true, again);
        assert_eq!(b.admit(again), Admit::Call);
    }

    #[test]
    fn a_probe_that_never_reports_is_replaced() {
        let (b, t) = (breaker(), Instant::now());
        for _ in 0..3 {
            b.record(false, t);
        }
        assert_eq!(b.admit(t + Duration::from_millis(100)), Admit::Probe);
        // Its request was cancelled: no record. Another cooldown later the
        // next request probes.
        assert_eq!(b.admit(t + Duration::from_millis(200)), Admit::Probe);
    }
}
