//! Generalized second-price auction on quality-weighted eCPM.
//!
//! Every candidate gets a rank score: by default its eCPM, expected revenue
//! per thousand impressions (`bid_cpc x pCTR x 1000 x quality^alpha` for a
//! CPC bid, `bid_cpm x quality^alpha` for a CPM bid), or with a weighted
//! objective `a x pCTR + b x pCVR + g x eCPM` (eCPM in currency units, so
//! the weights stay readable). Candidates whose eCPM is below their reserve
//! (the larger of the request's and their own floor) are dropped; the rest
//! are ranked by score, ties broken by ad id so results are deterministic.
//! Slots are filled greedily in rank order, skipping an advertiser that
//! already holds `max_per_advertiser` slots.
//!
//! **Price.** Each winner pays the least bid, in its own bid's unit, that
//! would still have kept its slot: it must stay ahead of the candidate that
//! would have taken the slot without it, and its eCPM must clear its reserve.
//! The price is found by bisection over whole micro units with the very
//! arithmetic that ranked it, so "the price keeps the slot" holds exactly
//! for every price (no floating-point tolerance that can under-charge), and
//! it is never above the bid, because the bid itself kept the slot.
//!
//! **Exploration.** With probability `exploration` per slot (drawn from a
//! seeded generator, so a fixed seed gives a fixed outcome), the slot goes
//! to an eligible candidate chosen uniformly instead (epsilon-greedy). Every
//! winner carries its propensity, the probability that it was placed in
//! that slot given the slots above, for inverse-propensity weighting in
//! training. An explored winner pays its reserve price (it did not win on
//! rank).

use std::cmp::Ordering;

use crate::{MAX_CANDIDATES, MAX_SLOTS, MIN_PCTR, is_valid_pctr};

/// What a bid pays for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BidType {
    /// Cost per click: the bid and price are per click.
    #[default]
    Cpc,
    /// Cost per mille: the bid and price are per thousand impressions.
    Cpm,
}

/// One ad competing in the auction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Ad id (unique within an auction).
    pub ad_id: i64,
    /// Campaign of the ad.
    pub campaign_id: i64,
    /// Advertiser of the campaign (the unit of the diversity cap).
    pub advertiser_id: i64,
    /// What the bid pays for.
    pub bid_type: BidType,
    /// The bid in micro currency units: per click (CPC) or per mille (CPM).
    pub bid_micros: i64,
    /// Calibrated predicted click-through rate in `[MIN_PCTR, 1]`.
    pub pctr: f32,
    /// Predicted conversion rate in `[0, 1]` (0 when unknown); only a
    /// weighted objective reads it.
    pub pcvr: f32,
    /// Ad quality multiplier, `(0, MAX_QUALITY]`; 1 is neutral.
    pub quality: f32,
    /// This candidate's own eCPM floor (placement, category or learned),
    /// micro units; the request's reserve applies when it is higher.
    pub reserve_ecpm_micros: i64,
}

impl Candidate {
    /// A neutral CPC candidate: quality 1, no pCVR, no floor of its own, its
    /// own advertiser.
    pub fn cpc(ad_id: i64, campaign_id: i64, bid_cpc_micros: i64, pctr: f32) -> Self {
        Self {
            ad_id,
            campaign_id,
            advertiser_id: campaign_id,
            bid_type: BidType::Cpc,
            bid_micros: bid_cpc_micros,
            pctr,
            pcvr: 0.0,
            quality: 1.0,
            reserve_ecpm_micros: 0,
        }
    }
}

/// Highest accepted quality multiplier.
pub const MAX_QUALITY: f32 = 100.0;
/// Highest accepted quality exponent.
pub const MAX_QUALITY_EXPONENT: f64 = 4.0;

/// How candidates are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Objective {
    /// Rank by eCPM (the default).
    #[default]
    Ecpm,
    /// Rank by `pctr x pCTR + pcvr x pCVR + ecpm x eCPM` (eCPM in currency
    /// units per mille). Weights are finite and >= 0, `ecpm` > 0 so that a
    /// bid still buys rank and the price stays defined.
    Weighted {
        /// Weight of pCTR.
        pctr: f64,
        /// Weight of pCVR.
        pcvr: f64,
        /// Weight of eCPM in currency units per mille.
        ecpm: f64,
    },
}

