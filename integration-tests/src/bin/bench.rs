//! `adserve-bench`: runs every benchmark next to its peer or floor against
//! the running stack, prints one table, writes JSON and (optionally) the
//! generated section of docs/benchmarks.md. Started by `make bench`, which
//! builds the release profile and starts the stack first.

use std::{path::PathBuf, time::Instant};

use adserve_integration_tests::{
    Stack,
    bench::{
        Settings, aggregates, auction, e2e, features, joiner, ranker,
        report::{self, Report, RunInfo},
    },
    repo_root,
};
use anyhow::Context;
use clap::Parser;

/// The benchmark parts, in run order.
const PARTS: [&str; 9] =
    ["auction", "ranker", "ranker-overload", "ranker-swap", "tls", "features", "e2e", "joiner", "aggregates"];

#[derive(Debug, Parser)]
#[command(about = "Benchmarks every adserve path next to its peer or floor, in one run")]
struct Args {
    /// Short windows: the whole run well under five minutes.
    #[arg(long)]
    quick: bool,
    /// Comma-separated parts to run (auction, ranker, ranker-overload, ranker-swap, tls, features, e2e, joiner,
    /// aggregates).
    #[arg(long, value_delimiter = ',', default_values_t = PARTS.map(String::from))]
    only: Vec<String>,
    /// Where to write the JSON results.
    #[arg(long)]
    json: PathBuf,
    /// Markdown file whose generated section is replaced with the results.
    #[arg(long)]
    doc: Option<PathBuf>,
    /// The command that produced the run, recorded with the figures.
    #[arg(long, default_value = "make bench")]
    command: String,
    /// Directory of the service binaries under test.
    #[arg(long, env = "ADSTACK_BENCH_BIN_DIR")]
    bin_dir: PathBuf,
    /// Cargo profile the binaries were built with.
    #[arg(long, default_value = "release")]
    profile: String,
    /// Scratch space: peer state, logs.
    #[arg(long, env = "ADSTACK_BENCH_WORK_DIR")]
    work_dir: PathBuf,
    /// Python of the peers' venv.
    #[arg(long, env = "ADSTACK_BENCH_PYTHON")]
    peer_python: PathBuf,
    /// Cargo target directory (criterion's estimates).
    #[arg(long, env = "CARGO_TARGET_DIR")]
    target_dir: PathBuf,
    /// libonnxruntime shared library.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_dylib: PathBuf,
    /// Model directory the stack's ranker serves.
    #[arg(long, env = "ADSTACK_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Gateway metrics address.
    #[arg(long, default_value = "127.0.0.1:9101")]
    gateway_metrics: String,
    /// Measure nothing: re-render this JSON report into --doc (after a
    /// change to the report's layout).
    #[arg(long)]
    render: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info,ort=warn".into()))
        .init();
    if let Some(json) = &args.render {
        let report: Report = serde_json::from_str(&std::fs::read_to_string(json)?)?;
        println!("{}", report.text());
        return report::write(&report, &args.json, args.doc.as_deref());
    }
    for part in &args.only {
        anyhow::ensure!(PARTS.contains(&part.as_str()), "--only: unknown part {part:?}; parts are {PARTS:?}");
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let stack = Stack::ready().await.context("the stack is not up (scripts/start.sh; logs in $ADSTACK_RUN/logs)")?;
    let settings = Settings {
        quick: args.quick,
        stack,
        work_dir: args.work_dir.clone(),
        peer_python: args.peer_python.clone(),
        bin_dir: args.bin_dir.clone(),
        target_dir: args.target_dir.clone(),
        ort_dylib: args.ort_dylib.clone(),
        model_dir: args.model_dir.clone().unwrap_or_else(|| repo_root().join("models/ctr-baseline")),
        gateway_metrics: args.gateway_metrics.clone(),
    };
    std::fs::create_dir_all(&settings.work_dir)?;
    let mut report = Report { run: run_info(&args), comparisons: Vec::new(), breakdowns: Vec::new() };
    let wants = |p: &str| args.only.iter().any(|o| o == p);
    forget_aggregator_progress(&settings.stack.redis).await?;
    if wants("auction") {
        report.comparisons.extend(auction::run(&settings).await.context("auction benchmark")?);
    }
    if wants("ranker") {
        report.comparisons.extend(ranker::run(&settings).await.context("ranker benchmark")?);
    }
    if wants("ranker-overload") {
        report.comparisons.extend(ranker::overload(&settings).await.context("ranker overload benchmark")?);
    }
    if wants("ranker-swap") {
        report.comparisons.extend(ranker::swap(&settings).await.context("ranker swap benchmark")?);
    }
    if wants("tls") {
        report.comparisons.extend(ranker::tls(&settings).await.context("TLS benchmark")?);
    }
    if wants("features") {
        let ids = e2e::seed_placement(&settings.stack, "bench_1000", 1000).await?;
        report.comparisons.extend(features::run(&settings, &ids).await.context("feature-service benchmark")?);
    }
    if wants("e2e") {
        let (c, b) = e2e::run(&settings).await.context("end-to-end benchmark")?;
        report.comparisons.extend(c);
        report.breakdowns.extend(b);
    }
    if wants("joiner") {
        report.comparisons.extend(joiner::run(&settings).await.context("label-joiner benchmark")?);
    }
    if wants("aggregates") {
        report.comparisons.extend(aggregates::run(&settings).await.context("streaming aggregates benchmark")?);
    }
    println!("\n{}", report.text());
    report::write(&report, &args.json, args.doc.as_deref())?;
    println!(
        "results: {}{} ({:.0} s)",
        args.json.display(),
        args.doc.as_ref().map(|d| format!(" and {}", d.display())).unwrap_or_default(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The bench runs no aggregator (scripts/bench.sh starts the feature-service
/// serving only, and the parts seed the counters they read): progress an
/// earlier run's aggregator left in Redis would make every answer report
/// the real-time tier as stale.
async fn forget_aggregator_progress(redis_url: &str) -> anyhow::Result<()> {
    use fred::prelude::*;
    let client = Client::new(Config::from_url(redis_url)?, None, None, None);
    client.init().await?;
    let prefix = &adserve_features::registry().redis.key_prefix;
    let _: i64 = client.del(adserve_features::realtime::progress_key(prefix)).await?;
    client.quit().await?;
    Ok(())
}

fn run_info(args: &Args) -> RunInfo {
    let sh = |cmd: &str, a: &[&str]| {
        std::process::Command::new(cmd)
            .args(a)
            .current_dir(repo_root())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let dirty = !sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let commit = format!("{}{}", sh("git", &["rev-parse", "--short", "HEAD"]), if dirty { "-dirty" } else { "" });
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mut command = args.command.clone();
    if args.only.len() < PARTS.len() && !command.contains("bench-") {
        command = format!("{command} (parts: {})", args.only.join(","));
    }
    RunInfo {
        command,
        commit,
        cores: std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        cpu,
        date: sh("date", &["-u", "+%Y-%m-%d %H:%M"]),
        profile: args.profile.clone(),
        mode: if args.quick { "quick".into() } else { "full".into() },
    }
}
