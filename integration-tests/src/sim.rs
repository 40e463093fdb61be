//! The simulator's world: users with interests and an age band, the
//! catalog's ads with a topic, an appeal and a quality, and the TRUE click
//! probability of every impression (user interest × ad topic, slot
//! position, device, time of day), with long-tailed click delays.
//!
//! Everything is drawn from one seed, so a world is reproducible. What the
//! serving stack sees of it are the features the world publishes (batch
//! features in DynamoDB, the catalog's retrieval estimate); what it never
//! sees is the truth, which the simulator keeps to score the trained model
//! against an oracle.
//!
//! The driver is `adserve-sim` (src/bin/sim.rs).

use std::{collections::HashMap, f64::consts::PI, time::Duration};

use adserve_feature_service::BatchRow;

/// Topics of the world: the demo catalog's ad categories, and the
/// registry's `user_interest_*` / `ad_topic_*` features.
pub const TOPICS: [&str; 5] = ["travel", "games", "finance", "food", "books"];

/// Placements with their position effect on the click logit (the slot's
/// place on the page: top of the feed is seen first, the sidebar last).
pub const PLACEMENTS: [(&str, f64, f64); 3] =
    [("feed_top", 0.40, 0.5), ("feed_mid", 0.35, 0.0), ("sidebar", 0.25, -0.6)];

/// Devices with their share of requests and effect on the click logit.
pub const DEVICES: [(&str, f64, f64); 4] =
    [("mobile", 0.55, 0.25), ("desktop", 0.30, 0.0), ("tablet", 0.10, 0.1), ("ctv", 0.05, -0.3)];

/// Age bands with their share of users and effect on the click logit.
pub const AGE_BANDS: [(&str, f64, f64); 5] =
    [("13-17", 0.08, 0.3), ("18-24", 0.2, 0.2), ("25-34", 0.3, 0.0), ("35-54", 0.27, -0.1), ("55+", 0.15, -0.3)];

/// A small, fast, seedable generator (SplitMix64): the world must be the
/// same for the same seed on every machine, whatever crate versions say.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
    }

    /// An index drawn with the given weights.
    pub fn pick(&mut self, weights: impl IntoIterator<Item = f64> + Clone) -> usize {
        let total: f64 = weights.clone().into_iter().sum();
        let mut x = self.uniform() * total;
        let mut last = 0;
        for (i, w) in weights.into_iter().enumerate() {
            if x < w {
                return i;
            }
            x -= w;
            last = i;
        }
        last
    }
}

/// A seed derived from a base seed and a label, so each part of the world
/// (users, ads, traffic, clicks) has its own stream.
pub fn derive(seed: u64, label: &str, n: u64) -> u64 {
    let mut r = Rng::new(seed ^ n.wrapping_mul(0xA24B_AED4_963E_E407));
    for b in label.bytes() {
        r.0 ^= u64::from(b);
        r.next_u64();
    }
    r.next_u64()
}

/// The parameters of the truth.
#[derive(Debug, Clone)]
pub struct Truth {
    /// Intercept of the click logit.
    pub base_logit: f64,
    /// Weight of (interest in the ad's topic − uniform share).
    pub interest_weight: f64,
    /// Spread of each user's own propensity (logit units).
    pub user_sigma: f64,
    /// Spread of each ad's own appeal (logit units).
    pub ad_sigma: f64,
    /// Weight of (quality − 0.5) on the ad's appeal.
    pub quality_weight: f64,
    /// Amplitude of the time-of-day effect (logit units; peak at 20:00 UTC).
    pub hour_amplitude: f64,
    /// How concentrated users' interests are (the spread of the logits of
    /// the softmax that draws them).
    pub interest_concentration: f64,
}

impl Default for Truth {
    fn default() -> Self {
        Self {
            base_logit: -3.5,
            interest_weight: 4.0,
            user_sigma: 0.4,
            ad_sigma: 0.3,
            quality_weight: 1.2,
            hour_amplitude: 0.2,
            interest_concentration: 1.5,
        }
    }
}

