//! Auction: the in-process figures come from criterion (`cargo bench -p
//! adserve-auction`, run by `make bench` just before this driver); this part
//! reads them and measures the same auctions over gRPC next to them.

use std::time::Duration;

use adserve_proto::v1::{AuctionCandidate, auction_service_client::AuctionServiceClient};
use anyhow::Context;

use super::{
    Settings, criterion,
    load::{self, Outcome},
    report::{Comparison, Role},
};

/// Candidates per auction.
pub const SIZES: [usize; 3] = [1, 100, 1000];
/// Slots per auction (as in the criterion bench).
pub const SLOTS: u32 = 3;

/// The criterion bench's candidates, as the gateway sends them.
fn candidates(n: usize) -> Vec<AuctionCandidate> {
    adserve_auction::sample_candidates(n).into_iter().map(|c| adserve_auction::wire::candidate_to_proto(&c)).collect()
}

/// Runs the auction part.
pub async fn run(s: &Settings) -> anyhow::Result<Vec<Comparison>> {
    load::ensure_loopback(&s.stack.auction)?;
    let channel = adserve_core::net::grpc_endpoint(s.stack.auction.clone())?.connect().await?;
    let client = AuctionServiceClient::new(channel);
    let mut out = Vec::new();
    for n in SIZES {
        let rules = adserve_auction::Rules::new(SLOTS as usize, 10_000);
        let request = adserve_auction::wire::request_to_proto(candidates(n), &rules);
        let grpc = {
            let client = client.clone();
            load::closed_loop(1, s.warmup(), s.window(), Duration::from_secs(2), n as u64, move |_| {
                let (mut client, request) = (client.clone(), request.clone());
                async move {
                    match client.run_auction(request).await {
                        Ok(r) if !r.get_ref().winners.is_empty() => Outcome::Ok,
                        Ok(_) => Outcome::Error("no winners".into()),
                        Err(e) => Outcome::Error(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
            })
            .await
        };
        let ours = criterion::median(&s.target_dir, "auction", "run_auction", n)
            .context("criterion estimates missing: run `cargo bench -p adserve-auction --bench auction` first")?;
        let naive =
            criterion::median(&s.target_dir, "auction", "full_sort", n).context("criterion estimates missing")?;
        let c = criterion::comparison(
            "auction",
            format!("{n} candidates, {SLOTS} slots"),
            "run_auction in-process (criterion)",
            ours,
            n,
            "in-process medians from criterion",
        );
        out.push(
            c.with_summary("full sort of every candidate (criterion)", Role::Floor, criterion::summary(naive.0, n))
                .with("adserve-auction RunAuction over gRPC", Role::Ours, &grpc),
        );
    }
    Ok(out)
}
