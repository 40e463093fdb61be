//! The real-time tier's freshness, held against the registry's
//! `freshness_sla`.
//!
//! A real-time counter is only as fresh as the aggregator that keeps it: a
//! packed value's own timestamp says when it was last re-summed, not whether
//! events since then have been applied (a value can rightly stay unchanged
//! for an hour). So every aggregator reports, per topic-partition it owns,
//! the event time it has applied through (the wall clock while it has read
//! the partition to its end), in one Redis hash
//! ([`adserve_features::realtime::progress_key`]). The oldest of them is
//! how far behind the event logs the whole tier may be: an aggregator that
//! is dead, frozen or lagging stops its partitions' entries, and the lag
//! grows.
//!
//! The feature-service reads the hash every second
//! ([`RealtimeFreshness::follow`]). While the lag exceeds a real-time
//! feature's `freshness_sla`, GetFeatures still serves the stored values
//! (counts a few minutes old are closer to the truth than the registry
//! default, and the impression logs what was served), but says so: the
//! response carries a `redis` degradation naming the features, their SLA
//! and the lag, `adserve_feature_freshness_breaches_total{feature}` counts
//! it, and `adserve_feature_realtime_lag_seconds` is the lag. Before any
//! aggregator has reported (a store seeded by hand) nothing is claimed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use adserve_features::{FeatureRegistry, Source};

use crate::RealtimeStore;

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Unknown: no aggregator has reported.
const UNKNOWN: i64 = i64::MIN;

/// How far behind the event logs the real-time tier is, as last read.
#[derive(Debug)]
pub struct RealtimeFreshness {
    /// Oldest applied-through time over every reported partition (unix ms).
    as_of_ms: AtomicI64,
    /// Real-time features with an SLA, tightest first: (name, SLA).
    slas: Vec<(String, Duration)>,
}

impl RealtimeFreshness {
    /// Nothing known yet, for `registry`'s real-time features.
    pub fn new(registry: &FeatureRegistry) -> Self {
        let mut slas: Vec<(String, Duration)> = registry
            .features
            .iter()
            .chain(&registry.categorical)
            .chain(&registry.embeddings)
            .filter(|f| f.source == Source::Redis)
            .filter_map(|f| Some((f.name.clone(), f.freshness_sla?)))
            .collect();
        slas.sort_by_key(|(_, sla)| *sla);
        Self { as_of_ms: AtomicI64::new(UNKNOWN), slas }
    }

    /// Records the aggregators' progress (None: none has reported).
    pub fn observe(&self, as_of_ms: Option<i64>) {
        self.as_of_ms.store(as_of_ms.unwrap_or(UNKNOWN), Ordering::Relaxed);
    }

    /// How far behind the event logs the tier is at `now_ms` (None: unknown).
    pub fn lag(&self, now_ms: i64) -> Option<Duration> {
        let as_of = self.as_of_ms.load(Ordering::Relaxed);
        (as_of != UNKNOWN).then(|| Duration::from_millis(now_ms.saturating_sub(as_of).max(0) as u64))
    }

    /// The real-time features whose SLA the tier misses at `now_ms`, and
    /// the degradation's reason; None while every SLA is met (or unknown).
    pub fn breach(&self, now_ms: i64) -> Option<(Vec<&str>, String)> {
        let lag = self.lag(now_ms)?;
        let missed: Vec<&(String, Duration)> = self.slas.iter().filter(|(_, sla)| lag > *sla).collect();
        let tightest = missed.first()?.1;
        let names: Vec<&str> = missed.iter().map(|(n, _)| n.as_str()).collect();
        let reason = format!(
            "real-time features are {} s behind the event logs (the aggregator is lagging or down), past their \
             freshness_sla ({} s at the tightest): {}; served as last aggregated",
            lag.as_secs(),
            tightest.as_secs(),
            names.join(", ")
        );
        Some((names, reason))
    }

    /// Reads the aggregators' progress from `store` every `every`, for as
    /// long as the process runs. A failed read keeps the last value (so the
    /// lag grows, as it should when Redis cannot be read).
    pub async fn follow(self: Arc<Self>, store: RealtimeStore, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match store.progress().await {
                Ok(as_of) => self.observe(as_of),
                Err(e) => tracing::debug!(error = %e, "reading the aggregators' progress failed"),
            }
            if let Some(lag) = self.lag(unix_ms()) {
                metrics::gauge!("adserve_feature_realtime_lag_seconds").set(lag.as_secs_f64());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registrys_realtime_slas_are_held_against_the_aggregators_lag() {
        let registry = adserve_features::registry();
        let f = RealtimeFreshness::new(registry);
        assert!(!f.slas.is_empty(), "the registry declares real-time features with an SLA");
        let tightest = f.slas[0].1;
        let now = 1_800_000_000_000;
        assert_eq!(f.breach(now), None, "nothing reported: nothing claimed");
        f.observe(Some(now - 1_000));
        assert_eq!(f.lag(now), Some(Duration::from_secs(1)));
        assert_eq!(f.breach(now), None);
        f.observe(Some(now - tightest.as_millis() as i64 - 5_000));
        let (names, reason) = f.breach(now).expect("past the SLA");
        let expected: Vec<&str> = f.slas.iter().filter(|(_, sla)| *sla == tightest).map(|(n, _)| n.as_str()).collect();
        assert!(expected.iter().all(|n| names.contains(n)), "{names:?}");
        assert!(reason.contains(&format!("{} s behind", tightest.as_secs() + 5)), "{reason}");
        assert!(reason.contains("freshness_sla"), "{reason}");
        // A clock behind the reported time is no lag.
        f.observe(Some(now + 10_000));
        assert_eq!(f.lag(now), Some(Duration::ZERO));
        f.observe(None);
        assert_eq!(f.lag(now), None);
    }
}
