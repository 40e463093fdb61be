//! Generalized second-price auction on eCPM.
//!
//! eCPM is expected revenue per thousand impressions: `bid_cpc x pCTR x 1000`.
//! Candidates below the reserve eCPM are dropped; the rest are ranked by eCPM
//! (ties broken by ad id, so results are deterministic). The winner of slot k
//! pays per click the lowest bid that would still beat the runner-up below it
//! (or the reserve): `max(ecpm[k+1], reserve) / (pCTR[k] x 1000)`, rounded up
//! to a whole micro unit and never above its own bid.

use std::cmp::Ordering;

use crate::{MAX_CANDIDATES, MAX_SLOTS, MIN_PCTR, is_valid_pctr};

/// One ad competing in the auction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Ad id (unique within an auction).
    pub ad_id: i64,
    /// Campaign of the ad.
    pub campaign_id: i64,
    /// Cost-per-click bid, micro currency units.
    pub bid_cpc_micros: i64,
    /// Predicted click-through rate in `[MIN_PCTR, 1]`.
    pub pctr: f32,
}

impl Candidate {
    /// Expected revenue per mille, micro units.
    pub fn ecpm(&self) -> f64 {
        self.bid_cpc_micros as f64 * f64::from(self.pctr) * 1000.0
    }
}

/// A priced winner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Winner {
    /// The winning candidate.
    pub candidate: Candidate,
    /// Slot, 0 = best.
    pub slot: u32,
    /// eCPM, micro units (rounded).
    pub ecpm_micros: i64,
    /// Second price per click, micro units.
    pub price_cpc_micros: i64,
}

/// The result of an auction.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// Winners in slot order.
    pub winners: Vec<Winner>,
    /// Candidates at or above the reserve.
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
    /// A candidate's bid is not positive.
    #[error("candidates[{index}].bid_cpc_micros: must be > 0, got {bid}")]
    Bid {
        /// Position in the request.
        index: usize,
        /// The bid sent.
        bid: i64,
    },
    /// A candidate's pCTR is not finite or outside `[MIN_PCTR, 1]`.
    #[error("candidates[{index}].pctr: must be in [{MIN_PCTR:e}, 1], got {pctr}")]
    Pctr {
        /// Position in the request.
        index: usize,
        /// The pCTR sent.
        pctr: f32,
    },
    /// Two candidates share an ad id.
    #[error("candidates[{index}].ad_id: {ad_id} is repeated")]
    RepeatedAd {
        /// Position of the second occurrence.
        index: usize,
        /// The repeated id.
        ad_id: i64,
    },
    /// Slot count out of range.
    #[error("slots: must be in 1..={MAX_SLOTS}, got {0}")]
    Slots(usize),
    /// Reserve negative or not finite.
    #[error("reserve_ecpm_micros: must be >= 0, got {0}")]
    Reserve(i64),
}

/// Runs the auction. Pure and allocation-light: this is on every request's path.
pub fn run_auction(candidates: &[Candidate], slots: usize, reserve_ecpm_micros: i64) -> Result<Outcome, AuctionError> {
    validate(candidates, slots, reserve_ecpm_micros)?;
    let reserve = reserve_ecpm_micros as f64;
    let mut ranked: Vec<(f64, &Candidate)> =
        candidates.iter().map(|c| (c.ecpm(), c)).filter(|(ecpm, _)| *ecpm >= reserve).collect();
    let eligible = ranked.len();
    // Only the top slots+1 need ordering: the extra one prices the last slot.
    let keep = (slots + 1).min(ranked.len());
    if keep > 0 && keep < ranked.len() {
        ranked.select_nth_unstable_by(keep - 1, by_rank);
        ranked.truncate(keep);
    }
    ranked.sort_unstable_by(by_rank);
    let winners = (0..slots.min(ranked.len()))
        .map(|k| {
            let (ecpm, c) = ranked[k];
            let next = ranked.get(k + 1).map_or(reserve, |(e, _)| e.max(reserve));
            // Round up (the price must keep the slot), but do not let f32 noise
            // in pCTR (0.02 is 0.0199999995...) add a micro unit.
            let exact = next / (f64::from(c.pctr) * 1000.0);
            let price = if (exact - exact.round()).abs() <= exact * 1e-7 { exact.round() } else { exact.ceil() } as i64;
            Winner {
                candidate: *c,
                slot: k as u32,
                ecpm_micros: ecpm.round() as i64,
                price_cpc_micros: price.clamp(0, c.bid_cpc_micros),
            }
        })
        .collect();
    Ok(Outcome { winners, eligible })
}

