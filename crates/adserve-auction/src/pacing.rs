//! Budget pacing by probabilistic throttling.
//!
//! A campaign that bids on every request it is eligible for spends its daily
//! budget in the morning and is absent for the rest of the day. The pacer
//! instead gives each campaign a pass-through rate `r` in `[min_rate, 1]`:
//! a request lets the campaign bid with probability `r`. Every control
//! interval the rate is re-planned from the campaign's spend so far today:
//!
//! * `F(t)` is the share of the day's traffic expected by time `t` (from an
//!   hourly traffic profile, uniform by default);
//! * the spend per unit of traffic the campaign would reach unthrottled is
//!   estimated from the last interval (`spend / (r x traffic)`), smoothed;
//! * the remaining budget is spread over the remaining traffic:
//!   `r = (remaining / (1 - F(t))) / unthrottled`, changed by at most a
//!   factor of `max_step` per interval so one noisy interval cannot swing it.
//!
//! A campaign whose spend has reached its budget has rate 0 and is never
//! served (a hard stop, independent of the controller). The pacer is pure:
//! the gateway feeds it spend read from the real-time counters and asks it
//! for rates; the simulation below runs it over a day of traffic.

use std::collections::HashMap;

/// Seconds in a pacing day.
pub const DAY_SECONDS: u64 = 86_400;

/// Controller settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PacingConfig {
    /// Rate of a campaign the pacer has not seen yet today.
    pub initial_rate: f64,
    /// Lowest rate of a campaign with budget left (it keeps bidding a little,
    /// so the controller keeps seeing its spend rate).
    pub min_rate: f64,
    /// Largest factor a rate may grow or shrink by in one interval (> 1).
    pub max_step: f64,
    /// Memory of the spend estimate, as a share of a day's traffic, `(0, 1]`:
    /// spend older than this weighs less than 1/e. Measured in traffic, not
    /// time, so a quiet night does not forget what the evening taught.
    pub memory: f64,
    /// How late spend reaches the counters the pacer reads (a CPC charge
    /// lands when the click does): spend the current rate is expected to
    /// have caused within this lag counts as already spent when planning.
    pub spend_lag_seconds: u64,
    /// Expected share of a day's traffic in each hour (24 non-negative
    /// weights, any scale; uniform when all equal).
    pub hourly_traffic: [f64; 24],
}

impl Default for PacingConfig {
    fn default() -> Self {
        Self {
            initial_rate: 1.0,
            min_rate: 0.001,
            max_step: 2.0,
            memory: 0.03,
            spend_lag_seconds: 300,
            hourly_traffic: [1.0; 24],
        }
    }
}

impl PacingConfig {
    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.min_rate > 0.0 && self.min_rate <= 1.0) {
            return Err(("min_rate", format!("must be in (0, 1], got {}", self.min_rate)));
        }
        if !(self.min_rate..=1.0).contains(&self.initial_rate) {
            return Err(("initial_rate", format!("must be in [min_rate, 1], got {}", self.initial_rate)));
        }
        if !(self.max_step.is_finite() && self.max_step > 1.0) {
            return Err(("max_step", format!("must be finite and > 1, got {}", self.max_step)));
        }
        if !(self.memory > 0.0 && self.memory <= 1.0) {
            return Err(("memory", format!("must be in (0, 1], got {}", self.memory)));
        }
        if self.hourly_traffic.iter().any(|w| !w.is_finite() || *w < 0.0)
            || self.hourly_traffic.iter().sum::<f64>() <= 0.0
        {
            return Err(("hourly_traffic", "must be 24 finite weights >= 0, not all 0".into()));
        }
        Ok(())
    }

    /// Share of the day's expected traffic by `second` of the day, in `[0, 1]`.
    pub fn traffic_done(&self, second: u64) -> f64 {
        let total: f64 = self.hourly_traffic.iter().sum();
        let second = second.min(DAY_SECONDS);
        let hour = (second / 3600) as usize;
        let full: f64 = self.hourly_traffic[..hour.min(24)].iter().sum();
        let part = if hour < 24 { self.hourly_traffic[hour] * (second % 3600) as f64 / 3600.0 } else { 0.0 };
        ((full + part) / total).clamp(0.0, 1.0)
    }
}