/// The auction's rules for one request. The gateway sends them with every
/// request, so the auction service and the gateway's in-process fallback
/// apply the same rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    /// Slots to fill, `1..=MAX_SLOTS`.
    pub slots: usize,
    /// Request-wide eCPM floor, micro units, `>= 0` (0 means none).
    pub reserve_ecpm_micros: i64,
    /// Exponent alpha of quality in the eCPM, `[0, MAX_QUALITY_EXPONENT]`.
    pub quality_exponent: f64,
    /// Most slots one advertiser may take; 0 = no cap.
    pub max_per_advertiser: usize,
    /// Ranking objective.
    pub objective: Objective,
    /// Share of slots filled by exploration, `[0, 1)`.
    pub exploration: f64,
    /// Seed of the exploration draws (the gateway derives it from the
    /// request id, so a request's outcome can be replayed).
    pub seed: u64,
}

impl Rules {
    /// Pure eCPM ranking, no caps, no exploration.
    pub fn new(slots: usize, reserve_ecpm_micros: i64) -> Self {
        Self {
            slots,
            reserve_ecpm_micros,
            quality_exponent: 1.0,
            max_per_advertiser: 0,
            objective: Objective::Ecpm,
            exploration: 0.0,
            seed: 0,
        }
    }
}

/// A priced winner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Winner {
    /// The winning candidate.
    pub candidate: Candidate,
    /// Slot, 0 = best.
    pub slot: u32,
    /// eCPM at its bid, micro units (rounded).
    pub ecpm_micros: i64,
    /// Price in the bid's unit (per click for CPC, per mille for CPM), micro
    /// units: the least bid that kept the slot, at least the reserve price,
    /// at most the bid.
    pub price_micros: i64,
    /// Probability that this candidate was placed in this slot, given the
    /// slots above it.
    pub propensity: f32,
    /// The slot was filled by exploration rather than by rank.
    pub explored: bool,
}

/// The result of an auction.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// Winners in slot order.
    pub winners: Vec<Winner>,
    /// Candidates at or above their reserve.
    pub eligible: usize,
}

/// Input the auction refuses; each names the offending field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuctionError {
    /// No candidates at all.
    #[error("candidates: at least one candidate is required")]
    NoCandidates,
    /// More than [`MAX_CANDIDATES`].
    #[error("candidates: at most {MAX_CANDIDATES}, got {0}")]
    TooManyCandidates(usize),
    /// A candidate's field is out of range.
    #[error("candidates[{index}].{field}: {reason}")]
    Candidate {
        /// Position in the request.
        index: usize,
        /// The field.
        field: &'static str,
        /// What is wrong, with the value sent.
        reason: String,
    },
    /// Two candidates share an ad id.
    #[error("candidates[{index}].ad_id: {ad_id} is repeated")]
    RepeatedAd {
        /// Position of the later occurrence.
        index: usize,
        /// The repeated id.
        ad_id: i64,
    },
    /// A rule is out of range.
    #[error("{field}: {reason}")]
    Rule {
        /// The rule's field name on the wire.
        field: &'static str,
        /// What is wrong, with the value sent.
        reason: String,
    },
}

