//! gRPC face of the auction.

use std::time::Instant;

use adserve_proto::v1::{
    AuctionCandidate, AuctionWinner, RunAuctionRequest, RunAuctionResponse,
    auction_service_server::{AuctionService, AuctionServiceServer},
};
use tonic::{Request, Response, Status};

use crate::{Candidate, Winner, auction};

/// Serves `adserve.v1.AuctionService`.
#[derive(Debug, Clone)]
pub struct AuctionGrpc {
    /// Reserve used when a request sends 0.
    default_reserve_ecpm_micros: i64,
}

impl AuctionGrpc {
    /// A service with the given default reserve.
    pub fn new(default_reserve_ecpm_micros: i64) -> Self {
        Self { default_reserve_ecpm_micros }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> AuctionServiceServer<Self> {
        AuctionServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl AuctionService for AuctionGrpc {
    async fn run_auction(&self, request: Request<RunAuctionRequest>) -> Result<Response<RunAuctionResponse>, Status> {
        let start = Instant::now();
        let req = request.into_inner();
        let candidates: Vec<Candidate> = req.candidates.iter().map(candidate_from_proto).collect();
        let reserve =
            if req.reserve_ecpm_micros == 0 { self.default_reserve_ecpm_micros } else { req.reserve_ecpm_micros };
        let outcome = auction::run_auction(&candidates, req.slots as usize, reserve).map_err(|e| {
            metrics::counter!("adserve_auction_rejected_total").increment(1);
            Status::invalid_argument(e.to_string())
        })?;
        metrics::histogram!("adserve_auction_seconds").record(start.elapsed().as_secs_f64());
        metrics::histogram!("adserve_auction_candidates").record(candidates.len() as f64);
        Ok(Response::new(RunAuctionResponse {
            eligible: outcome.eligible as u32,
            winners: outcome.winners.iter().map(winner_to_proto).collect(),
        }))
    }
}

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
