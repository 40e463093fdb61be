//! The whole path against the real services: ad request -> winner ->
//! ImpressionEvent on Kafka -> click -> exactly one labelled Parquet row whose
//! features equal those the ranker scored.

use std::{collections::HashMap, time::Duration};

use adserve_integration_tests::Stack;
use adserve_proto::v1::{FeatureMatrix, ScoreRequest, ranker_service_client::RankerServiceClient};
use serde_json::{Value, json};

#[tokio::test]
async fn ad_request_and_click_become_one_labelled_row_with_the_scored_features() -> anyhow::Result<()> {
    let stack = Stack::ready().await?;
    // A user whose batch features are known, so we can see them flow through.
    let user = format!("e2e-{}", uuid::Uuid::new_v4());
    let row = adserve_feature_service::BatchRow {
        id: user.clone(),
        values: HashMap::from([("ctr_30d".to_string(), 0.0625), ("sessions_7d".to_string(), 9.0)]),
        text: HashMap::from([("top_interest".to_string(), "games".to_string())]),
        ..Default::default()
    };
    stack.batch_store().put_rows(adserve_features::Entity::User, &[row]).await?;

    let http = adserve_integration_tests::http_client();
    let body = json!({"user_id": user, "context": {"placement": "feed_top", "device": "mobile", "surface": "home"}, "slots": 1});
    let resp = http.post(format!("{}/v1/ads", stack.http)).json(&body).send().await?;
    assert_eq!(resp.status(), 200);
    let ad: Value = resp.json().await?;
    assert_eq!(ad["degraded"], json!([]), "every dependency is up: {ad}");
    let winner = &ad["winners"][0];
    let impression_id = winner["impression_id"].as_str().expect("impression id").to_string();
    assert!(winner["price_cpc_micros"].as_i64().unwrap() <= winner["bid_cpc_micros"].as_i64().unwrap());

    // The user clicks right away (well inside the stack's label window).
    let click = json!({"impression_id": impression_id, "click_token": winner["click_token"]});
    let click = http.post(format!("{}/v1/clicks", stack.http)).json(&click).send().await?;
    assert_eq!(click.status(), 202);

    // The impression was on Kafka, with the feature row that was scored.
    let logged = stack.logged_impression(&impression_id).await?;
    let event = logged.event.clone();
    assert_eq!(event.user_id, user);
    assert_eq!(event.ad_id, winner["ad_id"].as_i64().unwrap());
    assert_eq!(event.model_version, ad["model_version"].as_str().unwrap());
    assert_eq!(event.score_level(), adserve_proto::v1::ScoreLevel::Model, "scored by the model itself");
    let features = event.features.clone().expect("feature row");
    let registry = adserve_features::registry();
    assert_eq!(features.names, registry.names());
    let value = |name: &str| features.values[features.names.iter().position(|n| n == name).unwrap()];
    assert_eq!(value("user_ctr_30d"), 0.0625, "batch tier (DynamoDB) reached the ranker");
    assert_eq!(value("ctx_device_mobile"), 1.0);
    // The typed columns travel beside the dense row: the request's context as
    // bucket ids, the same the trainer computes (pinned in both test suites),
    // then the batch tier's: the ad's topic, the user's top interest (games:
    // 49) and their cross, present when the ad has a topic.
    let typed: Vec<(&str, i64)> =
        features.categorical_names.iter().map(String::as_str).zip(features.categorical_ids.iter().copied()).collect();
    assert_eq!(
        typed[..4],
        [("ctx_placement_id", 96), ("ctx_device_id", 4), ("ctx_surface_id", 80), ("ctx_placement_x_device", 914)]
    );
    let names: Vec<&str> = typed[4..].iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["ad_topic_id", "user_top_interest_id", "user_interest_x_ad_topic"]);
    let (topic, interest, cross) = (typed[4].1, typed[5].1, typed[6].1);
    assert_eq!(interest, 49, "the user's top interest, from DynamoDB");
    assert_eq!(cross != 0, topic != 0, "the cross is there exactly when the ad's topic is: {typed:?}");

    // Re-scoring the logged row gives the logged pCTR: the log is what was scored.
    let mut ranker = RankerServiceClient::connect(stack.ranker.clone()).await?;
    let matrix = FeatureMatrix {
        feature_names: features.names.clone(),
        num_rows: 1,
        values: features.values.clone(),
        categorical_names: features.categorical_names.clone(),
        categorical_ids: features.categorical_ids.clone(),
        embedding_names: features.embedding_names.clone(),
        embedding_dims: features.embedding_dims.clone(),
        embedding_values: features.embedding_values.clone(),
    };
    let rescored = ranker.score(ScoreRequest { matrix: Some(matrix), ..Default::default() }).await?.into_inner();
    assert_eq!(rescored.pctr[0], event.pctr);

    stack.wait_for_rows(&impression_id, Duration::from_secs(60)).await?;
    // Counted only once the joiner has committed past the impression: before
    // that, a re-read could still write it a second time.
    stack.wait_joiner_committed_past(&logged, Duration::from_secs(60)).await?;
    let rows = stack.rows_for(&impression_id).await?;
    assert_eq!(rows.len(), 1, "exactly one row per impression");
    let row = &rows[0];
    assert_eq!(row.label, 1, "the click landed within the label window");
    assert!(row.clicked_at_ms.is_some());
    assert_eq!(row.feature_names, features.names);
    assert_eq!(row.feature_values, features.values);
    assert_eq!(
        (&row.categorical_names, &row.categorical_ids),
        (&features.categorical_names, &features.categorical_ids)
    );
    assert_eq!(row.pctr, event.pctr);
    assert_eq!(row.model_version, event.model_version);
    assert_eq!(row.score_level, "model");

    // The joiner counts the labelled click against the model's prediction
    // (calibration drift is watched from these).
    let joiner = &stack.metrics.iter().find(|(n, _)| n == "label-joiner").expect("joiner metrics").1;
    let text = adserve_integration_tests::bench::prom::scrape(&format!("http://{joiner}/metrics")).await?;
    let version = format!("model_version=\"{}\"", event.model_version);
    let counter = |name: &str| adserve_integration_tests::bench::prom::counter(&text, name, &[&version]);
    assert!(counter("adserve_label_joiner_calibration_clicks_total") >= 1.0, "{text}");
    assert!(counter("adserve_label_joiner_calibration_impressions_total") >= 1.0);
    assert!(
        counter("adserve_label_joiner_calibration_expected_clicks_micros_total") >= f64::from(event.pctr) * 1e6 - 1.0
    );
    Ok(())
}

