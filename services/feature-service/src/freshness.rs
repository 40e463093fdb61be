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
//! The batch tier's items carry their own time (`as_of`, written by the
//! backfill): [`BatchFreshness`] holds the user's item and each ad's row
//! against the tightest SLA of the entity's batch features, and an answer
//! past it carries a `dynamodb` degradation the same way.
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

use adserve_features::{Entity, FeatureRegistry, Source};

use crate::RealtimeStore;

/// Unknown: no aggregator has reported.
const UNKNOWN: i64 = i64::MIN;

/// The features of `slas` (tightest first) older than their SLA at `age`,
/// and the tightest SLA; None when none is.
fn missed(slas: &[(String, Duration)], age: Duration) -> Option<(Vec<&str>, Duration)> {
    let names: Vec<&str> = slas.iter().filter(|(_, sla)| age > *sla).map(|(n, _)| n.as_str()).collect();
    (!names.is_empty()).then(|| (names, slas[0].1))
}

/// Stored features of `source` and `entity` with an SLA, tightest first.
fn slas(registry: &FeatureRegistry, source: Source, entity: Option<Entity>) -> Vec<(String, Duration)> {
    let mut slas: Vec<(String, Duration)> = registry
        .features
        .iter()
        .chain(&registry.categorical)
        .chain(&registry.embeddings)
        .filter(|f| f.source == source && entity.is_none_or(|e| f.entity == e))
        .filter_map(|f| Some((f.name.clone(), f.freshness_sla?)))
        .collect();
    slas.sort_by_key(|(_, sla)| *sla);
    slas
}

fn age(as_of_ms: i64, now_ms: i64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(as_of_ms).max(0) as u64)
}

/// The batch tier's items held against their features' SLA.
#[derive(Debug)]
pub struct BatchFreshness {
    user: Vec<(String, Duration)>,
    ad: Vec<(String, Duration)>,
}

impl BatchFreshness {
    /// For `registry`'s batch features.
    pub fn new(registry: &FeatureRegistry) -> Self {
        Self {
            user: slas(registry, Source::Dynamodb, Some(Entity::User)),
            ad: slas(registry, Source::Dynamodb, Some(Entity::Ad)),
        }
    }

    /// The user's item, written at `as_of_ms`, past an SLA at `now_ms`: the
    /// features it misses and the reason (None: fresh, or no time known).
    pub fn user(&self, as_of_ms: Option<i64>, now_ms: i64) -> Option<(Vec<&str>, String)> {
        let age = age(as_of_ms?, now_ms);
        let (names, sla) = missed(&self.user, age)?;
        let reason = format!(
            "the user's batch features are {} h old, past their freshness_sla ({} h at the tightest): {}; served \
             as stored",
            age.as_secs() / 3600,
            sla.as_secs() / 3600,
            names.join(", ")
        );
        Some((names, reason))
    }

    /// The asked ads' rows (when each became true, if known) past an SLA at
    /// `now_ms`: the features the oldest misses and the reason.
    pub fn ads(&self, as_of_ms: impl IntoIterator<Item = Option<i64>>, now_ms: i64) -> Option<(Vec<&str>, String)> {
        let tightest = self.ad.first()?.1;
        let (mut stale, mut asked, mut oldest) = (0usize, 0usize, Duration::ZERO);
        for at in as_of_ms {
            asked += 1;
            let Some(at) = at else { continue };
            let age = age(at, now_ms);
            if age > tightest {
                stale += 1;
                oldest = oldest.max(age);
            }
        }
        let (names, _) = missed(&self.ad, oldest)?;
        let reason = format!(
            "batch features of {stale} of {asked} ads are past their freshness_sla ({} h at the tightest), the \
             oldest {} h old: {}; served as stored",
            tightest.as_secs() / 3600,
            oldest.as_secs() / 3600,
            names.join(", ")
        );
        Some((names, reason))
    }
}

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
        Self { as_of_ms: AtomicI64::new(UNKNOWN), slas: slas(registry, Source::Redis, None) }
    }

    /// Records the aggregators' progress (None: none has reported).
    pub fn observe(&self, as_of_ms: Option<i64>) {
        self.as_of_ms.store(as_of_ms.unwrap_or(UNKNOWN), Ordering::Relaxed);
    }

    /// How far behind the event logs the tier is at `now_ms` (None: unknown).
    pub fn lag(&self, now_ms: i64) -> Option<Duration> {
        let as_of = self.as_of_ms.load(Ordering::Relaxed);
        (as_of != UNKNOWN).then(|| age(as_of, now_ms))
    }

    /// The real-time features whose SLA the tier misses at `now_ms`, and
    /// the degradation's reason; None while every SLA is met (or unknown).
    pub fn breach(&self, now_ms: i64) -> Option<(Vec<&str>, String)> {
        let lag = self.lag(now_ms)?;
        let (names, tightest) = missed(&self.slas, lag)?;
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
            if let Some(lag) = self.lag(crate::aggregates::unix_now_ms()) {
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

    #[test]
    fn batch_items_are_held_against_their_entitys_batch_slas() {
        let f = BatchFreshness::new(adserve_features::registry());
        let (user_sla, ad_sla) = (f.user[0].1.as_millis() as i64, f.ad[0].1.as_millis() as i64);
        let now = 1_800_000_000_000;
        let hour = 3_600_000;
        assert_eq!(f.user(None, now), None, "an item without a time claims nothing");
        assert_eq!(f.user(Some(now - user_sla + hour), now), None);
        let (names, reason) = f.user(Some(now - user_sla - 4 * hour), now).expect("stale");
        assert!(names.contains(&"user_ctr_30d"), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("ad_")), "{names:?}");
        assert!(reason.contains(&format!("{} h old", (user_sla + 4 * hour) / hour)), "{reason}");

        assert_eq!(f.ads([None, Some(now), Some(now - ad_sla + hour)], now), None);
        let (names, reason) =
            f.ads([Some(now - ad_sla - 2 * hour), None, Some(now), Some(now - ad_sla - 9 * hour)], now).expect("stale");
        assert!(names.contains(&"ad_ctr_7d"), "{names:?}");
        assert!(reason.starts_with("batch features of 2 of 4 ads"), "{reason}");
        assert!(reason.contains(&format!("oldest {} h old", (ad_sla + 9 * hour) / hour)), "{reason}");
    }
}