/// Runs the auction. Pure, deterministic for a given seed, and light on
/// allocation: this is on every request's path.
pub fn run_auction(candidates: &[Candidate], rules: &Rules) -> Result<Outcome, AuctionError> {
    validate(candidates, rules)?;
    let alpha = rules.quality_exponent;
    let qf_of = quality_factor_fn(alpha);
    let mut ranking = Ranking::new(
        candidates
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let ecpm = ecpm_at(c, c.bid_micros, qf_of(c.quality, alpha));
                (ecpm >= reserve_of(c, rules)).then(|| Ranked {
                    score: score(&rules.objective, c, ecpm),
                    ad_id: c.ad_id,
                    index: i as u32,
                })
            })
            .collect(),
        rules.slots,
    );
    let eligible = ranking.len();
    let mut rng = SplitMix64(rules.seed);
    let mut winners: Vec<Winner> = Vec::with_capacity(rules.slots.min(eligible));
    let mut slots = Slots::new(candidates, rules);

    for slot in 0..rules.slots {
        // Greedy pick: the first available candidate in rank order.
        let Some(greedy_pos) = ranking.position(|r| slots.available(r), 0) else { break };
        let greedy = ranking.at(greedy_pos);
        let explore = rules.exploration > 0.0 && rng.unit() < rules.exploration;
        let (r, explored, propensity) = if rules.exploration == 0.0 {
            (greedy, false, 1.0)
        } else {
            let n = slots.count_available(&ranking);
            let share = rules.exploration / n as f64;
            if explore {
                // Uniform over the available candidates: the one whose id
                // hashes lowest under this draw's key. One pass, no sort, and
                // independent of the order of the input.
                let key = rng.next();
                let pick = ranking.min_by_key(|r| slots.available(r), |r| (mix(key ^ r.ad_id as u64), r.ad_id));
                let pick = pick.expect("an available candidate exists");
                let same = pick.index == greedy.index;
                (pick, !same, if same { 1.0 - rules.exploration + share } else { share })
            } else {
                (greedy, false, 1.0 - rules.exploration + share)
            }
        };
        let c = &candidates[r.index as usize];
        let qf = qf_of(c.quality, alpha);
        let reserve = reserve_of(c, rules);
        let price = if explored {
            least_bid(c, qf, reserve, &rules.objective, None)
        } else {
            // Without this winner the slot would go to the next available
            // candidate in rank order (under the caps as they stood before it).
            let next = ranking.position(|n| slots.available(n), greedy_pos + 1).map(|p| ranking.at(p));
            least_bid(c, qf, reserve, &rules.objective, next.as_ref())
        };
        winners.push(Winner {
            candidate: *c,
            slot: slot as u32,
            ecpm_micros: ecpm_at(c, c.bid_micros, qf).round() as i64,
            price_micros: price,
            propensity: propensity as f32,
            explored,
        });
        slots.take(r.index, &ranking);
    }
    Ok(Outcome { winners, eligible })
}

/// The effective eCPM floor of `c`: its own or the request's, the higher.
fn reserve_of(c: &Candidate, rules: &Rules) -> f64 {
    c.reserve_ecpm_micros.max(rules.reserve_ecpm_micros) as f64
}

/// Which candidates may still take a slot: not already placed, and not of
/// an advertiser at its cap.
struct Slots<'a> {
    candidates: &'a [Candidate],
    cap: usize,
    /// Indices already placed (at most MAX_SLOTS: a linear scan beats a set).
    taken: Vec<u32>,
    /// (advertiser, slots held): likewise small.
    held: Vec<(i64, usize)>,
    /// Eligible candidates of advertisers at their cap, not counting taken ones.
    blocked: usize,
}

impl<'a> Slots<'a> {
    fn new(candidates: &'a [Candidate], rules: &Rules) -> Self {
        Self {
            candidates,
            cap: if rules.max_per_advertiser == 0 { usize::MAX } else { rules.max_per_advertiser },
            taken: Vec::with_capacity(rules.slots),
            held: Vec::with_capacity(rules.slots),
            blocked: 0,
        }
    }

    fn available(&self, r: &Ranked) -> bool {
        if self.taken.contains(&r.index) {
            return false;
        }
        let adv = self.candidates[r.index as usize].advertiser_id;
        self.held.iter().find(|(a, _)| *a == adv).is_none_or(|(_, n)| *n < self.cap)
    }

    fn count_available(&self, ranking: &Ranking) -> usize {
        ranking.len() - self.taken.len() - self.blocked
    }