/// Spend so far today of one campaign, as the pacer is told it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spend {
    /// Campaign id.
    pub campaign_id: i64,
    /// Daily budget, micro units.
    pub budget_micros: i64,
    /// Spent today, micro units.
    pub spent_micros: i64,
}

#[derive(Debug, Clone, Copy)]
struct State {
    rate: f64,
    /// Day, second of day and spend at the last update.
    day: u64,
    second: u64,
    spent: i64,
    /// Decayed sums of spend and of exposure (rate x traffic share): their
    /// ratio estimates the unthrottled spend per unit of traffic share. A
    /// ratio of sums, not an average of ratios, so intervals with no spend
    /// do not bias the rate upwards.
    spend_acc: f64,
    exposure_acc: f64,
}

/// Pass-through rates of every campaign the pacer has been told about.
#[derive(Debug, Clone)]
pub struct Pacer {
    config: PacingConfig,
    campaigns: HashMap<i64, State>,
}

impl Pacer {
    /// A pacer with `config` (validate it first).
    pub fn new(config: PacingConfig) -> Self {
        Self { config, campaigns: HashMap::new() }
    }

    /// Re-plans one campaign at `unix_seconds` (UTC days) from its spend so
    /// far today; returns its new rate.
    pub fn update(&mut self, spend: Spend, unix_seconds: u64) -> f64 {
        let (day, second) = (unix_seconds / DAY_SECONDS, unix_seconds % DAY_SECONDS);
        let c = &self.config;
        let fresh =
            State { rate: c.initial_rate, day, second, spent: spend.spent_micros, spend_acc: 0.0, exposure_acc: 0.0 };
        let state = self.campaigns.entry(spend.campaign_id).or_insert(fresh);
        if state.day != day {
            // A new day: counters restart, and so does the plan (the
            // estimate of what the campaign would spend carries over).
            *state =
                State { second: 0, spent: 0, spend_acc: state.spend_acc, exposure_acc: state.exposure_acc, ..fresh };
        }
        let remaining = spend.budget_micros - spend.spent_micros;
        if remaining <= 0 {
            state.rate = 0.0;
            state.second = second;
            state.spent = spend.spent_micros;
            return 0.0;
        }
        let traffic = c.traffic_done(second) - c.traffic_done(state.second);
        let spent = (spend.spent_micros - state.spent).max(0) as f64;
        if traffic > 1e-6 && state.rate > 0.0 {
            let keep = (-traffic / c.memory).exp();
            state.spend_acc = state.spend_acc * keep + spent;
            state.exposure_acc = state.exposure_acc * keep + state.rate * traffic;
            let left = (1.0 - c.traffic_done(second)).max(1e-6);
            // Spend already caused but not yet counted.
            let lagging = c.traffic_done(second) - c.traffic_done(second.saturating_sub(c.spend_lag_seconds));
            let in_flight = if state.exposure_acc > 0.0 {
                state.spend_acc / state.exposure_acc * state.rate * lagging
            } else {
                0.0
            };
            let want = (remaining as f64 - in_flight).max(0.0) / left;
            let target = if want == 0.0 {
                0.0
            } else if state.spend_acc > 0.0 {
                want / (state.spend_acc / state.exposure_acc)
            } else {
                // Nothing spent at this rate yet: open up.
                f64::INFINITY
            };
            let prior = state.rate.max(c.min_rate);
            state.rate = target.clamp(prior / c.max_step, prior * c.max_step).clamp(c.min_rate, 1.0);
            state.second = second;
            state.spent = spend.spent_micros;
        } else if state.rate == 0.0 {
            // Budget raised (or spend corrected) after it ran out.
            state.rate = c.min_rate;
            state.second = second;
            state.spent = spend.spent_micros;
        }
        state.rate
    }

