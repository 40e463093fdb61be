//! gRPC face of the auction.

use std::time::Instant;

use adserve_auction::wire::{candidates_from_proto, rules_from_proto, winner_to_proto};
use adserve_proto::v1::{
    RunAuctionRequest, RunAuctionResponse,
    auction_service_server::{AuctionService, AuctionServiceServer},
};
use tonic::{Request, Response, Status};

/// Serves `adserve.v1.AuctionService`. Stateless: the rules, the reserve
/// included, arrive with each request (a reserve of 0 is a reserve of 0), so
/// this service and the gateway's in-process fallback price alike.
#[derive(Debug, Clone, Default)]
pub struct AuctionGrpc;

impl AuctionGrpc {
    /// The service.
    pub fn new() -> Self {
        Self
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
        let rejected = |e: adserve_auction::AuctionError| {
            metrics::counter!("adserve_auction_rejected_total").increment(1);
            Status::invalid_argument(e.to_string())
        };
        let candidates = candidates_from_proto(&req.candidates).map_err(rejected)?;
        let outcome = adserve_auction::run_auction(&candidates, &rules_from_proto(&req)).map_err(rejected)?;
        metrics::histogram!("adserve_auction_seconds").record(start.elapsed().as_secs_f64());
        metrics::histogram!("adserve_auction_candidates").record(candidates.len() as f64);
        let explored = outcome.winners.iter().filter(|w| w.explored).count();
        metrics::counter!("adserve_auction_slots_total", "filled_by" => "rank")
            .increment((outcome.winners.len() - explored) as u64);
        metrics::counter!("adserve_auction_slots_total", "filled_by" => "exploration").increment(explored as u64);
        Ok(Response::new(RunAuctionResponse {
            eligible: outcome.eligible as u32,
            winners: outcome.winners.iter().map(winner_to_proto).collect(),
        }))
    }
}
