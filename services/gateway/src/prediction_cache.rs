//! The prediction cache: pCTRs the ranker already computed, reused for the
//! same (feature row, ad, model version) within a short TTL.
//!
//! **What a key is.** A row's key is a hash of the model version that would
//! score it, the ad id, the ad's catalog fingerprint ([`fingerprint`]) and
//! every value of its feature row (dense, categorical, embedding; column
//! names included), each value rounded to `mantissa_bits` of mantissa. The
//! user's *segment* is therefore the user and context part of the row: two
//! users whose features agree to that precision share their scores, and
//! anonymous (COPPA, `lmt`, GDPR) requests, whose user features are the
//! defaults, share one segment per context.
//!
//! - **Exact by default.** With `mantissa_bits = 23` a hit is only served for
//!   a bit-identical row, so the logged row re-scores to the logged pCTR, as
//!   it does without the cache. Fewer bits trade that for hit rate: a hit
//!   may then come from a row whose values differ by up to 2^-bits relative.
//! - **Invalidation.** Nothing stale is reachable: a changed ad (catalog
//!   row, or any of its features) or a new model version makes a new key.
//!   Old entries are unreachable and are swept when their shard fills; the
//!   TTL bounds how long one score is reused at all.
//! - **Which version.** The cache only serves while it knows what the ranker
//!   serves: it reads the ranker's production and canary versions and the
//!   canary share (`GetModel`) every `refresh`, and routes a user the way the
//!   ranker does ([`adserve_registry::in_canary`]). A score is stored only
//!   when the ranker answered with its model (not a fallback) at the version
//!   expected. When the ranker cannot say what it serves for `3 × refresh`,
//!   the cache is bypassed: every row goes to the ranker, as without it.
//!   A rollback reaches cached scores within one `refresh`.
//! - **Shadow models.** Only the rows the cache misses reach the ranker, so
//!   a shadow model would score a biased sample (new users, moved counters).
//!   While `GetModel` names a shadow, `shadow_share` of requests (by request
//!   id) are served no hit: all their rows go to the ranker, marked
//!   `whole_request`, and the shadow's events for them are a uniform sample.
//!
//! Metrics: `adserve_gateway_prediction_cache_rows_total{result}` (hit,
//! miss, expired, bypass, shadow: hit rate is hit over all), the age of the oldest
//! hit per request (`adserve_gateway_prediction_cache_hit_age_seconds`:
//! staleness), and `adserve_gateway_prediction_cache_entries`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use adserve_catalog::EligibleAd;
use adserve_core::{Invalid, check_duration, check_range};
use adserve_proto::v1::{FeatureMatrix, GetModelRequest, ScoreLevel, ranker_service_client::RankerServiceClient};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

/// How the gateway reuses the ranker's scores.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PredictionCacheConfig {
    /// Off: every row is scored by the ranker.
    pub enabled: bool,
    /// Longest one score is reused.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Most scores held (about 64 bytes each).
    pub max_entries: usize,
    /// Mantissa bits of each feature value the key keeps: 23 (every bit)
    /// reuses a score only for the identical row; fewer let rows that
    /// differ by up to 2^-bits relative share it.
    pub mantissa_bits: u32,
    /// How often the ranker is asked which model versions it serves.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// While the ranker runs a shadow model: the share of requests (by
    /// request id) that skip the cache's hits, so that all their rows reach
    /// the ranker and the shadow scores whole requests, an unbiased sample
    /// of traffic (it otherwise sees only the rows the cache missed). 0
    /// leaves the shadow the misses; 1 turns the cache's hits off while a
    /// shadow runs.
    pub shadow_share: f64,
}

impl Default for PredictionCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: Duration::from_secs(10),
            max_entries: 200_000,
            mantissa_bits: 23,
            refresh: Duration::from_secs(1),
            shadow_share: 0.1,
        }
    }
}

