//! `make demo`: drives the running stack like a client would and shows what
//! happened: winners, prices, latencies, and the Parquet training rows.
//!
//! `adserve-demo [--expect-model VERSION] [--requests N]`: with
//! --expect-model it first waits until the ranker serves VERSION (make demo
//! promotes freshly trained models through the registry, and the running
//! ranker swaps them in without a restart); N ad requests (default 200).

use std::time::{Duration, Instant};

use adserve_integration_tests::{Stack, read_rows};
use adserve_proto::v1::{FlushRequest, GetModelRequest, GetStatusRequest, ranker_service_client::RankerServiceClient};
use serde_json::{Value, json};

const REQUESTS: usize = 200;

const USAGE: &str = "usage: adserve-demo [--expect-model VERSION] [--requests N]";

/// Waits until the ranker serves `version`.
async fn wait_for_model(stack: &Stack, version: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut client = RankerServiceClient::connect(stack.ranker.clone()).await?;
    let mut serving = String::new();
    while started.elapsed() < Duration::from_secs(30) {
        serving = client.get_model(GetModelRequest::default()).await?.into_inner().model_version;
        if serving == version {
            println!("\n== the ranker serves {version}, swapped in from the model registry while running");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the ranker still serves {serving:?}, not {version:?}: is registry.enabled on? (see its log)")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut expect, mut requests) = (None, REQUESTS);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--expect-model" => expect = Some(value),
            "--requests" => {
                requests = value.parse().ok().filter(|n| (1..=100_000).contains(n)).ok_or_else(|| {
                    anyhow::anyhow!("--requests must be an integer in 1..=100000, got {value:?}; {USAGE}")
                })?
            }
            other => anyhow::bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    let stack = Stack::ready().await?;
    if let Some(version) = &expect {
        wait_for_model(&stack, version).await?;
    }
    let http = adserve_integration_tests::http_client();
    let placements = ["feed_top", "feed_mid", "sidebar"];
    let devices = ["mobile", "desktop", "tablet"];
    let mut latencies = Vec::with_capacity(requests);
    let mut served = Vec::new();
    let mut clicks = 0;
    println!("\n== {requests} ad requests to {}/v1/ads", stack.http);
    println!(
        "{:<14} {:<9} {:>6} {:<26} {:>7} {:>10} {:>10}",
        "user", "placement", "ad", "title", "pCTR", "eCPM", "price/click"
    );
    for i in 0..requests {
        let body = json!({
            "user_id": format!("demo-user-{}", i % 50),
            "context": {"placement": placements[i % 3], "device": devices[i % 3 % 2 + (i / 7) % 2], "surface": "home"},
            "slots": 1 + (i % 2) as u32,
        });
        let start = Instant::now();
        let resp = http.post(format!("{}/v1/ads", stack.http)).json(&body).send().await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        latencies.push(start.elapsed());
        anyhow::ensure!(status.is_success(), "ad request failed: {status} {v}");
        for w in v["winners"].as_array().into_iter().flatten() {
            let id = w["impression_id"].as_str().unwrap_or_default().to_string();
            let pctr = w["pctr"].as_f64().unwrap_or_default();
            if i < 12 {
                println!(
                    "{:<14} {:<9} {:>6} {:<26} {:>7.4} {:>10} {:>10}",
                    body["user_id"].as_str().unwrap_or_default(),
                    body["context"]["placement"].as_str().unwrap_or_default(),
                    w["ad_id"],
                    w["title"].as_str().unwrap_or_default(),
                    pctr,
                    micros(&w["ecpm_micros"]),
                    micros(&w["price_cpc_micros"]),
                );
            }
            // Users click with the probability the model predicts.
            let draw = id.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))) % 10_000;
            if (draw as f64) < pctr * 10_000.0 {
                let click = json!({"impression_id": id, "click_token": w["click_token"]});
                let r = http.post(format!("{}/v1/clicks", stack.http)).json(&click).send().await?;
                anyhow::ensure!(r.status().is_success(), "click failed: {}", r.status());
                clicks += 1;
            }
            served.push(id);
        }
        if let Some(d) = v["degraded"].as_array().filter(|d| !d.is_empty()) {
            println!("  degraded: {d:?}");
        }
    }
    latencies.sort();
    let pct =
        |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1000.0;
    println!(
        "\n== latency over {requests} sequential requests (client side, debug build): p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms",
        pct(0.5),
        pct(0.95),
        pct(0.99)
    );
    println!("== {} impressions served, {clicks} clicks sent", served.len());

    let mut joiner = stack.joiner_client().await?;
    let dir = std::path::PathBuf::from(joiner.get_status(GetStatusRequest {}).await?.into_inner().output_dir);
    println!("\n== waiting for the label window to close and the label-joiner to write Parquet ({})", dir.display());
    let deadline = Instant::now() + Duration::from_secs(90);
    let rows = loop {
        joiner.flush(FlushRequest { close_open_windows: false }).await?;
        let rows: Vec<_> = read_rows(&dir)?.into_iter().filter(|r| served.contains(&r.impression_id)).collect();
        if rows.len() == served.len() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let positives = rows.iter().filter(|r| r.label == 1).count();
    println!(
        "== {} of {} impressions written as training rows, {positives} labelled clicked",
        rows.len(),
        served.len()
    );
    println!("{:<38} {:>6} {:>5} {:>7}  features", "impression_id", "ad", "label", "pCTR");
    for r in rows.iter().filter(|r| r.label == 1).take(3).chain(rows.iter().filter(|r| r.label == 0).take(5)) {
        let features: Vec<String> =
            r.feature_names.iter().zip(&r.feature_values).map(|(n, v)| format!("{n}={v}")).collect();
        println!("{:<38} {:>6} {:>5} {:>7.4}  {}", r.impression_id, r.ad_id, r.label, r.pctr, features.join(" "));
    }
    let status = joiner.get_status(GetStatusRequest {}).await?.into_inner();
    println!(
        "\n== label-joiner: {} rows in {} files, {} clicks joined, {} late, {} dead-lettered",
        status.rows_written, status.files_written, status.clicks_joined, status.late_clicks, status.dead_lettered
    );
    anyhow::ensure!(rows.len() == served.len(), "not every impression became a training row in time");
    Ok(())
}

fn micros(v: &Value) -> String {
    format!("{:.4}", v.as_i64().unwrap_or_default() as f64 / 1e6)
}