    /// Places candidate `index`; when that caps its advertiser, counts (once)
    /// the advertiser's other eligible candidates as blocked.
    fn take(&mut self, index: u32, ranking: &Ranking) {
        self.taken.push(index);
        let adv = self.candidates[index as usize].advertiser_id;
        let pos = match self.held.iter().position(|(a, _)| *a == adv) {
            Some(p) => p,
            None => {
                self.held.push((adv, 0));
                self.held.len() - 1
            }
        };
        self.held[pos].1 += 1;
        if self.held[pos].1 == self.cap {
            let of_adv = ranking.count(|r| self.candidates[r.index as usize].advertiser_id == adv);
            self.blocked += of_adv - self.cap;
        }
    }
}

/// `quality^alpha` (exact, and free, in the common cases), specialised once
/// per auction on alpha: chosen outside the per-candidate loop so the compiler cannot turn it into a `pow` per
/// candidate (it speculates the pure call when the branch sits inside).
fn quality_factor_fn(alpha: f64) -> fn(f32, f64) -> f64 {
    if alpha == 0.0 {
        |_, _| 1.0
    } else if alpha == 1.0 {
        |q, _| f64::from(q)
    } else {
        |q, alpha| if q == 1.0 { 1.0 } else { f64::from(q).powf(alpha) }
    }
}

/// eCPM in micro units of `c` bidding `bid`. Monotone in `bid`: the ranking
/// and the price search both go through here, which is what makes the price
/// keep the slot exactly.
fn ecpm_at(c: &Candidate, bid: i64, qf: f64) -> f64 {
    match c.bid_type {
        BidType::Cpc => bid as f64 * f64::from(c.pctr) * 1000.0 * qf,
        BidType::Cpm => bid as f64 * qf,
    }
}

/// Rank score for `ecpm` (micro units); non-decreasing in `ecpm`.
fn score(objective: &Objective, c: &Candidate, ecpm: f64) -> f64 {
    match *objective {
        Objective::Ecpm => ecpm,
        Objective::Weighted { pctr, pcvr, ecpm: w } => {
            pctr * f64::from(c.pctr) + pcvr * f64::from(c.pcvr) + w * (ecpm / 1e6)
        }
    }
}

/// Rank order: higher score first, then lower ad id.
fn ahead(score_a: f64, id_a: i64, score_b: f64, id_b: i64) -> bool {
    match score_a.total_cmp(&score_b) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => id_a < id_b,
    }
}

