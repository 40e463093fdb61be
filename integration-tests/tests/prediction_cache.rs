//! The gateway's prediction cache across the process boundary: a gateway in
//! this process in front of a ranker of its own (a child process, frozen and
//! thawed with SIGSTOP / SIGCONT), on the stack's stores.
//!
//! Every request carries a floor above any price, so nothing is served or
//! logged: the rows' real-time counters do not move between requests (a
//! logged impression would change its user's and ad's features, and so the
//! rows' keys), and the ranker's `adserve_ranker_rows` histogram, which only
//! this gateway feeds, says how many rows each request sent it.

use std::{process::Stdio, time::Duration};

use adserve_gateway::{AdServer, pipeline::ServeOptions};
use adserve_integration_tests::{Stack, ad_request, bench::prom, ranker_command, repo_root};
use adserve_proto::v1::{GetAdsResponse, GetModelRequest, ranker_service_client::RankerServiceClient};

const REFRESH: Duration = Duration::from_secs(2);

async fn ask(server: &AdServer, user: &str) -> anyhow::Result<GetAdsResponse> {
    let options = ServeOptions { floor_ecpm_micros: i64::MAX / 4, ..Default::default() };
    let served =
        tokio::time::timeout(Duration::from_secs(20), server.serve_with(ad_request(user), None, options)).await??;
    Ok(served.response)
}

fn degraded(r: &GetAdsResponse) -> Vec<&str> {
    r.degraded.iter().map(|d| d.component.as_str()).collect()
}

/// Rows the ranker has scored so far.
async fn rows_scored(metrics: &str) -> anyhow::Result<f64> {
    Ok(prom::counter(&prom::scrape(metrics).await?, "adserve_ranker_rows_sum", &[]))
}

/// A ranker of this test's own (the committed baseline model, no registry),
/// once it answers `GetModel`.
struct OwnRanker {
    child: tokio::process::Child,
    url: String,
    metrics: String,
    version: String,
}

async fn own_ranker() -> anyhow::Result<OwnRanker> {
    let (mut command, port, metrics_port) = ranker_command(&repo_root().join("models/ctr-baseline"), &[]);
    let child = command.stdout(Stdio::null()).spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    for _ in 0..300 {
        if let Ok(mut c) = RankerServiceClient::connect(url.clone()).await
            && let Ok(m) = c.get_model(GetModelRequest::default()).await
        {
            return Ok(OwnRanker { child, url, metrics, version: m.into_inner().model_version });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("the ranker on {port} did not start")
}

#[tokio::test]
async fn repeated_rows_skip_the_ranker_and_a_frozen_ranker_turns_the_cache_off_until_it_answers() -> anyhow::Result<()>
{
    let s = Stack::ready().await?;
    let OwnRanker { child: ranker, url: ranker_url, metrics, version } = own_ranker().await?;
    let pid = ranker.id().expect("running").to_string();
    let server = s
        .in_process_server(|c| {
            c.upstreams.ranker = ranker_url.clone();
            c.prediction_cache.refresh = REFRESH;
        })
        .await?;
    let user = format!("pcache-{}", uuid::Uuid::new_v4());

    // The first ask fills the cache; a repeat sends the ranker only the rows
    // the cache does not hold (every one, until the gateway has read what
    // the ranker serves).
    let mut hit = None;
    for _ in 0..20 {
        let before = rows_scored(&metrics).await?;
        let answer = ask(&server, &user).await?;
        assert_eq!(degraded(&answer), Vec::<&str>::new(), "{answer:?}");
        assert_eq!(answer.model_version, version);
        let sent = rows_scored(&metrics).await? - before;
        assert!(answer.candidates > 1, "{answer:?}");
        // Most rows, not all: the stack's other traffic may move a few ads'
        // counters (and so their rows) between two asks.
        if sent <= f64::from(answer.candidates) / 2.0 {
            hit = Some(sent);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(hit.is_some(), "a repeated request never found most of its rows in the cache");

    // Frozen: once the gateway has not heard what the ranker serves for 3 x
    // refresh, the cache no longer vouches for a version; every row goes to
    // the ranker, misses its deadline, and the prior answers, said so.
    std::process::Command::new("kill").args(["-STOP", &pid]).status()?;
    tokio::time::sleep(REFRESH * 3 + Duration::from_secs(1)).await;
    let frozen = ask(&server, &user).await;
    std::process::Command::new("kill").args(["-CONT", &pid]).status()?;
    let frozen = frozen?;
    assert_eq!(degraded(&frozen), vec!["ranker"], "{frozen:?}");
    assert_eq!(frozen.model_version, "fallback-prior");

    // Thawed: the model answers again, and once the gateway has read what it
    // serves, repeats hit again.
    let mut recovered = false;
    for _ in 0..50 {
        let before = rows_scored(&metrics).await?;
        let answer = ask(&server, &user).await?;
        let sent = rows_scored(&metrics).await? - before;
        if degraded(&answer).is_empty() && answer.model_version == version && sent < f64::from(answer.candidates) {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "the cache did not serve again after the ranker came back");
    Ok(())
}

#[tokio::test]
async fn with_the_cache_off_every_row_goes_to_the_ranker() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let OwnRanker { child: _ranker, url: ranker_url, metrics, .. } = own_ranker().await?;
    let server = s
        .in_process_server(|c| {
            c.upstreams.ranker = ranker_url.clone();
            c.prediction_cache.enabled = false;
        })
        .await?;
    let user = format!("pcache-off-{}", uuid::Uuid::new_v4());
    for _ in 0..3 {
        let before = rows_scored(&metrics).await?;
        let answer = ask(&server, &user).await?;
        assert_eq!(degraded(&answer), Vec::<&str>::new(), "{answer:?}");
        assert_eq!(rows_scored(&metrics).await? - before, f64::from(answer.candidates));
    }
    Ok(())
}