/// A simulated user.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// Id sent to the gateway.
    pub id: String,
    /// Index into [`AGE_BANDS`].
    pub age_band: usize,
    /// Share of interest per topic (sums to 1).
    pub interests: [f64; TOPICS.len()],
    /// The user's own click propensity (logit offset).
    pub propensity: f64,
    /// Sessions in the last 7 days: how often the user comes back (requests
    /// are drawn in proportion), and a published feature.
    pub sessions_7d: f64,
    /// The user's measured 30-day CTR (published; a noisy view of
    /// propensity and age band).
    pub ctr_30d: f64,
}

/// A catalog ad as the world knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ad {
    /// Catalog id.
    pub id: i64,
    /// Index into [`TOPICS`], when its category is one of them.
    pub topic: Option<usize>,
    /// Creative quality in [0, 1] (published).
    pub quality: f64,
    /// The ad's own appeal (logit offset, includes quality).
    pub appeal: f64,
    /// The ad's measured 7-day CTR (published; a noisy view of its appeal).
    pub ctr_7d: f64,
}

/// One ad slot shown to one user: everything the truth depends on.
#[derive(Debug, Clone, Copy)]
pub struct Exposure<'a> {
    /// The user.
    pub user: &'a User,
    /// The ad.
    pub ad: &'a Ad,
    /// Index into [`PLACEMENTS`] (None: a placement the world does not know, no effect).
    pub placement: Option<usize>,
    /// Index into [`DEVICES`].
    pub device: usize,
    /// Hour of the day (UTC, fractional).
    pub hour: f64,
}

/// Users, ads and the truth that links them.
#[derive(Debug, Clone)]
pub struct World {
    /// The truth's parameters.
    pub truth: Truth,
    /// Users, in id order.
    pub users: Vec<User>,
    /// Ads by catalog id.
    pub ads: HashMap<i64, Ad>,
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

impl World {
    /// A world of `users` users over the catalog's `ads` (id, category),
    /// drawn from `seed`. The same seed and catalog give the same world.
    pub fn new(seed: u64, users: usize, ads: &[(i64, String)], truth: Truth) -> Self {
        let users = (0..users)
            .map(|u| {
                let mut r = Rng::new(derive(seed, "user", u as u64));
                let age_band = r.pick(AGE_BANDS.iter().map(|b| b.1));
                let logits: Vec<f64> = TOPICS.iter().map(|_| r.normal() * truth.interest_concentration).collect();
                let max = logits.iter().copied().fold(f64::MIN, f64::max);
                let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f64 = exp.iter().sum();
                let mut interests = [0.0; TOPICS.len()];
                for (i, e) in exp.iter().enumerate() {
                    interests[i] = e / sum;
                }
                let propensity = r.normal() * truth.user_sigma;
                let sessions_7d = (1.0 + (r.normal() * 0.8 + 1.5).exp()).round().min(60.0);
                // What 30 days of history would have measured: the user's
                // own rate, seen through noise.
                let ctr_30d =
                    sigmoid(truth.base_logit + AGE_BANDS[age_band].2 + propensity + r.normal() * 0.15).clamp(1e-4, 1.0);
                User { id: format!("sim-{seed}-user-{u}"), age_band, interests, propensity, sessions_7d, ctr_30d }
            })
            .collect();
        let ads = ads
            .iter()
            .map(|(id, category)| {
                let mut r = Rng::new(derive(seed, "ad", *id as u64));
                let topic = TOPICS.iter().position(|t| t == category);
                let quality = r.uniform();
                let appeal = r.normal() * truth.ad_sigma + truth.quality_weight * (quality - 0.5);
                let ctr_7d = sigmoid(truth.base_logit + appeal + r.normal() * 0.1).clamp(1e-4, 1.0);
                (*id, Ad { id: *id, topic, quality, appeal, ctr_7d })
            })
            .collect();
        Self { truth, users, ads }
    }

    /// The true click logit of an exposure.
    pub fn logit(&self, e: &Exposure<'_>) -> f64 {
        let t = &self.truth;
        let uniform = 1.0 / TOPICS.len() as f64;
        let interest = e.ad.topic.map_or(0.0, |k| t.interest_weight * (e.user.interests[k] - uniform));
        t.base_logit
            + AGE_BANDS[e.user.age_band].2
            + e.user.propensity
            + e.ad.appeal
            + interest
            + e.placement.map_or(0.0, |p| PLACEMENTS[p].2)
            + DEVICES[e.device].2
            + t.hour_amplitude * (2.0 * PI * (e.hour - 14.0) / 24.0).sin()
    }