#[tokio::test]
async fn unclicked_impression_is_labelled_zero() -> anyhow::Result<()> {
    let stack = Stack::ready().await?;
    let body = json!({"user_id": "demo-user-3", "context": {"placement": "feed_top", "device": "desktop"}, "slots": 2});
    let ad: Value = adserve_integration_tests::http_client()
        .post(format!("{}/v1/ads", stack.http))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    let winners = ad["winners"].as_array().expect("winners");
    assert_eq!(winners.len(), 2);
    assert!(winners[0]["ecpm_micros"].as_i64() >= winners[1]["ecpm_micros"].as_i64(), "slots in eCPM order");
    let id = winners[1]["impression_id"].as_str().unwrap();
    let rows = stack.wait_for_rows(id, Duration::from_secs(60)).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].label, 0);
    Ok(())
}

#[tokio::test]
async fn coppa_requests_get_only_safe_ads_and_log_no_personal_data() -> anyhow::Result<()> {
    let stack = Stack::ready().await?;
    let body = json!({"user_id": "demo-user-1", "context": {"placement": "feed_top", "device": "tablet", "coppa": true}, "slots": 3});
    let ad: Value = adserve_integration_tests::http_client()
        .post(format!("{}/v1/ads", stack.http))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    let safe: Vec<i64> = {
        let catalog = stack.catalog()?;
        let t =
            adserve_catalog::Targeting { placement: "feed_top", device: "tablet", coppa: true, ..Default::default() };
        catalog.eligible_ads(&t, &adserve_catalog::Retrieval::all(5000)).await?.into_iter().map(|a| a.ad_id).collect()
    };
    let winners = ad["winners"].as_array().expect("winners");
    assert!(!winners.is_empty());
    for w in winners {
        assert!(safe.contains(&w["ad_id"].as_i64().unwrap()), "only under-13-safe ads");
    }
    let event = stack.impression_event(winners[0]["impression_id"].as_str().unwrap()).await?;
    assert!(event.user_id.is_empty(), "no user id logged for COPPA");
    assert!(event.coppa);
    let f = event.features.expect("features");
    for spec in adserve_features::registry().features.iter().filter(|s| s.personal) {
        let i = f.names.iter().position(|n| *n == spec.name).unwrap();
        assert_eq!(f.values[i], spec.default, "{} is a registry default", spec.name);
    }
    Ok(())
}