impl PredictionCacheConfig {
    /// Checks every field, naming it under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        check_duration(&format!("{prefix}.ttl"), self.ttl, Duration::from_millis(100), Duration::from_secs(600))?;
        check_range(&format!("{prefix}.max_entries"), self.max_entries, SHARDS..=100_000_000)?;
        check_range(&format!("{prefix}.mantissa_bits"), self.mantissa_bits, 0..=23)?;
        check_duration(
            &format!("{prefix}.refresh"),
            self.refresh,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?;
        if !(0.0..=1.0).contains(&self.shadow_share) {
            return Err(Invalid::new(
                format!("{prefix}.shadow_share"),
                format!("must be 0..=1, got {}", self.shadow_share),
            ));
        }
        Ok(())
    }
}

const SHARDS: usize = 32;

/// What the ranker serves, as last read.
#[derive(Debug, Clone)]
struct Serving {
    production: Arc<str>,
    canary: Option<(Arc<str>, f64)>,
    /// The ranker scores calls with a shadow model too.
    shadow: bool,
    read_at: Instant,
}

/// One shard: (ad id, row key) -> the score.
type Shard = Mutex<HashMap<(i64, u64), Entry>>;

#[derive(Debug, Clone, Copy)]
struct Entry {
    check: u64,
    pctr: f32,
    stored: Instant,
}

/// The cache of one gateway process.
#[derive(Debug)]
pub struct PredictionCache {
    config: PredictionCacheConfig,
    shards: Box<[Shard]>,
    serving: RwLock<Option<Serving>>,
    entries: AtomicUsize,
}

/// One request's view of the cache: per row, its key and the cached pCTR if
/// there was one.
#[derive(Debug)]
pub struct Lookup {
    /// The version that scores this request's rows.
    pub version: Arc<str>,
    keys: Vec<(i64, u64, u64)>,
    /// Cached pCTR per row (`None`: the ranker must score it).
    pub pctr: Vec<Option<f32>>,
    /// Sampled for the ranker's shadow: no hit was served.
    pub for_shadow: bool,
}

impl Lookup {
    /// Rows without a cached score, in order.
    pub fn misses(&self) -> Vec<usize> {
        self.pctr.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(i, _)| i).collect()
    }
}