/// The least bid in `[0, c.bid_micros]` whose eCPM clears `reserve` and
/// whose score stays ahead of `next`. Bisection over a monotone predicate
/// that holds at the bid itself (the candidate cleared its reserve and
/// ranked ahead of `next`), so the answer exists and is at most the bid.
fn least_bid(c: &Candidate, qf: f64, reserve: f64, objective: &Objective, next: Option<&Ranked>) -> i64 {
    let keeps = |bid: i64| {
        let ecpm = ecpm_at(c, bid, qf);
        ecpm >= reserve && next.is_none_or(|n| ahead(score(objective, c, ecpm), c.ad_id, n.score, n.ad_id))
    };
    debug_assert!(keeps(c.bid_micros), "a winner keeps its slot at its own bid");
    if keeps(0) {
        return 0;
    }
    // Invariant: !keeps(lo), keeps(hi).
    let (mut lo, mut hi) = (0i64, c.bid_micros);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if keeps(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// One eligible candidate, as ranked (small: the selection moves these).
#[derive(Debug, Clone, Copy)]
struct Ranked {
    score: f64,
    ad_id: i64,
    index: u32,
}

fn by_rank(a: &Ranked, b: &Ranked) -> Ordering {
    b.score.total_cmp(&a.score).then(a.ad_id.cmp(&b.ad_id))
}

/// Eligible candidates, ordered lazily: one pass picks the top few (as many
/// as the slots and their pricing usually look at) into a sorted prefix; the
/// rest stays unsorted until the caps or exploration ask for more.
struct Ranking {
    /// Sorted best-first.
    prefix: Vec<Ranked>,
    /// Everything else, unordered; every item ranks behind the prefix.
    rest: Vec<Ranked>,
}

impl Ranking {
    fn new(mut items: Vec<Ranked>, slots: usize) -> Self {
        // slots + 1 prices the last slot; the margin absorbs a few capped or
        // explored-away candidates without touching the rest.
        let k = (slots + 4).min(items.len());
        let mut prefix: Vec<Ranked> = Vec::with_capacity(k + 8);
        // One pass keeping the best k in order: most items fail the first
        // comparison against the current k-th, so this is about n compares.
        let mut top: Vec<(Ranked, usize)> = Vec::with_capacity(k + 1);
        for (pos, item) in items.iter().enumerate() {
            if top.len() == k && k > 0 && by_rank(item, &top[k - 1].0) != Ordering::Less {
                continue;
            }
            let at = top.partition_point(|(t, _)| by_rank(t, item) == Ordering::Less);
            top.insert(at, (*item, pos));
            top.truncate(k);
        }
        prefix.extend(top.iter().map(|(r, _)| *r));
        // Remove the picked items from the rest, highest position first so
        // swap_remove does not move a position still to be removed.
        let mut picked: Vec<usize> = top.iter().map(|(_, p)| *p).collect();
        picked.sort_unstable_by(|a, b| b.cmp(a));
        for p in picked {
            items.swap_remove(p);
        }
        Self { prefix, rest: items }
    }

    fn len(&self) -> usize {
        self.prefix.len() + self.rest.len()
    }

    /// Moves the next best `n` (at least) from the rest into the prefix.
    fn extend(&mut self, n: usize) {
        let n = n.max(self.prefix.len()).max(16).min(self.rest.len());
        if n == 0 {
            return;
        }
        if n < self.rest.len() {
            self.rest.select_nth_unstable_by(n - 1, by_rank);
        }
        let mut chunk: Vec<Ranked> = self.rest.drain(..n).collect();
        chunk.sort_unstable_by(by_rank);
        self.prefix.extend(chunk);
    }

    /// The item at rank position `pos` (which exists).
    fn at(&self, pos: usize) -> Ranked {
        self.prefix[pos]
    }

    /// Position (rank) of the first item at or after `from` that matches.
    fn position(&mut self, matches: impl Fn(&Ranked) -> bool, from: usize) -> Option<usize> {
        let mut pos = from;
        loop {
            if pos >= self.prefix.len() {
                if self.rest.is_empty() {
                    return None;
                }
                self.extend(pos + 1 - self.prefix.len());
            }
            if matches(&self.prefix[pos]) {
                return Some(pos);
            }
            pos += 1;
        }
    }

    /// How many items match (order does not matter).
    fn count(&self, matches: impl Fn(&Ranked) -> bool) -> usize {
        self.prefix.iter().chain(&self.rest).filter(|r| matches(r)).count()
    }

    /// The matching item with the least `key` (order does not matter).
    fn min_by_key<K: Ord>(&self, matches: impl Fn(&Ranked) -> bool, key: impl Fn(&Ranked) -> K) -> Option<Ranked> {
        self.prefix.iter().chain(&self.rest).filter(|r| matches(r)).min_by_key(|r| key(r)).copied()
    }
}

/// SplitMix64: a tiny, well-mixed, seedable generator; exploration needs
/// reproducible draws, not cryptographic ones.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// SplitMix64's finaliser: a bijective mix of 64 bits (exploration draws
/// here, pacing draws in `pacing::draw`).
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` deterministic candidates with spread bids (0.1-1.1 per click) and
/// pCTRs (0.001-0.097), ten ads per campaign and three campaigns per
/// advertiser: the input of the auction's tests and of its benchmarks,
/// in-process (criterion) and over gRPC (`adserve-bench`).
pub fn sample_candidates(n: usize) -> Vec<Candidate> {
    (0..n as i64)
        .map(|i| Candidate {
            advertiser_id: i / 30,
            ..Candidate::cpc(i, i / 10, 100_000 + (i * 7919 % 1000) * 1000, 0.001 + (i % 97) as f32 / 1000.0)
        })
        .collect()
}

fn bad(index: usize, field: &'static str, reason: String) -> AuctionError {
    AuctionError::Candidate { index, field, reason }
}

fn rule(field: &'static str, reason: String) -> AuctionError {
    AuctionError::Rule { field, reason }
}

impl Rules {
    /// Checks the rules alone (what `run_auction` checks before the candidates).
    pub fn check(&self) -> Result<(), AuctionError> {
        check_rules(self)
    }
}

fn validate(candidates: &[Candidate], rules: &Rules) -> Result<(), AuctionError> {
    check_rules(rules)?;
    check_candidates(candidates)
}

fn check_rules(rules: &Rules) -> Result<(), AuctionError> {
    if rules.slots == 0 || rules.slots > MAX_SLOTS {
        return Err(rule("slots", format!("must be in 1..={MAX_SLOTS}, got {}", rules.slots)));
    }
    if rules.reserve_ecpm_micros < 0 {
        return Err(rule("reserve_ecpm_micros", format!("must be >= 0, got {}", rules.reserve_ecpm_micros)));
    }
    if !(0.0..=MAX_QUALITY_EXPONENT).contains(&rules.quality_exponent) {
        return Err(rule(
            "quality_exponent",
            format!("must be in [0, {MAX_QUALITY_EXPONENT}], got {}", rules.quality_exponent),
        ));
    }
    if !(0.0..1.0).contains(&rules.exploration) {
        return Err(rule("exploration_share", format!("must be in [0, 1), got {}", rules.exploration)));
    }
    if let Objective::Weighted { pctr, pcvr, ecpm } = rules.objective {
        for (field, w) in [("objective.pctr_weight", pctr), ("objective.pcvr_weight", pcvr)] {
            if !w.is_finite() || w < 0.0 {
                return Err(rule(field, format!("must be finite and >= 0, got {w}")));
            }
        }
        if !ecpm.is_finite() || ecpm <= 0.0 {
            return Err(rule("objective.ecpm_weight", format!("must be finite and > 0, got {ecpm}")));
        }
    }
    Ok(())
}

fn check_candidates(candidates: &[Candidate]) -> Result<(), AuctionError> {
    if candidates.is_empty() {
        return Err(AuctionError::NoCandidates);
    }
    if candidates.len() > MAX_CANDIDATES {
        return Err(AuctionError::TooManyCandidates(candidates.len()));
    }
    for (index, c) in candidates.iter().enumerate() {
        if c.bid_micros <= 0 {
            let field = match c.bid_type {
                BidType::Cpc => "bid_cpc_micros",
                BidType::Cpm => "bid_cpm_micros",
            };
            return Err(bad(index, field, format!("must be > 0, got {}", c.bid_micros)));
        }
        if !is_valid_pctr(c.pctr) {
            return Err(bad(index, "pctr", format!("must be in [{MIN_PCTR:e}, 1], got {}", c.pctr)));
        }
        if !(c.pcvr.is_finite() && (0.0..=1.0).contains(&c.pcvr)) {
            return Err(bad(index, "pcvr", format!("must be in [0, 1], got {}", c.pcvr)));
        }
        if !(c.quality.is_finite() && c.quality > 0.0 && c.quality <= MAX_QUALITY) {
            return Err(bad(index, "quality", format!("must be in (0, {MAX_QUALITY}], got {}", c.quality)));
        }
        if c.reserve_ecpm_micros < 0 {
            return Err(bad(index, "reserve_ecpm_micros", format!("must be >= 0, got {}", c.reserve_ecpm_micros)));
        }
    }
    // Repeated ids: an open-addressing set of candidate positions, keyed by
    // a multiplicative hash of the id (cheaper than sorting or SipHashing 1000).
    let bits = (candidates.len() * 2).next_power_of_two().trailing_zeros().max(4);
    let mut table = vec![0u32; 1 << bits];
    let mask = (1usize << bits) - 1;
    for (index, c) in candidates.iter().enumerate() {
        let mut slot = ((c.ad_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize;
        loop {
            match table[slot] {
                0 => {
                    table[slot] = index as u32 + 1;
                    break;
                }
                seen if candidates[seen as usize - 1].ad_id == c.ad_id => {
                    return Err(AuctionError::RepeatedAd { index, ad_id: c.ad_id });
                }
                _ => slot = (slot + 1) & mask,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
