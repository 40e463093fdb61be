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
    let cand = |ad_id, bid, pctr| AuctionCandidate { ad_id, campaign_id: 1, bid_cpc_micros: bid, pctr };
    let out = c
        .run_auction(RunAuctionRequest {
            candidates: vec![cand(1, 2_000_000, 0.01), cand(2, 1_000_000, 0.05)],
            slots: 1,
            reserve_ecpm_micros: 0,
        })
        .await?
        .into_inner();
    assert_eq!(out.winners[0].ad_id, 2);
    assert_eq!(out.winners[0].price_cpc_micros, 400_000);
    let err = c
        .run_auction(RunAuctionRequest { candidates: vec![cand(1, 1, 0.1)], slots: 0, reserve_ecpm_micros: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("slots"), "{}", err.message());
    let err =
        c.run_auction(RunAuctionRequest { candidates: vec![], slots: 1, reserve_ecpm_micros: 0 }).await.unwrap_err();
    assert!(err.message().contains("candidates"), "{}", err.message());
    Ok(())
}

#[tokio::test]
async fn ranker_contract() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let mut c = RankerServiceClient::connect(s.ranker.clone()).await?;
    let model = c.get_model(GetModelRequest {}).await?.into_inner();
    assert!(!model.model_version.is_empty());
    assert_eq!(model.execution_provider, "cpu");
    let registry = adserve_features::registry();
    let names: Vec<String> = registry.names().iter().map(|n| n.to_string()).collect();
    let matrix = FeatureMatrix {
        feature_names: names.clone(),
        num_rows: 2,
        values: [registry.defaults(), registry.defaults()].concat(),
    };
    let scores = c.score(ScoreRequest { matrix: Some(matrix), ..Default::default() }).await?.into_inner();
    assert_eq!(scores.pctr.len(), 2);
    assert!(scores.pctr.iter().all(|p| *p > 0.0 && *p <= 1.0));
    // The baseline has no calibration: what is served is the raw output.
    assert_eq!(scores.raw_pctr.len(), 2);
    assert_eq!(scores.pctr, scores.raw_pctr.iter().map(|p| p.max(1e-7)).collect::<Vec<_>>());
    // Missing feature, ragged matrix, no matrix: InvalidArgument naming the problem.
    let missing =
        FeatureMatrix { feature_names: names[1..].to_vec(), num_rows: 1, values: registry.defaults()[1..].to_vec() };
    let err = c.score(ScoreRequest { matrix: Some(missing), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains(&names[0]), "{}", err.message());
    let ragged = FeatureMatrix { feature_names: names.clone(), num_rows: 2, values: registry.defaults() };
    assert_eq!(
        c.score(ScoreRequest { matrix: Some(ragged), ..Default::default() }).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let err = c.score(ScoreRequest { matrix: None, ..Default::default() }).await.unwrap_err();
    assert!(err.message().starts_with("matrix"), "{}", err.message());
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
    let ads = c.get_ads(GetAdsRequest { user_id: "demo-user-7".into(), context: ctx(), slots: 1 }).await?.into_inner();
    assert_eq!(ads.winners.len(), 1);
    assert!(ads.candidates >= 1);
    let click =
        c.record_click(RecordClickRequest { impression_id: ads.winners[0].impression_id.clone() }).await?.into_inner();
    assert!(!click.click_id.is_empty());
    let err = c.get_ads(GetAdsRequest { user_id: "u".into(), context: ctx(), slots: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("slots"), "{}", err.message());
    let err = c.record_click(RecordClickRequest { impression_id: "not-a-uuid".into() }).await.unwrap_err();
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