impl PredictionCache {
    /// An empty cache; it serves nothing until [`set_serving`](Self::set_serving)
    /// (or [`follow`]) has told it what the ranker serves.
    pub fn new(config: PredictionCacheConfig) -> Arc<Self> {
        let shards = (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect();
        Arc::new(Self { config, shards, serving: RwLock::new(None), entries: AtomicUsize::new(0) })
    }

    /// Records what the ranker serves: its production version, with a
    /// canary the canary's version and share, and whether a shadow model
    /// scores its calls too.
    pub fn set_serving(&self, production: &str, canary: Option<(&str, f64)>, shadow: bool) {
        let serving = (!production.is_empty()).then(|| Serving {
            production: production.into(),
            canary: canary.filter(|(v, s)| !v.is_empty() && *s > 0.0).map(|(v, s)| (Arc::from(v), s)),
            shadow,
            read_at: Instant::now(),
        });
        *self.serving.write().unwrap_or_else(|e| e.into_inner()) = serving;
    }

    /// What the ranker serves, if it said so within the last 3 × `refresh`.
    fn serving(&self) -> Option<Serving> {
        let serving = self.serving.read().unwrap_or_else(|e| e.into_inner());
        serving.as_ref().filter(|s| s.read_at.elapsed() <= self.config.refresh * 3).cloned()
    }

    /// The version the ranker scores `routing_key`'s rows with, or `None`
    /// when the cache is off or does not know (recently) what it serves.
    pub fn version_for(&self, routing_key: &str) -> Option<Arc<str>> {
        if !self.config.enabled {
            return None;
        }
        Some(route(&self.serving()?, routing_key))
    }

    /// One request's lookup, rows counted by outcome. `None` when the cache
    /// is off, or is bypassed because it does not know (recently) what the
    /// ranker serves (rows counted `bypass`): every row goes to the ranker.
    /// While the ranker runs a shadow model, `shadow_share` of requests (by
    /// `request_id`) are looked up without serving hits (rows counted
    /// `shadow`): the ranker scores all their rows, so the shadow sees whole
    /// requests, and their fresh scores are stored as any miss's.
    pub fn lookup_request(
        &self,
        routing_key: &str,
        request_id: &str,
        matrix: &FeatureMatrix,
        ads: &[EligibleAd],
    ) -> Option<Lookup> {
        if !self.config.enabled {
            return None;
        }
        let Some(serving) = self.serving() else {
            let rows = (matrix.num_rows as usize).min(ads.len());
            metrics::counter!("adserve_gateway_prediction_cache_rows_total", "result" => "bypass")
                .increment(rows as u64);
            return None;
        };
        let version = route(&serving, routing_key);
        // The registry's bucket function, over request ids: a uniform sample of requests.
        let for_shadow = serving.shadow && adserve_registry::in_canary(request_id, self.config.shadow_share);
        Some(self.look(version, matrix, ads, !for_shadow))
    }

    /// Looks up every row of `matrix` (row `i` is ad `ads[i]`) for
    /// `version`. Counts each row's outcome and the oldest hit's age.
    pub fn lookup(&self, version: Arc<str>, matrix: &FeatureMatrix, ads: &[EligibleAd]) -> Lookup {
        self.look(version, matrix, ads, true)
    }

    /// [`lookup`](Self::lookup); without `serve`, no hit is served (every
    /// row counted `shadow`), but the keys are there to store the ranker's
    /// scores under.
    fn look(&self, version: Arc<str>, matrix: &FeatureMatrix, ads: &[EligibleAd], serve: bool) -> Lookup {
        let rows = (matrix.num_rows as usize).min(ads.len());
        let seed = self.seed(&version, matrix);
        let now = Instant::now();
        let mut keys = Vec::with_capacity(rows);
        let mut pctr = Vec::with_capacity(rows);
        let (mut hits, mut misses, mut expired) = (0u64, 0u64, 0u64);
        let mut oldest = Duration::ZERO;
        for (i, ad) in ads.iter().enumerate().take(rows) {
            let (key, check) = self.row_key(seed, matrix, i, ad);
            keys.push((ad.ad_id, key, check));
            if !serve {
                pctr.push(None);
                continue;
            }
            let found = self.shard(key).lock().unwrap_or_else(|e| e.into_inner()).get(&(ad.ad_id, key)).copied();
            let cached = match found {
                Some(e) if e.check == check => {
                    let age = now.saturating_duration_since(e.stored);
                    if age <= self.config.ttl {
                        oldest = oldest.max(age);
                        hits += 1;
                        Some(e.pctr)
                    } else {
                        expired += 1;
                        None
                    }
                }
                _ => {
                    misses += 1;
                    None
                }
            };
            pctr.push(cached);
        }
        let count = |result: &'static str, n: u64| {
            if n > 0 {
                metrics::counter!("adserve_gateway_prediction_cache_rows_total", "result" => result).increment(n);
            }
        };
        count("hit", hits);
        count("miss", misses);
        count("expired", expired);
        if !serve {
            count("shadow", rows as u64);
        }
        if hits > 0 {
            metrics::histogram!("adserve_gateway_prediction_cache_hit_age_seconds").record(oldest.as_secs_f64());
        }
        Lookup { version, keys, pctr, for_shadow: !serve }
    }

