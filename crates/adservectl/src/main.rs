//! adservectl: operate the model registry.
//!
//! ```text
//! adservectl models list [--name ctr] [--json]
//! adservectl models register --name ctr --dir models/ctr-2026-12-01
//! adservectl models promote --name ctr --version V --to canary --canary-share 0.05
//! adservectl models promote --name ctr --version V --to production --reason "beats baseline"
//! adservectl models rollback --name ctr --reason "CTR dropped"
//! adservectl models history --name ctr
//! ```
//!
//! Rankers following the registry (`registry.enabled`) pick a change up
//! within a second (LISTEN/NOTIFY; `registry.poll_interval` as a safety net).
//! Illegal stage changes are refused with the reason and exit status 1.

use std::{path::PathBuf, process::ExitCode};

use adserve_registry::{ModelRecord, Moved, Registry, RegistryConfig, Stage};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "adservectl", version, about = "Operate adserve's model registry")]
struct Cli {
    /// Registry database (the rankers' `registry.postgres.url`).
    #[arg(long, env = "ADSERVE_REGISTRY__POSTGRES__URL", default_value_t = RegistryConfig::default().postgres.url, global = true)]
    database_url: String,
    /// Registry schema (the rankers' `registry.postgres.schema`).
    #[arg(long, env = "ADSERVE_REGISTRY__POSTGRES__SCHEMA", default_value_t = RegistryConfig::default().postgres.schema, global = true)]
    schema: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Model versions and their stages.
    #[command(subcommand)]
    Models(Models),
    /// Create or upgrade the registry schema (the other commands do it too).
    Migrate,
}

#[derive(Subcommand)]
enum Models {
    /// List versions, newest first.
    List {
        /// Only this model name.
        #[arg(long)]
        name: Option<String>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Register the model in DIR (model.onnx + manifest.json) as a candidate.
    Register {
        /// Model name (the rankers' `registry.model_name`).
        #[arg(long, default_value_t = RegistryConfig::default().model_name)]
        name: String,
        /// Directory with model.onnx and manifest.json, readable by the rankers.
        #[arg(long)]
        dir: PathBuf,
        /// Who (recorded in the history).
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
    },
    /// Move a version to a stage (production retires the current one).
    Promote {
        /// Model name.
        #[arg(long, default_value_t = RegistryConfig::default().model_name)]
        name: String,
        /// Version (the manifest's model_version).
        #[arg(long)]
        version: String,
        /// candidate, shadow, canary, production or retired.
        #[arg(long)]
        to: Stage,
        /// Share of users for a canary, in (0, 1].
        #[arg(long)]
        canary_share: Option<f64>,
        /// Who.
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
        /// Why (recorded in the history).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Restore the previous production version; retire the current one.
    Rollback {
        /// Model name.
        #[arg(long, default_value_t = RegistryConfig::default().model_name)]
        name: String,
        /// Who.
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Every stage change of a model, oldest first.
    History {
        /// Model name.
        #[arg(long, default_value_t = RegistryConfig::default().model_name)]
        name: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("adservectl: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = RegistryConfig::default();
    config.postgres.url = cli.database_url;
    config.postgres.schema = cli.schema;
    config.postgres.timeout = std::time::Duration::from_secs(10);
    config.validate()?;
    let registry = Registry::connect_lazy(&config.postgres)?;
    registry.migrate().await?;
    match cli.command {
        Command::Migrate => println!("registry schema {} is up to date", config.postgres.schema),
        Command::Models(Models::List { name, json }) => {
            let records = registry.list(name.as_deref()).await?;
            if json {
                for r in &records {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                print_table(&records);
            }
        }
        Command::Models(Models::Register { name, dir, actor }) => {
            let r = registry.register(&name, &dir, &actor).await?;
            println!("registered {} {} ({}) as candidate", r.name, r.version, r.artifact);
        }
        Command::Models(Models::Promote { name, version, to, canary_share, actor, reason }) => {
            print_moves(&name, &registry.promote(&name, &version, to, canary_share, &actor, &reason).await?);
        }
        Command::Models(Models::Rollback { name, actor, reason }) => {
            print_moves(&name, &registry.rollback(&name, &actor, &reason).await?);
        }
        Command::Models(Models::History { name }) => {
            for c in registry.history(&name).await? {
                println!(
                    "{}  {:<24} {:>10} -> {:<10} by {}{}{}",
                    c.at,
                    c.version,
                    c.from_stage.as_deref().unwrap_or("-"),
                    c.to_stage,
                    c.actor,
                    if c.rollback { " (rollback)" } else { "" },
                    if c.reason.is_empty() { String::new() } else { format!(": {}", c.reason) }
                );
            }
        }
    }
    Ok(())
}

fn print_moves(name: &str, moves: &[Moved]) {
    for m in moves {
        println!("{name} {}: {} -> {}", m.version, m.from, m.to);
    }
}

fn print_table(records: &[ModelRecord]) {
    println!(
        "{:<12} {:<28} {:<11} {:>6} {:>8} {:>8}  {:<20}  artifact",
        "name", "version", "stage", "share", "auc", "logloss", "registered"
    );
    for r in records {
        let metric = |k: &str| r.metrics.get(k).and_then(|v| v.as_f64()).map_or("-".into(), |v| format!("{v:.4}"));
        println!(
            "{:<12} {:<28} {:<11} {:>6} {:>8} {:>8}  {:<20}  {}",
            r.name,
            r.version,
            r.stage,
            if r.stage == Stage::Canary { format!("{:.3}", r.canary_share) } else { "-".into() },
            metric("auc"),
            metric("logloss"),
            r.registered_at,
            r.artifact
        );
    }
}
