//! Budget pacing on the request path.
//!
//! A background task re-plans every campaign's pass-through rate each
//! `pacing.interval`: budgets from the catalog, spend today from the
//! real-time counters, the controller from adserve_auction::pacing. The
//! request path only reads the latest published rates (one atomic load) and
//! draws per campaign from the request's seed. A campaign whose spend has
//! reached its budget has rate 0 and is never served, with pacing on or off.
//! When Redis or PostgreSQL cannot be read, the last rates stay in force and
//! the request reports them as stale once they are older than
//! `pacing.max_staleness`.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::{Duration, Instant, SystemTime},
};

use adserve_auction::pacing::{Pacer, Spend};
use adserve_catalog::Catalog;
use adserve_counters::Counters;
use arc_swap::ArcSwap;

use crate::config::Pacing;

/// The rates in force.
#[derive(Debug, Default)]
pub struct Rates {
    /// Campaign -> pass-through rate; absent = not planned yet (rate 1).
    pub rates: HashMap<i64, f64>,
    /// When they were planned (None: never).
    pub planned_at: Option<Instant>,
}

/// Why a campaign may not bid on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It may bid.
    Admit,
    /// Its pacer's draw said no.
    Throttled,
    /// Its budget for today is spent.
    OutOfBudget,
}

impl Rates {
    /// Whether `campaign_id` may bid on a request whose seed is `seed`.
    pub fn verdict(&self, campaign_id: i64, seed: u64) -> Verdict {
        match self.rates.get(&campaign_id) {
            None => Verdict::Admit,
            Some(r) if *r <= 0.0 => Verdict::OutOfBudget,
            Some(r) if adserve_auction::pacing::draw(seed, campaign_id) < *r => Verdict::Admit,
            Some(_) => Verdict::Throttled,
        }
    }
}

/// The rates shared between the planner and the request path.
#[derive(Debug, Default)]
pub struct PacingState {
    current: ArcSwap<Rates>,
}

impl PacingState {
    /// The rates in force.
    pub fn rates(&self) -> Arc<Rates> {
        self.current.load_full()
    }

    /// Publishes new rates.
    pub fn publish(&self, rates: Rates) {
        self.current.store(Arc::new(rates));
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One planning round: budgets, spend, new rates.
pub async fn plan(
    pacer: &mut Pacer,
    enabled: bool,
    catalog: &Catalog,
    counters: &Counters,
    now_unix: u64,
) -> Result<Rates, String> {
    let budgets = catalog.campaign_budgets().await.map_err(|e| e.to_string())?;
    let spend = counters.spend(adserve_counters::day_of(now_unix)).await.map_err(|e| format!("redis: {e}"))?;
    let mut rates = HashMap::with_capacity(budgets.len());
    for (campaign_id, budget_micros) in budgets {
        let spent_micros = spend.get(&campaign_id).copied().unwrap_or(0);
        let rate = pacer.update(Spend { campaign_id, budget_micros, spent_micros }, now_unix);
        let rate = if enabled || rate == 0.0 { rate } else { 1.0 };
        rates.insert(campaign_id, rate);
    }
    Ok(Rates { rates, planned_at: Some(Instant::now()) })
}

/// Runs the planner until `state` is dropped (the server that owns it is gone).
pub fn spawn(config: Pacing, catalog: Catalog, counters: Counters, state: Weak<PacingState>) {
    tokio::spawn(async move {
        let mut pacer = Pacer::new(config.controller());
        let mut tick = tokio::time::interval(config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            let started = Instant::now();
            // Bounded: a hung store costs at most one interval's plan.
            let round = tokio::time::timeout(
                config.interval.max(Duration::from_secs(1)),
                plan(&mut pacer, config.enabled, &catalog, &counters, unix_now()),
            )
            .await
            .unwrap_or_else(|_| Err("no answer within the pacing interval".into()));
            match round {
                Ok(rates) => {
                    let throttled = rates.rates.values().filter(|r| **r < 1.0 && **r > 0.0).count();
                    let spent = rates.rates.values().filter(|r| **r == 0.0).count();
                    metrics::gauge!("adserve_gateway_pacing_campaigns", "state" => "throttled").set(throttled as f64);
                    metrics::gauge!("adserve_gateway_pacing_campaigns", "state" => "out_of_budget").set(spent as f64);
                    metrics::histogram!("adserve_gateway_pacing_plan_seconds").record(started.elapsed().as_secs_f64());
                    state.publish(rates);
                    if failing {
                        tracing::info!("budget pacing recovered");
                        failing = false;
                    }
                }
                Err(e) => {
                    metrics::counter!("adserve_gateway_pacing_failures_total").increment(1);
                    if !failing {
                        tracing::warn!(error = %e, "budget pacing cannot read budgets or spend; keeping the last rates");
                        failing = true;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_published_rates() {
        let state = PacingState::default();
        let rates = Rates { rates: HashMap::from([(1, 0.0), (2, 1.0), (3, 0.3)]), planned_at: Some(Instant::now()) };
        assert_eq!(rates.verdict(1, 42), Verdict::OutOfBudget);
        assert_eq!(rates.verdict(2, 42), Verdict::Admit);
        assert_eq!(rates.verdict(9, 42), Verdict::Admit, "unplanned campaigns bid");
        let admitted = (0..10_000u64).filter(|seed| rates.verdict(3, *seed) == Verdict::Admit).count();
        assert!((2_700..3_300).contains(&admitted), "{admitted}");
        assert!(state.rates().planned_at.is_none());
        state.publish(rates);
        assert_eq!(state.rates().rates.len(), 3);
    }
}