    /// Stores the ranker's scores of `rows` (indices into `lookup`), if the
    /// model the lookup was for gave them: scores from the ranker's fallback
    /// chain (`level` other than MODEL) or from another version (a swap
    /// between the lookup and the answer) are not stored, so every hit is a
    /// model score of the version it is served as.
    pub fn store(&self, lookup: &Lookup, rows: &[usize], pctr: &[f32], version: &str, level: ScoreLevel) {
        if level != ScoreLevel::Model || version != &*lookup.version {
            return;
        }
        let now = Instant::now();
        let cap = self.config.max_entries / SHARDS;
        for (&row, &p) in rows.iter().zip(pctr) {
            let Some(&(ad_id, key, check)) = lookup.keys.get(row) else { continue };
            let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
            if shard.len() >= cap && !shard.contains_key(&(ad_id, key)) {
                self.make_room(&mut shard, cap, now);
            }
            if shard.insert((ad_id, key), Entry { check, pctr: p, stored: now }).is_none() {
                self.entries.fetch_add(1, Ordering::Relaxed);
            }
        }
        metrics::gauge!("adserve_gateway_prediction_cache_entries").set(self.entries.load(Ordering::Relaxed) as f64);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A full shard drops what has expired, then (still full) an arbitrary
    /// eighth of what is left: bounded memory without an LRU's bookkeeping
    /// on every hit.
    fn make_room(&self, shard: &mut HashMap<(i64, u64), Entry>, cap: usize, now: Instant) {
        let before = shard.len();
        let ttl = self.config.ttl;
        shard.retain(|_, e| now.saturating_duration_since(e.stored) <= ttl);
        if shard.len() >= cap {
            let drop: Vec<(i64, u64)> = shard.keys().take((cap / 8).max(1)).copied().collect();
            for k in drop {
                shard.remove(&k);
            }
        }
        let removed = before - shard.len();
        self.entries.fetch_sub(removed, Ordering::Relaxed);
        metrics::counter!("adserve_gateway_prediction_cache_evicted_total").increment(removed as u64);
    }

    fn shard(&self, key: u64) -> &Shard {
        &self.shards[(key >> 58) as usize % SHARDS]
    }

    /// What every row's key starts from: the version and the column names.
    fn seed(&self, version: &str, matrix: &FeatureMatrix) -> RowHash {
        let mut h = RowHash::new(self.config.mantissa_bits);
        h.bytes(version.as_bytes());
        for names in [&matrix.feature_names, &matrix.categorical_names, &matrix.embedding_names] {
            h.word(names.len() as u64);
            for n in names {
                h.bytes(n.as_bytes());
            }
        }
        for d in &matrix.embedding_dims {
            h.word(u64::from(*d));
        }
        h
    }

    fn row_key(&self, seed: RowHash, matrix: &FeatureMatrix, row: usize, ad: &EligibleAd) -> (u64, u64) {
        let mut h = seed;
        h.word(ad.ad_id as u64);
        h.word(fingerprint(ad));
        h.floats(matrix.row(row).unwrap_or_default());
        for id in matrix.categorical_row(row).unwrap_or_default() {
            h.word(*id as u64);
        }
        h.floats(matrix.embedding_row(row).unwrap_or_default());
        h.finish()
    }
}

/// The version the ranker routes `routing_key` to, as the ranker does.
fn route(serving: &Serving, routing_key: &str) -> Arc<str> {
    match &serving.canary {
        Some((canary, share)) if !routing_key.is_empty() && adserve_registry::in_canary(routing_key, *share) => {
            canary.clone()
        }
        _ => serving.production.clone(),
    }
}

/// What the model could learn of an ad from the catalog: a changed
/// creative, category, advertiser or campaign changes it, so the ad's
/// cached scores are no longer reachable. Bids, budgets and floors are left
/// out: they do not change a pCTR.
pub fn fingerprint(ad: &EligibleAd) -> u64 {
    let mut h = RowHash::new(23);
    h.word(ad.campaign_id as u64);
    h.word(ad.advertiser_id as u64);
    for s in [&ad.title, &ad.landing_url, &ad.category, &ad.advertiser_domain] {
        h.bytes(s.as_bytes());
    }
    h.floats(&[ad.quality]);
    h.finish().0
}

/// Two independent 64-bit hashes of a row, fed word by word: one picks the
/// entry, the other confirms it (a false hit needs both to collide).
#[derive(Debug, Clone, Copy)]
struct RowHash {
    a: u64,
    b: u64,
    mask: u32,
    half: u32,
}

impl RowHash {
    fn new(mantissa_bits: u32) -> Self {
        let dropped = 23 - mantissa_bits.min(23);
        let mask = !((1u32 << dropped) - 1);
        let half = if dropped == 0 { 0 } else { 1 << (dropped - 1) };
        Self { a: 0x243f_6a88_85a3_08d3, b: 0x1319_8a2e_0370_7344, mask, half }
    }

    fn word(&mut self, w: u64) {
        self.a = (self.a ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
        self.b = (self.b ^ w.rotate_left(32)).wrapping_mul(0xc2b2_ae3d_27d4_eb4f).rotate_left(31);
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.word(bytes.len() as u64);
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.word(u64::from_le_bytes(w));
        }
    }