#[tokio::test]
async fn a_multi_slot_answer_is_logged_as_one_message_and_a_click_on_any_ad_joins_it() -> anyhow::Result<()> {
    // Logged as one message per ad, a partial acknowledgement used to answer
    // 503 while the acked ads became label-0 rows for an answer never given.
    use adserve_events::{CLICKS_TOPIC, IMPRESSIONS_TOPIC, decode_click, join_key};
    use adserve_proto::v1::ImpressionBatch;
    use prost::Message as _;

    let stack = Stack::ready().await?;
    let http = adserve_integration_tests::http_client();
    let user = format!("e2e-slots-{}", uuid::Uuid::new_v4());
    let body = json!({"user_id": user, "context": {"placement": "feed_top", "device": "mobile"}, "slots": 3});
    let ad: Value = http.post(format!("{}/v1/ads", stack.http)).json(&body).send().await?.json().await?;
    let winners = ad["winners"].as_array().expect("winners");
    assert_eq!(winners.len(), 3, "{ad}");
    let ids: Vec<&str> = winners.iter().map(|w| w["impression_id"].as_str().unwrap()).collect();
    // The user clicks the last ad at once (the stack's label window is 5 s).
    let last = &winners[2];
    let click = json!({"impression_id": last["impression_id"], "click_token": last["click_token"]});
    let status = http.post(format!("{}/v1/clicks", stack.http)).json(&click).send().await?.status();
    assert_eq!(status, 202);

    // One message, keyed by the first ad's id (every id's join key), holds
    // the three impressions in slot order.
    for id in &ids {
        assert_eq!(join_key(id), ids[0], "{id}");
    }
    let (payload, partition, offset) = stack.keyed_message(IMPRESSIONS_TOPIC, ids[0]).await?;
    let batch = ImpressionBatch::decode(payload.as_slice())?;
    let logged: Vec<&str> = batch.impressions.iter().map(|e| e.impression_id.as_str()).collect();
    assert_eq!(logged, ids);
    assert!(batch.impressions.iter().all(|e| e.user_id == user));
    let read = stack.logged_impressions(&ids).await?;
    assert!(read.values().all(|l| (l.partition, l.offset) == (partition, offset)), "one message");

    // A click on the last ad is keyed by the answer's key: on the batch's partition.
    let (payload, click_partition, _) = stack.keyed_message(CLICKS_TOPIC, ids[0]).await?;
    assert_eq!(decode_click(&payload).map_err(anyhow::Error::msg)?.impression_id, ids[2]);
    assert_eq!(click_partition, partition);

    // The joiner writes one row per ad; only the clicked one is labelled 1.
    for id in &ids {
        stack.wait_for_rows(id, Duration::from_secs(60)).await?;
    }
    stack.wait_joiner_committed_past(&read[ids[0]], Duration::from_secs(60)).await?;
    for (i, id) in ids.iter().enumerate() {
        let rows = stack.rows_for(id).await?;
        assert_eq!(rows.len(), 1, "exactly one row for slot {i}");
        assert_eq!(rows[0].label, i8::from(i == 2), "slot {i}");
    }
    Ok(())
}
