//! adservectl: operate the model registry and the feature store's batch tier.
//!
//! ```text
//! adservectl features list [--json]
//! adservectl features backfill --entity user --file users.parquet [--max-items-per-second 2000]
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
//!
//! `features backfill` loads a batch pipeline's Parquet output into the
//! DynamoDB batch tier (see `adserve_feature_service::backfill` for the file
//! format, idempotency and resumption); the trainer's point-in-time
//! retrieval reads the same file.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use adserve_feature_service::{
    BatchStore,
    backfill::{self, Options},
    config::{CredentialSource, DynamoConfig},
};
use adserve_features::{Entity, FeatureRegistry, Source};
use adserve_registry::{ModelRecord, Moved, Registry, RegistryConfig, Stage};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "adservectl", version, about = "Operate adserve's model registry and feature store")]
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
    /// Create or upgrade the registry schema (the `models` commands do it too).
    Migrate,
    /// The feature registry and the batch tier.
    #[command(subcommand)]
    Features(Features),
}

#[derive(Subcommand)]
enum Features {
    /// The registry compiled into this build: every feature, in column order.
    List {
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Load batch features from a Parquet file into DynamoDB: each entity's
    /// latest row, resumable (a checkpoint beside the file) and idempotent.
    Backfill {
        /// Which entity's table: user or ad.
        #[arg(long)]
        entity: EntityArg,
        /// Parquet file: the entity key, event_timestamp, one column per batch attribute.
        #[arg(long)]
        file: PathBuf,
        /// Progress file (default: FILE.checkpoint.json).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Ignore the checkpoint and write every row group again.
        #[arg(long)]
        restart: bool,
        /// Items per second at most (0: unlimited); spares a serving table's write capacity.
        #[arg(long, default_value_t = 0)]
        max_items_per_second: u32,
        /// BatchWriteItem calls in flight.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
        concurrency: u16,
        #[command(flatten)]
        dynamodb: DynamoArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum EntityArg {
    User,
    Ad,
}

/// The batch tier, as the feature-service's `dynamodb.*` settings name it.
#[derive(clap::Args)]
struct DynamoArgs {
    /// DynamoDB endpoint (empty: the region's AWS endpoint).
    #[arg(long, env = "ADSERVE_DYNAMODB__ENDPOINT", default_value_t = DynamoConfig::default().endpoint)]
    dynamodb_endpoint: String,
    /// AWS region.
    #[arg(long, env = "ADSERVE_DYNAMODB__REGION", default_value_t = DynamoConfig::default().region)]
    dynamodb_region: String,
    /// Where credentials come from: static (the keys below) or default-chain
    /// (the AWS SDK's chain: environment, profile, EKS IRSA, ECS, IMDS).
    #[arg(long, env = "ADSERVE_DYNAMODB__CREDENTIALS", value_enum, default_value_t = Credentials::Static)]
    dynamodb_credentials: Credentials,
    /// Access key id (static credentials).
    #[arg(long, env = "ADSERVE_DYNAMODB__ACCESS_KEY_ID", default_value_t = DynamoConfig::default().access_key_id, hide_default_value = true)]
    dynamodb_access_key_id: String,
    /// Secret access key.
    #[arg(long, env = "ADSERVE_DYNAMODB__SECRET_ACCESS_KEY", default_value_t = DynamoConfig::default().secret_access_key, hide_default_value = true, hide_env_values = true)]
    dynamodb_secret_access_key: String,
}

/// `dynamodb.credentials`, as a flag.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Credentials {
    Static,
    // `default_chain` is how the service's config spells it.
    #[value(alias = "default_chain")]
    DefaultChain,
}

impl DynamoArgs {
    fn config(self) -> DynamoConfig {
        let default_chain = matches!(self.dynamodb_credentials, Credentials::DefaultChain);
        DynamoConfig {
            endpoint: self.dynamodb_endpoint,
            region: self.dynamodb_region,
            credentials: if default_chain { CredentialSource::DefaultChain } else { CredentialSource::Static },
            // The chain takes no keys (the local defaults would be ignored).
            access_key_id: if default_chain { String::new() } else { self.dynamodb_access_key_id },
            secret_access_key: if default_chain { String::new() } else { self.dynamodb_secret_access_key },
            // A batch call's attempt, not a request's budget.
            timeout: Duration::from_secs(10),
        }
    }
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
    /// Change a canary's share of users (ramp up or cut back), keeping it
    /// canary: users already in it stay in it as the share grows.
    SetShare {
        /// Model name.
        #[arg(long, default_value_t = RegistryConfig::default().model_name)]
        name: String,
        /// The canary's version.
        #[arg(long)]
        version: String,
        /// New share of users, in (0, 1].
        #[arg(long)]
        share: f64,
        /// Who.
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
        /// Why (recorded in the history with the old and new share).
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
    let command = match cli.command {
        Command::Features(f) => return features(f, adserve_features::registry()).await,
        other => other,
    };
    let mut config = RegistryConfig::default();
    config.postgres.url = cli.database_url;
    config.postgres.schema = cli.schema;
    config.postgres.timeout = std::time::Duration::from_secs(10);
    config.validate()?;
    let registry = Registry::connect_lazy(&config.postgres)?;
    registry.migrate().await?;
    match command {
        Command::Features(_) => unreachable!("handled above"),
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
            if !dir.join(adserve_registry::REFERENCE_FILE).exists() {
                eprintln!(
                    "warning: {} has no {}: the ranker cannot check that it scores the model as the trainer did",
                    dir.display(),
                    adserve_registry::REFERENCE_FILE
                );
            }
        }
        Command::Models(Models::Promote { name, version, to, canary_share, actor, reason }) => {
            print_moves(&name, &registry.promote(&name, &version, to, canary_share, &actor, &reason).await?);
        }
        Command::Models(Models::SetShare { name, version, share, actor, reason }) => {
            registry.set_canary_share(&name, &version, share, &actor, &reason).await?;
            println!("{name} {version}: canary share now {share}");
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

async fn features(command: Features, registry: &FeatureRegistry) -> anyhow::Result<()> {
    match command {
        Features::List { json } => list_features(registry, json),
        Features::Backfill { entity, file, checkpoint, restart, max_items_per_second, concurrency, dynamodb } => {
            let entity = match entity {
                EntityArg::User => Entity::User,
                EntityArg::Ad => Entity::Ad,
            };
            let plan = backfill::plan(&file, entity, registry)?;
            let mut options = Options::for_input(&file);
            options.checkpoint = checkpoint.unwrap_or(options.checkpoint);
            options.restart = restart;
            options.max_items_per_second = max_items_per_second;
            options.concurrency = usize::from(concurrency);
            eprintln!(
                "{}: {} rows, {} {} entities (their latest rows), {} row groups; checkpoint {}",
                file.display(),
                plan.rows,
                plan.entities,
                if entity == Entity::User { "user" } else { "ad" },
                plan.groups(),
                options.checkpoint.display()
            );
            let store = BatchStore::new(&dynamodb.config(), registry);
            store.ensure_tables().await?;
            let bar = indicatif::ProgressBar::new(plan.entities as u64).with_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} items ({per_sec}, eta {eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            let started = std::time::Instant::now();
            let outcome = backfill::run(&plan, &store, &options, |items| bar.inc(items as u64)).await;
            bar.finish_and_clear();
            let outcome = outcome?;
            if outcome.already_complete {
                println!(
                    "already complete (checkpoint {}); nothing written. --restart writes it again",
                    options.checkpoint.display()
                );
            } else {
                println!(
                    "backfilled {} items in {} ({} of {} row groups done by an earlier run)",
                    outcome.written,
                    humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64)),
                    outcome.groups_skipped,
                    outcome.groups
                );
            }
            Ok(())
        }
    }
}

fn list_features(registry: &FeatureRegistry, json: bool) -> anyhow::Result<()> {
    let tier = |s: Source| match s {
        Source::Dynamodb => "batch",
        Source::Redis => "real-time",
        Source::Request => "request",
        Source::Cross => "cross",
    };
    // Dense columns, then categorical, then embedding ones, each block in
    // its column order (`col` counts within the block).
    let blocks =
        [("dense", &registry.features), ("categorical", &registry.categorical), ("embedding", &registry.embeddings)];
    let all = blocks.iter().flat_map(|(kind, fs)| fs.iter().enumerate().map(move |(i, f)| (*kind, i, f)));
    for (n, (kind, i, f)) in all.enumerate() {
        let transform = match (f.kind, &f.cross) {
            (_, Some([a, b])) => Some(format!("cross({a}, {b})")),
            (adserve_features::Kind::Categorical, None) => Some(format!("hash({})", f.buckets.unwrap_or(0))),
            (adserve_features::Kind::Embedding, _) => Some(format!("dim {}", f.dim.unwrap_or(0))),
            _ => f.transform.as_ref().map(|t| format!("{t:?}").to_lowercase()),
        };
        let sla = f.freshness_sla.map(|d| match d.as_secs() {
            s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
            s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
            _ => humantime::format_duration(d).to_string(),
        });
        if json {
            let doc = serde_json::json!({
                "column": i, "type": kind, "buckets": f.buckets, "dim": f.dim, "cross": f.cross,
                "name": f.name, "entity": format!("{:?}", f.entity).to_lowercase(),
                "tier": tier(f.source), "attribute": f.attribute, "default": f.default, "range": f.range,
                "transform": transform, "freshness_sla": sla, "owner": f.owner, "personal": f.personal,
                "description": f.description,
            });
            println!("{doc}");
        } else {
            if n == 0 {
                println!(
                    "{:<11} {:>3}  {:<26} {:<8} {:<10} {:<16} {:>8}  {:<30} {:<6} owner",
                    "type", "col", "name", "entity", "tier", "attribute", "default", "transform", "sla"
                );
            }
            println!(
                "{kind:<11} {i:>3}  {:<26} {:<8} {:<10} {:<16} {:>8}  {:<30} {:<6} {}",
                f.name,
                format!("{:?}", f.entity).to_lowercase(),
                tier(f.source),
                f.attribute,
                f.default,
                transform.as_deref().unwrap_or("-"),
                sla.as_deref().unwrap_or("-"),
                f.owner
            );
        }
    }
    Ok(())
}