    /// Each value rounded to the kept mantissa bits (ties away from zero);
    /// -0 and 0 are one value.
    fn floats(&mut self, values: &[f32]) {
        for v in values {
            let bits = if *v == 0.0 { 0 } else { v.to_bits() };
            self.word(u64::from(bits.wrapping_add(self.half) & self.mask));
        }
    }

    fn finish(self) -> (u64, u64) {
        (mix(self.a), mix(self.b))
    }
}

/// The splitmix64 finalizer: every input bit reaches every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Keeps `cache` told what the ranker serves: `GetModel` every `refresh`,
/// each call bounded by `refresh`. Ends when the cache is dropped. A failed
/// read leaves the last answer, which stops counting after `3 × refresh`
/// ([`PredictionCache::version_for`]).
pub fn follow(cache: Weak<PredictionCache>, ranker: RankerServiceClient<Channel>, refresh: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let Some(cache) = cache.upgrade() else { return };
            let mut client = ranker.clone();
            let mut request = tonic::Request::new(GetModelRequest::default());
            request.set_timeout(refresh);
            match tokio::time::timeout(refresh, client.get_model(request)).await {
                Ok(Ok(m)) => {
                    let m = m.into_inner();
                    let canary = (!m.canary_model_version.is_empty())
                        .then_some((m.canary_model_version.as_str(), m.canary_share));
                    cache.set_serving(&m.model_version, canary, !m.shadow_model_version.is_empty());
                    if failing {
                        tracing::info!(version = %m.model_version, "prediction cache: the ranker answers again");
                        failing = false;
                    }
                }
                Ok(Err(e)) if !failing => {
                    tracing::warn!(error = %e, "prediction cache: the ranker does not say what it serves; bypassing soon");
                    failing = true;
                }
                Err(_) if !failing => {
                    tracing::warn!("prediction cache: GetModel timed out; bypassing soon");
                    failing = true;
                }
                _ => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad(id: i64) -> EligibleAd {
        EligibleAd {
            ad_id: id,
            campaign_id: 7,
            advertiser_id: 3,
            title: format!("ad {id}"),
            landing_url: "https://example.com".into(),
            category: "travel".into(),
            bid_cpc_micros: Some(500_000),
            bid_cpm_micros: None,
            quality: 1.0,
            daily_budget_micros: 1_000_000,
            frequency_cap_per_day: None,
            reserve_ecpm_micros: 0,
            advertiser_domain: String::new(),
        }
    }

    fn matrix(rows: &[[f32; 2]]) -> FeatureMatrix {
        FeatureMatrix {
            feature_names: vec!["user_x".into(), "ad_y".into()],
            num_rows: rows.len() as u32,
            values: rows.iter().flatten().copied().collect(),
            categorical_names: vec!["ctx".into()],
            categorical_ids: vec![5; rows.len()],
            ..Default::default()
        }
    }

    fn cache(tweak: impl FnOnce(&mut PredictionCacheConfig)) -> Arc<PredictionCache> {
        let mut config = PredictionCacheConfig::default();
        tweak(&mut config);
        let c = PredictionCache::new(config);
        c.set_serving("v1", None, false);
        c
    }

    fn fill(c: &PredictionCache, m: &FeatureMatrix, ads: &[EligibleAd], version: &str) -> Lookup {
        let l = c.lookup(version.into(), m, ads);
        let misses = l.misses();
        let scores: Vec<f32> = misses.iter().map(|i| 0.01 * (*i as f32 + 1.0)).collect();
        c.store(&l, &misses, &scores, version, ScoreLevel::Model);
        l
    }

    #[test]
    fn a_stored_score_is_served_for_the_same_row_ad_and_version_only() {
        let c = cache(|_| {});
        let ads = [ad(1), ad(2)];
        let m = matrix(&[[0.5, 1.0], [0.5, 2.0]]);
        let first = fill(&c, &m, &ads, "v1");
        assert_eq!(first.pctr, vec![None, None]);
        assert_eq!(c.lookup("v1".into(), &m, &ads).pctr, vec![Some(0.01), Some(0.02)]);
        // Another model version, a changed feature value, another ad in the
        // row's place, or a changed creative: all misses.
        assert_eq!(c.lookup("v2".into(), &m, &ads).pctr, vec![None, None]);
        let changed = matrix(&[[0.5, 1.0], [0.5, 2.000_001]]);
        assert_eq!(c.lookup("v1".into(), &changed, &ads).pctr, vec![Some(0.01), None]);
        assert_eq!(c.lookup("v1".into(), &m, &[ad(2), ad(1)]).pctr, vec![None, None]);
        let mut retitled = ad(2);
        retitled.title = "new creative".into();
        assert_eq!(c.lookup("v1".into(), &m, &[ad(1), retitled]).pctr, vec![Some(0.01), None]);
        // A bid change is not an ad change for the model.
        let mut rebid = ad(2);
        rebid.bid_cpc_micros = Some(9);
        assert_eq!(c.lookup("v1".into(), &m, &[ad(1), rebid]).pctr, vec![Some(0.01), Some(0.02)]);
    }

    #[test]
    fn fewer_mantissa_bits_let_near_rows_share_a_score() {
        let c = cache(|c| c.mantissa_bits = 8);
        let ads = [ad(1)];
        fill(&c, &matrix(&[[0.5, 100.0]]), &ads, "v1");
        // 100.1 is within 2^-8 relative of 100; 101 is not.
        assert_eq!(c.lookup("v1".into(), &matrix(&[[0.5, 100.1]]), &ads).pctr, vec![Some(0.01)]);
        assert_eq!(c.lookup("v1".into(), &matrix(&[[0.5, 101.0]]), &ads).pctr, vec![None]);
        // -0 and 0 are the same value.
        let c = cache(|_| {});
        fill(&c, &matrix(&[[0.0, 1.0]]), &ads, "v1");
        assert_eq!(c.lookup("v1".into(), &matrix(&[[-0.0, 1.0]]), &ads).pctr, vec![Some(0.01)]);
    }

    #[test]
    fn scores_expire_after_the_ttl() {
        let c = cache(|c| c.ttl = Duration::from_millis(100));
        let ads = [ad(1)];
        let m = matrix(&[[0.5, 1.0]]);
        fill(&c, &m, &ads, "v1");
        assert_eq!(c.lookup("v1".into(), &m, &ads).pctr, vec![Some(0.01)]);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(c.lookup("v1".into(), &m, &ads).pctr, vec![None]);
    }

    #[test]
    fn memory_is_bounded_by_max_entries() {
        let c = cache(|c| c.max_entries = SHARDS * 4);
        let ads: Vec<EligibleAd> = (0..2000).map(ad).collect();
        let rows: Vec<[f32; 2]> = (0..2000).map(|i| [0.5, i as f32]).collect();
        fill(&c, &matrix(&rows), &ads, "v1");
        assert!(c.len() <= SHARDS * 4, "{} entries", c.len());
        assert!(!c.is_empty());
    }

    #[test]
    fn the_version_follows_the_rankers_routing_and_lapses_when_unknown() {
        let c =
            PredictionCache::new(PredictionCacheConfig { refresh: Duration::from_millis(100), ..Default::default() });
        assert_eq!(c.version_for("u"), None, "nothing is served before the ranker said what it serves");
        c.set_serving("prod", Some(("canary", 0.5)), false);
        let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
        for k in &keys {
            let want = if adserve_registry::in_canary(k, 0.5) { "canary" } else { "prod" };
            assert_eq!(c.version_for(k).as_deref(), Some(want), "{k}");
        }
        assert!(keys.iter().any(|k| c.version_for(k).as_deref() == Some("canary")));
        assert_eq!(c.version_for("").as_deref(), Some("prod"), "anonymous stays on production");
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(c.version_for("u"), None, "an answer older than 3 x refresh is not trusted");
        let off = PredictionCache::new(PredictionCacheConfig { enabled: false, ..Default::default() });
        off.set_serving("prod", None, false);
        assert_eq!(off.version_for("u"), None);
        let ads = [ad(1)];
        assert!(off.lookup_request("u", "r", &matrix(&[[0.5, 1.0]]), &ads).is_none());
        // Lapsed: bypassed, every row to the ranker.
        assert!(c.lookup_request("u", "r", &matrix(&[[0.5, 1.0]]), &ads).is_none());
    }

    #[test]
    fn while_a_shadow_runs_a_share_of_requests_skip_the_hits_and_still_store() {
        let c = cache(|c| c.shadow_share = 0.25);
        let ads = [ad(1), ad(2)];
        let m = matrix(&[[0.5, 1.0], [0.5, 2.0]]);
        fill(&c, &m, &ads, "v1");
        let requests: Vec<String> = (0..400).map(|i| format!("0190b7a2-1c2d-7e3f-8a9b-{i:012}")).collect();
        let served =
            |c: &PredictionCache, r: &str| c.lookup_request("u", r, &m, &ads).unwrap().pctr == [Some(0.01), Some(0.02)];
        // No shadow: every request is served its hits.
        assert!(requests.iter().all(|r| served(&c, r)));
        c.set_serving("v1", None, true);
        let skipped: Vec<&String> = requests.iter().filter(|r| !served(&c, r)).collect();
        // About a quarter, and always the same requests (a retry is sampled alike).
        assert!((60..=140).contains(&skipped.len()), "{} of 400 skipped", skipped.len());
        assert!(skipped.iter().all(|r| !served(&c, r)));
        // A skipped request's rows are all misses, and what the ranker then
        // answers is stored for the next request.
        let l = c.lookup_request("u", skipped[0], &matrix(&[[0.5, 3.0], [0.5, 2.0]]), &ads).unwrap();
        assert_eq!(l.misses(), vec![0, 1]);
        c.store(&l, &[0, 1], &[0.3, 0.4], "v1", ScoreLevel::Model);
        c.set_serving("v1", None, false);
        assert_eq!(c.lookup("v1".into(), &matrix(&[[0.5, 3.0]]), &ads[..1]).pctr, vec![Some(0.3)]);
        // 0: the shadow sees the misses only; 1: no hit while it runs.
        for (share, skips) in [(0.0, 0), (1.0, 400)] {
            let c = cache(|c| c.shadow_share = share);
            fill(&c, &m, &ads, "v1");
            c.set_serving("v1", None, true);
            assert_eq!(requests.iter().filter(|r| !served(&c, r)).count(), skips, "share {share}");
        }
    }

    #[test]
    fn only_the_looked_up_models_own_scores_are_stored() {
        let c = cache(|_| {});
        let ads = [ad(1)];
        let m = matrix(&[[0.5, 1.0]]);
        // The ranker's fallback model (even under the same version), its
        // prior, and a version swapped in after the lookup: none is a hit.
        for (version, level) in [
            ("v1", ScoreLevel::FallbackModel),
            ("v1", ScoreLevel::Prior),
            ("v1", ScoreLevel::Unspecified),
            ("v2", ScoreLevel::Model),
        ] {
            let l = c.lookup("v1".into(), &m, &ads);
            c.store(&l, &[0], &[0.7], version, level);
            assert_eq!(c.lookup("v1".into(), &m, &ads).pctr, vec![None], "{version} {level:?}");
        }
        let l = c.lookup("v1".into(), &m, &ads);
        c.store(&l, &[0], &[0.7], "v1", ScoreLevel::Model);
        assert_eq!(c.lookup("v1".into(), &m, &ads).pctr, vec![Some(0.7)]);
    }

    #[test]
    fn config_is_checked() {
        assert!(PredictionCacheConfig::default().validate("prediction_cache").is_ok());
        let bad = PredictionCacheConfig { mantissa_bits: 24, ..Default::default() };
        assert!(bad.validate("prediction_cache").unwrap_err().to_string().contains("prediction_cache.mantissa_bits"));
        let bad = PredictionCacheConfig { ttl: Duration::ZERO, ..Default::default() };
        assert!(bad.validate("prediction_cache").unwrap_err().to_string().contains("prediction_cache.ttl"));
        let bad = PredictionCacheConfig { shadow_share: 1.5, ..Default::default() };
        assert!(bad.validate("prediction_cache").unwrap_err().to_string().contains("prediction_cache.shadow_share"));
    }
}
