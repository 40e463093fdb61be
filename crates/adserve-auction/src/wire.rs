//! The one conversion between the auction's types and their wire form.

use adserve_proto::v1::{AuctionCandidate, AuctionWinner};

use crate::{Candidate, Winner};

/// A candidate from its wire form.
pub fn candidate_from_proto(c: &AuctionCandidate) -> Candidate {
    Candidate { ad_id: c.ad_id, campaign_id: c.campaign_id, bid_cpc_micros: c.bid_cpc_micros, pctr: c.pctr }
}

/// A winner in its wire form.
pub fn winner_to_proto(w: &Winner) -> AuctionWinner {
    AuctionWinner {
        ad_id: w.candidate.ad_id,
        campaign_id: w.candidate.campaign_id,
        slot: w.slot,
        pctr: w.candidate.pctr,
        bid_cpc_micros: w.candidate.bid_cpc_micros,
        ecpm_micros: w.ecpm_micros,
        price_cpc_micros: w.price_cpc_micros,
    }
}
