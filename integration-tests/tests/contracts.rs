//! Contract tests: every service's gRPC methods through the generated
//! clients, including their error cases, plus the standard health service.

use adserve_integration_tests::Stack;
use adserve_proto::{
    service_names,
    v1::{
        AuctionCandidate, FeatureMatrix, GetAdsRequest, GetFeaturesRequest, GetModelRequest, GetStatusRequest,
        RecordClickRequest, RequestContext, RunAuctionRequest, ScoreRequest,
        auction_service_client::AuctionServiceClient, feature_service_client::FeatureServiceClient,
        gateway_service_client::GatewayServiceClient, label_joiner_service_client::LabelJoinerServiceClient,
        ranker_service_client::RankerServiceClient,
    },
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

fn ctx() -> Option<RequestContext> {
    Some(RequestContext { placement: "feed_top".into(), device: "mobile".into(), surface: "home".into(), coppa: false })
}

#[tokio::test]
async fn every_service_reports_serving_on_grpc_health() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    for (url, name) in [
        (&s.gateway, service_names::GATEWAY),
        (&s.features, service_names::FEATURE_SERVICE),
        (&s.ranker, service_names::RANKER),
        (&s.auction, service_names::AUCTION),
        (&s.joiner, service_names::LABEL_JOINER),
    ] {
        let mut health = HealthClient::new(tonic::transport::Endpoint::from_shared(url.clone())?.connect().await?);
        let status = health.check(HealthCheckRequest { service: name.into() }).await?.into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn auction_contract() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let mut c = AuctionServiceClient::connect(s.auction.clone()).await?;
    let cand = |ad_id, bid, pctr| AuctionCandidate {
        ad_id,
        campaign_id: ad_id,
        advertiser_id: ad_id,
        bid_cpc_micros: bid,
        pctr,
        ..AuctionCandidate::default()
    };
    let one = |candidates, reserve_ecpm_micros| RunAuctionRequest {
        candidates,
        slots: 1,
        reserve_ecpm_micros,
        quality_exponent: 1.0,
        ..RunAuctionRequest::default()
    };
    // eCPMs 15.625e6 and 31.25e6: ad 2 wins and pays the least bid that keeps
    // the slot; 500_000 ties ad 1, which wins ties on its lower id.
    let out = c.run_auction(one(vec![cand(1, 2_000_000, 1.0 / 128.0), cand(2, 1_000_000, 1.0 / 32.0)], 0)).await?;
    let w = &out.get_ref().winners[0];
    assert_eq!((w.ad_id, w.price_cpc_micros, w.propensity, w.explored), (2, 500_001, 1.0, false));
    // A reserve of 0 is a reserve of 0: a sole bidder pays nothing, exactly as
    // the gateway's in-process fallback computes it.
    let out = c.run_auction(one(vec![cand(1, 1_000_000, 1.0 / 32.0)], 0)).await?;
    assert_eq!(out.get_ref().winners[0].price_cpc_micros, 0);

    // The service and the library agree on a full request: CPM bids, floors,
    // quality, an advertiser cap and exploration with a seed.
    let mut sample = adserve_auction::sample_candidates(300);
    sample[7].bid_type = adserve_auction::BidType::Cpm;
    sample[7].bid_micros = 50_000_000;
    sample[9].reserve_ecpm_micros = 5_000_000;
    sample[11].quality = 3.0;
    for seed in 0..20 {
        let rules = adserve_auction::Rules {
            max_per_advertiser: 1,
            exploration: 0.3,
            seed,
            ..adserve_auction::Rules::new(4, 20_000)
        };
        let request = adserve_auction::wire::request_to_proto(
            sample.iter().map(adserve_auction::wire::candidate_to_proto).collect(),
            &rules,
        );
        let remote = c.run_auction(request).await?.into_inner().winners;
        let local: Vec<_> = adserve_auction::run_auction(&sample, &rules)?
            .winners
            .iter()
            .map(adserve_auction::wire::winner_to_proto)
            .collect();
        assert_eq!(remote, local, "seed {seed}");
    }

    let err = c
        .run_auction(RunAuctionRequest { candidates: vec![cand(1, 1, 0.1)], slots: 0, ..RunAuctionRequest::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("slots"), "{}", err.message());
    let err = c.run_auction(one(vec![], 0)).await.unwrap_err();
    assert!(err.message().contains("candidates"), "{}", err.message());
    let err = c.run_auction(one(vec![cand(1, 1, 0.1), cand(2, 1, f32::NAN)], 0)).await.unwrap_err();
    assert!(err.message().starts_with("candidates[1].pctr"), "{}", err.message());
    let err = c.run_auction(one(vec![cand(1, 1, 0.1), cand(1, 2, 0.1)], 0)).await.unwrap_err();
    assert!(err.message().starts_with("candidates[1].ad_id"), "{}", err.message());
    let both = AuctionCandidate { bid_cpm_micros: 5, ..cand(1, 1, 0.1) };
    let err = c.run_auction(one(vec![both], 0)).await.unwrap_err();
    assert!(err.message().starts_with("candidates[0].bid_cpm_micros"), "{}", err.message());
    let err =
        c.run_auction(RunAuctionRequest { exploration_share: 1.5, ..one(vec![cand(1, 1, 0.1)], 0) }).await.unwrap_err();
    assert!(err.message().starts_with("exploration_share"), "{}", err.message());
    Ok(())
}

/// The calibration of the model version the stack's ranker serves: from its
/// registry record, or none when the ranker serves its configured directory
/// (the committed, uncalibrated baseline) without a registry record.
async fn served_calibration(s: &Stack, version: &str) -> anyhow::Result<Option<adserve_registry::Calibration>> {
    let mut config = adserve_registry::RegistryConfig::default();
    config.postgres.url = s.postgres.clone();
    let registry = adserve_registry::Registry::connect_lazy(&config.postgres)?;
    let records = registry.list(Some(&config.model_name)).await?;
    let Some(record) = records.into_iter().find(|r| r.version == version) else { return Ok(None) };
    let manifest: adserve_registry::ModelManifest = serde_json::from_value(record.manifest)?;
    Ok(manifest.calibration)
}

#[tokio::test]
async fn ranker_contract() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let mut c = RankerServiceClient::connect(s.ranker.clone()).await?;
    let model = c.get_model(GetModelRequest::default()).await?.into_inner();
    assert!(!model.model_version.is_empty());
    assert_eq!(model.execution_provider, "cpu");
    let registry = adserve_features::registry();
    let names: Vec<String> = registry.names().iter().map(|n| n.to_string()).collect();
    // Rows as the feature-service sends them (dense and categorical columns):
    // the served model may be `make demo`'s DCN-v2, which reads both.
    let rows = adserve_integration_tests::bench::ranker::matrix;
    let matrix = rows(2);
    let scores = c.score(ScoreRequest { matrix: Some(matrix), ..Default::default() }).await?.into_inner();
    assert_eq!(scores.pctr.len(), 2);
    assert!(scores.pctr.iter().all(|p| *p > 0.0 && *p <= 1.0));
    // What is served is the raw output through the served model's manifest
    // calibration (none for the committed baseline; `make demo` promotes a
    // calibrated model into the same registry).
    assert_eq!(scores.raw_pctr.len(), 2);
    let calibration = served_calibration(&s, &model.model_version).await?;
    let want: Vec<f32> =
        scores.raw_pctr.iter().map(|p| calibration.as_ref().map_or(*p, |c| c.apply(*p)).max(1e-7)).collect();
    for (got, want) in scores.pctr.iter().zip(&want) {
        assert!((got - want).abs() <= 1e-6, "served {got}, calibrated raw {want} ({calibration:?})");
    }
    // Missing feature, ragged matrix, no matrix: InvalidArgument naming the problem.
    let missing =
        FeatureMatrix { feature_names: names[1..].to_vec(), values: registry.defaults()[1..].to_vec(), ..rows(1) };
    let err = c.score(ScoreRequest { matrix: Some(missing), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains(&names[0]), "{}", err.message());
    let ragged = FeatureMatrix { values: registry.defaults(), ..rows(2) };
    let err = c.score(ScoreRequest { matrix: Some(ragged), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("matrix.values has"), "{}", err.message());
    // More rows than the ranker takes (max_rows, 5000 by default): refused
    // before anything is gathered, naming the field and the limit.
    let err = c.score(ScoreRequest { matrix: Some(rows(5001)), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("matrix.num_rows: must be in 1..=5000, got 5001"), "{}", err.message());
    let err = c.score(ScoreRequest { matrix: None, ..Default::default() }).await.unwrap_err();
    assert!(err.message().starts_with("matrix"), "{}", err.message());
    // A model name: the served one scores; any other is NOT_FOUND, naming both.
    assert_eq!(model.model_name, "ctr");
    let one = || rows(1);
    let named = ScoreRequest { matrix: Some(one()), model_name: model.model_name.clone(), ..Default::default() };
    assert_eq!(c.score(named).await?.into_inner().pctr.len(), 1);
    let other = ScoreRequest { matrix: Some(one()), model_name: "ctr-video".into(), ..Default::default() };
    let err = c.score(other).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().starts_with("model_name") && err.message().contains("\"ctr\""), "{}", err.message());
    let err = c.get_model(GetModelRequest { model_name: "ctr-video".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    Ok(())
}

#[tokio::test]
async fn feature_service_contract() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let mut c = FeatureServiceClient::connect(s.features.clone()).await?;
    let registry = adserve_features::registry();
    // An unknown user and unknown ads are served with defaults, not an error.
    let resp = c
        .get_features(GetFeaturesRequest {
            user_id: format!("nobody-{}", uuid::Uuid::new_v4()),
            ad_ids: vec![-1, -2],
            context: ctx(),
        })
        .await?
        .into_inner();
    assert!(resp.degraded.is_empty(), "{:?}", resp.degraded);
    let m = resp.matrix.expect("matrix");
    assert_eq!(m.feature_names, registry.names());
    assert_eq!(m.num_rows, 2);
    for (i, f) in registry.features.iter().enumerate() {
        if f.entity != adserve_features::Entity::Context {
            assert_eq!(m.values[i], f.default, "{}", f.name);
        }
    }
    let err =
        c.get_features(GetFeaturesRequest { user_id: "u".into(), ad_ids: vec![], context: ctx() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("ad_ids"), "{}", err.message());
    let err = c
        .get_features(GetFeaturesRequest { user_id: "u".into(), ad_ids: vec![1, 1], context: ctx() })
        .await
        .unwrap_err();
    assert!(err.message().contains("repeated"), "{}", err.message());
    Ok(())
}

#[tokio::test]
async fn gateway_contract() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let mut c = GatewayServiceClient::connect(s.gateway.clone()).await?;
    let ads = c
        .get_ads(GetAdsRequest { user_id: "demo-user-7".into(), context: ctx(), slots: 1, ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(ads.winners.len(), 1);
    assert!(ads.candidates >= 1);
    let winner = &ads.winners[0];
    let click = c
        .record_click(RecordClickRequest {
            impression_id: winner.impression_id.clone(),
            click_token: winner.click_token.clone(),
        })
        .await?
        .into_inner();
    assert!(!click.click_id.is_empty());
    let replay =
        RecordClickRequest { impression_id: winner.impression_id.clone(), click_token: winner.click_token.clone() };
    assert_eq!(c.record_click(replay).await.unwrap_err().code(), Code::AlreadyExists);
    // Another impression's token: forged for this one.
    let other = c
        .get_ads(GetAdsRequest { user_id: "demo-user-7".into(), context: ctx(), slots: 1, ..Default::default() })
        .await?
        .into_inner();
    let forged = RecordClickRequest {
        impression_id: other.winners[0].impression_id.clone(),
        click_token: winner.click_token.clone(),
    };
    let err = c.record_click(forged).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().starts_with("click_token"), "{}", err.message());
    let err = c
        .get_ads(GetAdsRequest { user_id: "u".into(), context: ctx(), slots: 0, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("slots"), "{}", err.message());
    let err = c
        .record_click(RecordClickRequest { impression_id: "not-a-uuid".into(), click_token: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("impression_id"), "{}", err.message());
    Ok(())
}

#[tokio::test]
async fn label_joiner_contract() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let mut c = LabelJoinerServiceClient::connect(s.joiner.clone()).await?;
    let status = c.get_status(GetStatusRequest {}).await?.into_inner();
    assert!(!status.output_dir.is_empty());
    Ok(())
}