    /// The true click probability of an exposure.
    pub fn p_click(&self, e: &Exposure<'_>) -> f64 {
        sigmoid(self.logit(e))
    }

    /// The batch features the world publishes for a user: the DynamoDB
    /// item of the registry's user features (numbers, and the top interest
    /// as a string for the `user_top_interest_id` categorical).
    pub fn user_row(user: &User) -> BatchRow {
        let mut values = HashMap::from([
            ("ctr_30d".to_string(), user.ctr_30d as f32),
            ("sessions_7d".to_string(), user.sessions_7d as f32),
        ]);
        for (k, t) in TOPICS.iter().enumerate() {
            values.insert(format!("interest_{t}"), user.interests[k] as f32);
        }
        let top = (0..TOPICS.len()).max_by(|a, b| user.interests[*a].total_cmp(&user.interests[*b])).unwrap_or(0);
        let text = HashMap::from([("top_interest".to_string(), TOPICS[top].to_string())]);
        BatchRow { id: user.id.clone(), values, text, ..Default::default() }
    }

    /// The batch features the world publishes for an ad (its topic also as
    /// a string, for the `ad_topic_id` categorical).
    pub fn ad_row(ad: &Ad) -> BatchRow {
        let mut values =
            HashMap::from([("ctr_7d".to_string(), ad.ctr_7d as f32), ("quality_score".to_string(), ad.quality as f32)]);
        for (k, t) in TOPICS.iter().enumerate() {
            values.insert(format!("topic_{t}"), if ad.topic == Some(k) { 1.0 } else { 0.0 });
        }
        let text = ad.topic.map(|k| ("topic".to_string(), TOPICS[k].to_string())).into_iter().collect();
        BatchRow { id: ad.id.to_string(), values, text, ..Default::default() }
    }
}

/// Click delays: log-normal, so most clicks come soon and a long tail comes
/// after the label window (and is labelled 0, as it would be in production).
#[derive(Debug, Clone, Copy)]
pub struct Delays {
    /// Median delay.
    pub median: Duration,
    /// Spread of ln(delay).
    pub sigma: f64,
}

impl Delays {
    /// A delay drawn from the distribution.
    pub fn sample(&self, r: &mut Rng) -> Duration {
        Duration::from_secs_f64(self.median.as_secs_f64() * (self.sigma * r.normal()).exp())
    }