/// `n` deterministic candidates with spread bids (0.1-1.1 per click) and
/// pCTRs (0.001-0.097): the input of the auction's tests and of its
/// benchmarks, in-process (criterion) and over gRPC (`adserve-bench`).
pub fn sample_candidates(n: usize) -> Vec<Candidate> {
    (0..n as i64)
        .map(|i| Candidate {
            ad_id: i,
            campaign_id: i / 10,
            bid_cpc_micros: 100_000 + (i * 7919 % 1000) * 1000,
            pctr: 0.001 + (i % 97) as f32 / 1000.0,
        })
        .collect()
}

fn by_rank(a: &(f64, &Candidate), b: &(f64, &Candidate)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.ad_id.cmp(&b.1.ad_id))
}

fn validate(candidates: &[Candidate], slots: usize, reserve: i64) -> Result<(), AuctionError> {
    if candidates.is_empty() {
        return Err(AuctionError::NoCandidates);
    }
    if candidates.len() > MAX_CANDIDATES {
        return Err(AuctionError::TooManyCandidates(candidates.len()));
    }
    if slots == 0 || slots > MAX_SLOTS {
        return Err(AuctionError::Slots(slots));
    }
    if reserve < 0 {
        return Err(AuctionError::Reserve(reserve));
    }
    let mut seen = std::collections::HashSet::with_capacity(candidates.len());
    for (index, c) in candidates.iter().enumerate() {
        if c.bid_cpc_micros <= 0 {
            return Err(AuctionError::Bid { index, bid: c.bid_cpc_micros });
        }
        if !is_valid_pctr(c.pctr) {
            return Err(AuctionError::Pctr { index, pctr: c.pctr });
        }
        if !seen.insert(c.ad_id) {
            return Err(AuctionError::RepeatedAd { index, ad_id: c.ad_id });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(ad_id: i64, bid: i64, pctr: f32) -> Candidate {
        Candidate { ad_id, campaign_id: ad_id * 10, bid_cpc_micros: bid, pctr }
    }

    #[test]
    fn ranks_by_ecpm_not_by_bid() {
        // Ad 1 bids more but is clicked far less: ad 2 has the higher eCPM.
        let out = run_auction(&[c(1, 2_000_000, 0.01), c(2, 1_000_000, 0.05)], 1, 0).unwrap();
        assert_eq!(out.winners[0].candidate.ad_id, 2);
        assert!((out.winners[0].ecpm_micros - 50_000_000).abs() <= 1);
    }

    #[test]
    fn winner_pays_the_second_price_per_click() {
        // eCPMs: ad 2 = 50e6, ad 1 = 20e6. Ad 2 pays 20e6 / (0.05 * 1000) = 400_000 per click.
        let out = run_auction(&[c(1, 2_000_000, 0.01), c(2, 1_000_000, 0.05)], 1, 0).unwrap();
        assert_eq!(out.winners[0].price_cpc_micros, 400_000);
        assert!(out.winners[0].price_cpc_micros <= out.winners[0].candidate.bid_cpc_micros);
    }

    #[test]
    fn sole_bidder_pays_the_reserve() {
        let out = run_auction(&[c(1, 1_000_000, 0.02)], 1, 5_000_000).unwrap();
        // 5e6 / (0.02 * 1000) = 250_000
        assert_eq!(out.winners[0].price_cpc_micros, 250_000);
    }

    #[test]
    fn candidates_below_reserve_do_not_win() {
        let out = run_auction(&[c(1, 1_000, 0.01), c(2, 1_000_000, 0.02)], 2, 1_000_000).unwrap();
        assert_eq!(out.eligible, 1);
        assert_eq!(out.winners.len(), 1);
        assert_eq!(out.winners[0].candidate.ad_id, 2);
        let none = run_auction(&[c(1, 1_000, 0.01)], 1, 1_000_000).unwrap();
        assert!(none.winners.is_empty());
    }

    #[test]
    fn multi_slot_prices_each_slot_against_the_next() {
        let cands = [c(1, 1_000_000, 0.04), c(2, 1_000_000, 0.03), c(3, 1_000_000, 0.02), c(4, 1_000_000, 0.01)];
        let out = run_auction(&cands, 3, 0).unwrap();
        let ids: Vec<i64> = out.winners.iter().map(|w| w.candidate.ad_id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        let prices: Vec<i64> = out.winners.iter().map(|w| w.price_cpc_micros).collect();
        assert_eq!(prices, vec![750_000, 666_667, 500_000]);
        assert_eq!(out.winners.iter().map(|w| w.slot).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn ties_are_broken_by_ad_id() {
        let out = run_auction(&[c(9, 1_000_000, 0.02), c(3, 1_000_000, 0.02)], 1, 0).unwrap();
        assert_eq!(out.winners[0].candidate.ad_id, 3);
        assert_eq!(out.winners[0].price_cpc_micros, 1_000_000);
    }

    #[test]
    fn large_auction_matches_full_sort() {
        let cands = sample_candidates(1000);
        let out = run_auction(&cands, 5, 0).unwrap();
        let mut sorted: Vec<&Candidate> = cands.iter().collect();
        sorted.sort_by(|a, b| b.ecpm().total_cmp(&a.ecpm()).then(a.ad_id.cmp(&b.ad_id)));
        let want: Vec<i64> = sorted.iter().take(5).map(|c| c.ad_id).collect();
        assert_eq!(out.winners.iter().map(|w| w.candidate.ad_id).collect::<Vec<_>>(), want);
        assert_eq!(out.eligible, 1000);
    }

    #[test]
    fn bad_input_names_the_field() {
        assert_eq!(run_auction(&[], 1, 0).unwrap_err(), AuctionError::NoCandidates);
        assert!(AuctionError::NoCandidates.to_string().starts_with("candidates"));
        let many = sample_candidates(MAX_CANDIDATES + 1);
        assert_eq!(run_auction(&many, 1, 0).unwrap_err(), AuctionError::TooManyCandidates(MAX_CANDIDATES + 1));
        assert_eq!(run_auction(&[c(1, 1, 0.1)], 0, 0).unwrap_err(), AuctionError::Slots(0));
        assert_eq!(run_auction(&[c(1, 1, 0.1)], 11, 0).unwrap_err(), AuctionError::Slots(11));
        assert_eq!(run_auction(&[c(1, 1, 0.1)], 1, -1).unwrap_err(), AuctionError::Reserve(-1));
        let e = run_auction(&[c(1, 0, 0.1)], 1, 0).unwrap_err();
        assert_eq!(e, AuctionError::Bid { index: 0, bid: 0 });
        assert!(e.to_string().starts_with("candidates[0].bid_cpc_micros"), "{e}");
        let e = run_auction(&[c(1, 1, f32::NAN)], 1, 0).unwrap_err().to_string();
        assert!(e.starts_with("candidates[0].pctr"), "{e}");
        let e = run_auction(&[c(1, 1, 0.1), c(2, 1, MIN_PCTR / 2.0)], 1, 0).unwrap_err();
        assert!(matches!(e, AuctionError::Pctr { index: 1, .. }), "{e}");
        let e = run_auction(&[c(1, 1, 0.1), c(1, 2, 0.1)], 1, 0).unwrap_err();
        assert_eq!(e, AuctionError::RepeatedAd { index: 1, ad_id: 1 });
    }
}
