//! The end-to-end time budget of one ad request, split across its hops.
//!
//! A request gets `deadlines.request`, or less when the caller says so
//! (`tmax_ms`, a gRPC deadline). The impression log comes last and must wait
//! for the broker's real answer (giving up early would leave an impression
//! in the log for an ad that was never returned: a phantom label-0 row), so
//! its whole timeout, `kafka.publish_timeout`, is set aside first. Every
//! other hop gets the smaller of its own cap (`deadlines.<hop>`) and what is
//! left before that reserve. A hop with less than [`MIN_HOP`] left is not
//! called at all: the gateway degrades at once (registry defaults, the prior,
//! the in-process auction) instead of starting work it cannot wait for.

use std::time::{Duration, Instant};

use adserve_features::request::FieldError;

/// Least time worth giving a hop: below it a call cannot complete even on
/// an idle local network, and is skipped.
pub const MIN_HOP: Duration = Duration::from_millis(2);

/// Least time the hops before the impression log must have: the shortest
/// `tmax_ms` accepted is `kafka.publish_timeout` plus this.
pub const MIN_PIPELINE: Duration = Duration::from_millis(10);

/// One request's budget.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    started: Instant,
    total: Duration,
    /// The hops before the impression log must end by this instant.
    pipeline_end: Instant,
}

impl Budget {
    /// The budget of a request that started at `started`: `total`, of which
    /// the last `log_reserve` belongs to the impression log.
    pub fn new(started: Instant, total: Duration, log_reserve: Duration) -> Self {
        Self { started, total, pipeline_end: started + total.saturating_sub(log_reserve) }
    }

    /// The request's whole budget.
    pub fn total(&self) -> Duration {
        self.total
    }

    /// How long a hop capped at `cap` may take now; `None` when less than
    /// [`MIN_HOP`] is left before the impression log's reserve.
    pub fn for_hop(&self, cap: Duration) -> Option<Duration> {
        let left = self.pipeline_end.saturating_duration_since(Instant::now());
        let limit = cap.min(left);
        (limit >= MIN_HOP).then_some(limit)
    }

    /// Time spent so far.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// The budget a request asks for: `tmax_ms` (0 = none) and the caller's
/// gRPC deadline, whichever is shorter, capped at `default` (the gateway's
/// `deadlines.request`: a patient caller does not make it spend longer).
/// A budget that cannot hold the impression log's `log_reserve` plus
/// [`MIN_PIPELINE`] is refused, naming `tmax_ms`.
pub fn requested(
    tmax_ms: u32,
    caller_deadline: Option<Duration>,
    default: Duration,
    log_reserve: Duration,
) -> Result<Duration, FieldError> {
    let least = log_reserve + MIN_PIPELINE;
    if tmax_ms > 0 && Duration::from_millis(u64::from(tmax_ms)) < least {
        return Err(FieldError::new(
            "tmax_ms",
            format!(
                "must be at least {} ms (kafka.publish_timeout {} ms + {} ms for the hops), got {tmax_ms}",
                least.as_millis(),
                log_reserve.as_millis(),
                MIN_PIPELINE.as_millis()
            ),
        ));
    }
    let mut budget = default;
    if tmax_ms > 0 {
        budget = budget.min(Duration::from_millis(u64::from(tmax_ms)));
    }
    if let Some(d) = caller_deadline {
        // A gRPC deadline too short to log the impression is still honoured:
        // the caller will have gone; the hops degrade and the answer is late.
        budget = budget.min(d.max(least));
    }
    Ok(budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_hop_gets_its_cap_or_what_is_left_before_the_log_reserve() {
        let b = Budget::new(Instant::now(), 300 * MS, 100 * MS);
        assert_eq!(b.for_hop(50 * MS), Some(50 * MS));
        let left = b.for_hop(10_000 * MS).unwrap();
        assert!(left <= 200 * MS && left > 150 * MS, "{left:?}");
    }

    #[test]
    fn a_spent_budget_skips_the_hop() {
        let b = Budget::new(Instant::now() - 250 * MS, 300 * MS, 100 * MS);
        assert_eq!(b.for_hop(50 * MS), None);
        let b = Budget::new(Instant::now(), 300 * MS, 300 * MS);
        assert_eq!(b.for_hop(50 * MS), None);
    }

    #[test]
    fn tmax_and_the_grpc_deadline_shorten_the_budget_but_never_lengthen_it() {
        let (default, reserve) = (500 * MS, 100 * MS);
        assert_eq!(requested(0, None, default, reserve).unwrap(), default);
        assert_eq!(requested(200, None, default, reserve).unwrap(), 200 * MS);
        assert_eq!(requested(5_000, None, default, reserve).unwrap(), default);
        assert_eq!(requested(0, Some(150 * MS), default, reserve).unwrap(), 150 * MS);
        assert_eq!(requested(300, Some(150 * MS), default, reserve).unwrap(), 150 * MS);
        // Shorter than the log needs: the hops get MIN_PIPELINE, the log its reserve.
        assert_eq!(requested(0, Some(MS), default, reserve).unwrap(), reserve + MIN_PIPELINE);
    }

    #[test]
    fn a_tmax_too_short_to_log_the_impression_is_refused_naming_the_field() {
        let e = requested(50, None, 500 * MS, 100 * MS).unwrap_err();
        assert_eq!(e.field, "tmax_ms");
        assert!(e.to_string().contains("at least 110 ms"), "{e}");
        assert!(requested(110, None, 500 * MS, 100 * MS).is_ok());
    }
}
