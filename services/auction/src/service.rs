//! gRPC face of the auction.

use std::time::Instant;

use adserve_auction::{
    Candidate,
    wire::{candidate_from_proto, winner_to_proto},
};
use adserve_proto::v1::{
    RunAuctionRequest, RunAuctionResponse,
    auction_service_server::{AuctionService, AuctionServiceServer},
};
use tonic::{Request, Response, Status};

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
        let outcome = adserve_auction::run_auction(&candidates, req.slots as usize, reserve).map_err(|e| {
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