    /// Probability that a click comes within `window`.
    pub fn within(&self, window: Duration) -> f64 {
        if window.is_zero() {
            return 0.0;
        }
        let z = (window.as_secs_f64() / self.median.as_secs_f64()).ln() / self.sigma;
        normal_cdf(z)
    }
}

/// Φ(z), by the Abramowitz–Stegun 7.1.26 erf approximation (|error| < 1.5e-7).
pub fn normal_cdf(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 { 0.5 * (1.0 + erf) } else { 0.5 * (1.0 - erf) }
}

/// Area under the ROC curve of `scores` for binary `labels` (ties count
/// half), the same definition the trainer reports.
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let positives = labels.iter().filter(|l| **l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    // Sum of the positives' (average) ranks.
    let (mut rank_sum, mut i) = (0.0, 0);
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += idx[i..=j].iter().filter(|&&k| labels[k]).count() as f64 * avg;
        i = j + 1;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Vec<(i64, String)> {
        (0..100).map(|i| (i, TOPICS[i as usize % 5].to_string())).collect()
    }

    #[test]
    fn the_same_seed_draws_the_same_world() {
        let a = World::new(7, 50, &catalog(), Truth::default());
        let b = World::new(7, 50, &catalog(), Truth::default());
        let c = World::new(8, 50, &catalog(), Truth::default());
        assert_eq!(a.users, b.users);
        assert_eq!(a.ads, b.ads);
        assert_ne!(a.users, c.users);
    }

    #[test]
    fn interests_are_shares_and_published_features_cover_the_registry() {
        let w = World::new(3, 200, &catalog(), Truth::default());
        for u in &w.users {
            assert!((u.interests.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            assert!(u.interests.iter().all(|s| (0.0..=1.0).contains(s)));
        }
        // Every attribute the world publishes is one the registry reads,
        // numbers as dense features and strings as categoricals.
        let registry = adserve_features::registry();
        let attributes = |fs: &[adserve_features::FeatureSpec]| -> Vec<String> {
            fs.iter().filter(|f| f.source == adserve_features::Source::Dynamodb).map(|f| f.attribute.clone()).collect()
        };
        let (dense, categorical) = (attributes(&registry.features), attributes(&registry.categorical));
        let ad = w.ads.values().find(|a| a.topic.is_some()).expect("an ad with a topic");
        let (user, ad) = (World::user_row(&w.users[0]), World::ad_row(ad));
        for k in user.values.keys().chain(ad.values.keys()) {
            assert!(dense.contains(k), "{k} is not a registry attribute");
        }
        for k in user.text.keys().chain(ad.text.keys()) {
            assert!(categorical.contains(k), "{k} is not a registry categorical");
        }
        assert_eq!(ad.text.len() + user.text.len(), 2, "the topic and the top interest");
        for t in TOPICS {
            assert!(registry.names().contains(&format!("user_interest_{t}").as_str()));
            assert!(registry.names().contains(&format!("ad_topic_{t}").as_str()));
        }
    }

    #[test]
    fn interest_in_the_ads_topic_raises_the_click_probability() {
        let w = World::new(5, 1, &catalog(), Truth::default());
        let mut user = w.users[0].clone();
        let ad = &w.ads[&0]; // travel
        user.interests = [0.8, 0.05, 0.05, 0.05, 0.05];
        let keen = w.p_click(&Exposure { user: &user, ad, placement: Some(0), device: 0, hour: 12.0 });
        user.interests = [0.0, 0.25, 0.25, 0.25, 0.25];
        let cold = w.p_click(&Exposure { user: &user, ad, placement: Some(0), device: 0, hour: 12.0 });
        assert!(keen > 2.0 * cold, "keen {keen} vs cold {cold}");
        // Position: the sidebar is clicked less than the top of the feed.
        let top = w.p_click(&Exposure { user: &user, ad, placement: Some(0), device: 0, hour: 12.0 });
        let side = w.p_click(&Exposure { user: &user, ad, placement: Some(2), device: 0, hour: 12.0 });
        assert!(side < top);
    }

    #[test]
    fn delays_are_long_tailed_and_within_matches_the_samples() {
        let d = Delays { median: Duration::from_secs(2), sigma: 1.2 };
        let mut r = Rng::new(1);
        let n = 20_000;
        let window = Duration::from_secs(5);
        let samples: Vec<Duration> = (0..n).map(|_| d.sample(&mut r)).collect();
        let inside = samples.iter().filter(|s| **s <= window).count() as f64 / n as f64;
        assert!((inside - d.within(window)).abs() < 0.015, "sampled {inside} vs {}", d.within(window));
        assert!(d.within(window) < 0.9 && d.within(window) > 0.7);
        assert!((d.within(d.median) - 0.5).abs() < 1e-6);
        assert_eq!(d.within(Duration::ZERO), 0.0);
    }

    #[test]
    fn normal_cdf_matches_known_values() {
        for (z, p) in [(0.0, 0.5), (1.0, 0.841_344_7), (-1.96, 0.024_997_9), (3.0, 0.998_650_1)] {
            assert!((normal_cdf(z) - p).abs() < 1e-6, "Φ({z}) = {} not {p}", normal_cdf(z));
        }
    }

    #[test]
    fn auc_counts_pairs_and_ties() {
        assert_eq!(auc(&[0.1, 0.9], &[false, true]), Some(1.0));
        assert_eq!(auc(&[0.9, 0.1], &[false, true]), Some(0.0));
        assert_eq!(auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]), Some(0.75));
        assert_eq!(auc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn the_oracle_beats_chance_on_drawn_labels() {
        let w = World::new(11, 300, &catalog(), Truth::default());
        let mut r = Rng::new(2);
        let (mut p, mut y) = (vec![], vec![]);
        for i in 0..20_000 {
            let user = &w.users[i % w.users.len()];
            let ad = &w.ads[&((i * 7) as i64 % 100)];
            let e = Exposure { user, ad, placement: Some(i % 3), device: i % 4, hour: 10.0 };
            let q = w.p_click(&e);
            p.push(q);
            y.push(r.uniform() < q);
        }
        let a = auc(&p, &y).expect("both classes");
        assert!(a > 0.7, "oracle auc {a}");
    }
}