    /// The campaign's current rate; `initial_rate` for one never updated.
    pub fn rate(&self, campaign_id: i64) -> f64 {
        self.campaigns.get(&campaign_id).map_or(self.config.initial_rate, |s| s.rate)
    }

    /// Whether the campaign may bid on a request whose uniform draw in
    /// `[0, 1)` is `draw`. Out of budget is always false.
    pub fn admits(&self, campaign_id: i64, draw: f64) -> bool {
        draw < self.rate(campaign_id)
    }
}

/// A uniform draw in `[0, 1)` from `seed` and `campaign_id`: the same
/// request and campaign always draw the same, different campaigns
/// independently (SplitMix64 finaliser).
pub fn draw(seed: u64, campaign_id: i64) -> f64 {
    let z = crate::auction::mix(seed ^ (campaign_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A day of traffic against one campaign that could win far more than its
    /// budget: `requests_per_minute(minute)` requests, each won when the pacer
    /// admits it; a won request costs `cost` micros with probability
    /// `spend_probability` (a click), reported to the pacer `lag_minutes`
    /// later. Returns spend by minute.
    fn simulate(
        config: PacingConfig,
        budget: i64,
        requests_per_minute: impl Fn(u64) -> u64,
        spend_probability: f64,
        cost: i64,
        lag_minutes: usize,
    ) -> Vec<i64> {
        let mut pacer = Pacer::new(config);
        let day0 = 20_000 * DAY_SECONDS;
        let mut spent_by_minute = Vec::with_capacity(1440);
        let mut spent = 0i64;
        let mut seq = 0u64;
        for minute in 0..1440u64 {
            // The pacer sees the counters as they were `lag_minutes` ago.
            let seen =
                if (minute as usize) > lag_minutes { spent_by_minute[minute as usize - lag_minutes - 1] } else { 0 };
            pacer.update(Spend { campaign_id: 1, budget_micros: budget, spent_micros: seen }, day0 + minute * 60);
            for _ in 0..requests_per_minute(minute) {
                seq += 1;
                // Hard stop on what the request path knows, as in the gateway.
                if spent >= budget || !pacer.admits(1, draw(seq, 1)) {
                    continue;
                }
                if draw(seq, 2) < spend_probability {
                    spent += cost;
                }
            }
            spent_by_minute.push(spent);
        }
        spent_by_minute
    }

    fn diurnal(minute: u64) -> u64 {
        // Quiet at night, a peak in the evening: 20 to 180 requests a minute.
        let hour = minute as f64 / 60.0;
        (100.0 + 80.0 * ((hour - 14.0) / 24.0 * std::f64::consts::TAU).cos()) as u64
    }

    fn hourly_profile() -> [f64; 24] {
        std::array::from_fn(|h| (0..60).map(|m| diurnal(h as u64 * 60 + m) as f64).sum())
    }

    #[test]
    fn a_day_of_diurnal_traffic_spends_the_budget_within_5_percent_and_not_early() {
        // Unthrottled, the campaign would spend ~144k requests x 5% x 1 unit
        // = ~7.2k units: four times its budget of 1.8k units.
        let budget = 1_800_000_000;
        let config = PacingConfig { hourly_traffic: hourly_profile(), ..PacingConfig::default() };
        let spend = simulate(config.clone(), budget, diurnal, 0.05, 1_000_000, 5);
        let total = *spend.last().unwrap();
        let ratio = total as f64 / budget as f64;
        assert!((0.95..=1.05).contains(&ratio), "spent {ratio:.3} of budget");
        assert!(spend[22 * 60] < budget * 98 / 100, "ran out before 22:00: {}", spend[22 * 60]);
        // Spread with the traffic, not front-loaded: every hour, the share of
        // the budget spent is within 3 points of the share of traffic seen.
        for hour in 1..24u64 {
            let spent = spend[hour as usize * 60] as f64 / budget as f64;
            let traffic = config.traffic_done(hour * 3600);
            assert!((spent - traffic).abs() < 0.03, "at {hour}:00 spent {spent:.3} of budget, traffic {traffic:.3}");
        }
    }

    #[test]
    fn clicks_reported_half_an_hour_late_still_land_within_5_percent() {
        let budget = 1_800_000_000;
        let config =
            PacingConfig { hourly_traffic: hourly_profile(), spend_lag_seconds: 1800, ..PacingConfig::default() };
        let spend = simulate(config, budget, diurnal, 0.05, 1_000_000, 30);
        let ratio = *spend.last().unwrap() as f64 / budget as f64;
        assert!((0.95..=1.05).contains(&ratio), "spent {ratio:.3} of budget");
        assert!(spend[22 * 60] < budget * 98 / 100, "ran out before 22:00");
    }

    #[test]
    fn a_uniform_profile_still_lands_within_5_percent_under_diurnal_traffic() {
        let budget = 1_800_000_000;
        let spend = simulate(PacingConfig::default(), budget, diurnal, 0.05, 1_000_000, 5);
        let ratio = *spend.last().unwrap() as f64 / budget as f64;
        assert!((0.95..=1.05).contains(&ratio), "spent {ratio:.3} of budget");
        assert!(spend[21 * 60] < budget * 98 / 100, "ran out before 21:00");
    }

    #[test]
    fn a_campaign_that_cannot_reach_its_budget_is_not_throttled() {
        let budget = 1_000_000_000_000;
        let mut pacer = Pacer::new(PacingConfig::default());
        for minute in 1..600u64 {
            pacer.update(
                Spend { campaign_id: 1, budget_micros: budget, spent_micros: minute as i64 * 1000 },
                minute * 60,
            );
        }
        assert_eq!(pacer.rate(1), 1.0);
    }

    #[test]
    fn out_of_budget_is_never_admitted_and_a_new_day_reopens() {
        let mut pacer = Pacer::new(PacingConfig::default());
        let t = 30 * DAY_SECONDS + 3600;
        assert_eq!(pacer.update(Spend { campaign_id: 7, budget_micros: 100, spent_micros: 100 }, t), 0.0);
        assert!(!pacer.admits(7, 0.0));
        assert!((0..1000).all(|i| !pacer.admits(7, draw(i, 7))));
        let next_day = pacer.update(Spend { campaign_id: 7, budget_micros: 100, spent_micros: 0 }, t + DAY_SECONDS);
        assert_eq!(next_day, 1.0);
        assert!(pacer.admits(7, 0.5));
        assert_eq!(pacer.rate(99), 1.0, "unknown campaigns run at the initial rate");
    }

    #[test]
    fn draws_are_uniform_and_independent_per_campaign() {
        let n = 20_000;
        let below = (0..n).filter(|i| draw(*i, 1) < 0.3).count() as f64 / n as f64;
        assert!((0.28..0.32).contains(&below), "{below}");
        let both = (0..n).filter(|i| draw(*i, 1) < 0.5 && draw(*i, 2) < 0.5).count() as f64 / n as f64;
        assert!((0.23..0.27).contains(&both), "{both}");
    }

    #[test]
    fn settings_are_checked() {
        assert!(PacingConfig::default().validate().is_ok());
        assert_eq!(PacingConfig { min_rate: 0.0, ..Default::default() }.validate().unwrap_err().0, "min_rate");
        assert_eq!(PacingConfig { max_step: 1.0, ..Default::default() }.validate().unwrap_err().0, "max_step");
        assert_eq!(
            PacingConfig { hourly_traffic: [0.0; 24], ..Default::default() }.validate().unwrap_err().0,
            "hourly_traffic"
        );
        let c = PacingConfig::default();
        assert_eq!(c.traffic_done(0), 0.0);
        assert!((c.traffic_done(43_200) - 0.5).abs() < 1e-9);
        assert_eq!(c.traffic_done(DAY_SECONDS), 1.0);
    }
}
