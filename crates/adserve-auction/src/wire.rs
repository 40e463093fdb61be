//! The one conversion between the auction's types and their wire form.

use adserve_proto::v1::{AuctionCandidate, AuctionWinner, RunAuctionRequest};

use crate::{AuctionError, BidType, Candidate, Objective, Rules, Winner};

/// A candidate from its wire form: exactly one of `bid_cpc_micros` and
/// `bid_cpm_micros` must be set, and an unset quality is neutral.
pub fn candidate_from_proto(index: usize, c: &AuctionCandidate) -> Result<Candidate, AuctionError> {
    let (bid_type, bid_micros) = match (c.bid_cpc_micros, c.bid_cpm_micros) {
        (cpc, 0) => (BidType::Cpc, cpc),
        (0, cpm) => (BidType::Cpm, cpm),
        (cpc, cpm) => {
            return Err(AuctionError::Candidate {
                index,
                field: "bid_cpm_micros",
                reason: format!("a candidate bids CPC or CPM, not both (bid_cpc_micros {cpc}, bid_cpm_micros {cpm})"),
            });
        }
    };
    Ok(Candidate {
        ad_id: c.ad_id,
        campaign_id: c.campaign_id,
        advertiser_id: c.advertiser_id,
        bid_type,
        bid_micros,
        pctr: c.pctr,
        pcvr: c.pcvr,
        quality: if c.quality == 0.0 { 1.0 } else { c.quality },
        reserve_ecpm_micros: c.reserve_ecpm_micros,
    })
}

/// Every candidate of a request.
pub fn candidates_from_proto(candidates: &[AuctionCandidate]) -> Result<Vec<Candidate>, AuctionError> {
    candidates.iter().enumerate().map(|(i, c)| candidate_from_proto(i, c)).collect()
}

/// A candidate in its wire form.
pub fn candidate_to_proto(c: &Candidate) -> AuctionCandidate {
    let (cpc, cpm) = split(c.bid_type, c.bid_micros);
    AuctionCandidate {
        ad_id: c.ad_id,
        campaign_id: c.campaign_id,
        bid_cpc_micros: cpc,
        pctr: c.pctr,
        advertiser_id: c.advertiser_id,
        bid_cpm_micros: cpm,
        pcvr: c.pcvr,
        quality: c.quality,
        reserve_ecpm_micros: c.reserve_ecpm_micros,
    }
}

/// The rules of a request.
pub fn rules_from_proto(req: &RunAuctionRequest) -> Rules {
    Rules {
        slots: req.slots as usize,
        reserve_ecpm_micros: req.reserve_ecpm_micros,
        quality_exponent: req.quality_exponent,
        max_per_advertiser: req.max_per_advertiser as usize,
        objective: match &req.objective {
            None => Objective::Ecpm,
            Some(o) => Objective::Weighted { pctr: o.pctr_weight, pcvr: o.pcvr_weight, ecpm: o.ecpm_weight },
        },
        exploration: req.exploration_share,
        seed: req.seed,
    }
}

/// A request carrying `candidates` under `rules`.
pub fn request_to_proto(candidates: Vec<AuctionCandidate>, rules: &Rules) -> RunAuctionRequest {
    RunAuctionRequest {
        candidates,
        slots: rules.slots as u32,
        reserve_ecpm_micros: rules.reserve_ecpm_micros,
        quality_exponent: rules.quality_exponent,
        max_per_advertiser: rules.max_per_advertiser as u32,
        objective: match rules.objective {
            Objective::Ecpm => None,
            Objective::Weighted { pctr, pcvr, ecpm } => {
                Some(adserve_proto::v1::AuctionObjective { pctr_weight: pctr, pcvr_weight: pcvr, ecpm_weight: ecpm })
            }
        },
        exploration_share: rules.exploration,
        seed: rules.seed,
    }
}

/// A winner in its wire form.
pub fn winner_to_proto(w: &Winner) -> AuctionWinner {
    let c = &w.candidate;
    let (bid_cpc, bid_cpm) = split(c.bid_type, c.bid_micros);
    let (price_cpc, price_cpm) = split(c.bid_type, w.price_micros);
    AuctionWinner {
        ad_id: c.ad_id,
        campaign_id: c.campaign_id,
        slot: w.slot,
        pctr: c.pctr,
        bid_cpc_micros: bid_cpc,
        ecpm_micros: w.ecpm_micros,
        price_cpc_micros: price_cpc,
        advertiser_id: c.advertiser_id,
        bid_cpm_micros: bid_cpm,
        price_cpm_micros: price_cpm,
        propensity: w.propensity,
        explored: w.explored,
    }
}

/// `(cpc, cpm)` fields for an amount in a bid's unit.
fn split(bid_type: BidType, micros: i64) -> (i64, i64) {
    match bid_type {
        BidType::Cpc => (micros, 0),
        BidType::Cpm => (0, micros),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{run_auction, sample_candidates};

    #[test]
    fn a_request_round_trips_and_both_sides_agree() {
        let mut cands = sample_candidates(20);
        cands[3].bid_type = BidType::Cpm;
        cands[3].bid_micros = 9_000_000;
        cands[5].quality = 1.5;
        let rules = Rules {
            exploration: 0.3,
            seed: 42,
            max_per_advertiser: 1,
            objective: Objective::Weighted { pctr: 1.0, pcvr: 0.0, ecpm: 2.0 },
            ..Rules::new(3, 5_000)
        };
        let req = request_to_proto(cands.iter().map(candidate_to_proto).collect(), &rules);
        assert_eq!(rules_from_proto(&req), rules);
        assert_eq!(candidates_from_proto(&req.candidates).unwrap(), cands);
        let out = run_auction(&cands, &rules).unwrap();
        let w = winner_to_proto(&out.winners[0]);
        assert_eq!(w.ad_id, out.winners[0].candidate.ad_id);
    }

    #[test]
    fn a_candidate_bids_one_way_and_unset_quality_is_neutral() {
        let both = AuctionCandidate { bid_cpc_micros: 1, bid_cpm_micros: 1, pctr: 0.1, ..Default::default() };
        let e = candidate_from_proto(4, &both).unwrap_err().to_string();
        assert!(e.starts_with("candidates[4].bid_cpm_micros"), "{e}");
        let cpm = AuctionCandidate { bid_cpm_micros: 5, pctr: 0.1, ..Default::default() };
        let c = candidate_from_proto(0, &cpm).unwrap();
        assert_eq!((c.bid_type, c.bid_micros, c.quality), (BidType::Cpm, 5, 1.0));
        // Neither set: a CPC bid of 0, which the auction refuses by name.
        let none = candidate_from_proto(0, &AuctionCandidate::default()).unwrap();
        assert_eq!((none.bid_type, none.bid_micros), (BidType::Cpc, 0));
    }
}
