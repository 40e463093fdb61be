//! The model registry in PostgreSQL: which model versions exist, where their
//! artifacts are, what they scored offline, and which stage each is in.
//!
//! Writers are `adservectl models ...` (and tests); followers are the
//! rankers, which LISTEN on [`NOTIFY_CHANNEL`] and poll as a safety net.
//! Every stage change is one transaction that locks the model name's rows,
//! checks the transition ([`Stage::check_promotion`]) and appends to the
//! history, so two operators promoting at once cannot leave two production
//! versions (a partial unique index refuses it too).

pub mod manifest;
pub mod reference;
pub mod stage;

use std::{path::Path, time::Duration};

pub use adserve_catalog::{PostgresConfig, notify};
use adserve_core::{Invalid, check_duration};
pub use manifest::{
    Calibration, InputDtype, ManifestError, Mapping, ModelManifest, TypedInput, read_manifest, read_model_dir,
};
pub use reference::{Arithmetic, REFERENCE_FILE, Reference};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgPool, Postgres, Transaction};
pub use stage::Stage;

/// The schema migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Channel the registry notifies on every insert or stage change; the
/// payload is the model name.
pub const NOTIFY_CHANNEL: &str = "adserve_models";

/// Where the registry lives and which model name a ranker follows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Follow the registry (ranker). Off: serve `model.dir` only.
    pub enabled: bool,
    /// Model name to serve (`adservectl models register --name`).
    pub model_name: String,
    /// The database (its own schema, `model_registry` by default).
    pub postgres: PostgresConfig,
    /// Safety-net poll, for a notification lost while disconnected.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a ranker keeps the production model it swapped out loaded
    /// and warm: a rollback (or a promotion back to it) within this time
    /// swaps back at once instead of loading, checking and warming it again
    /// (on a GPU node: a TensorRT engine build). The cost is that model's
    /// sessions in memory (on a GPU, device memory). 0: dropped at the swap.
    #[serde(with = "humantime_serde")]
    pub keep_previous: Duration,
    /// How long the follower waits for one model load (checksum, sessions,
    /// reference check, warm-up; on a GPU, a TensorRT engine build) before
    /// it refuses the version as `timeout` and is free to load the next one.
    /// A load cannot be cancelled: its thread finishes (or stays blocked on
    /// a hung file system) on its own, and what it built is dropped.
    #[serde(with = "humantime_serde")]
    pub load_timeout: Duration,
}

/// The model name served by default.
pub const DEFAULT_MODEL_NAME: &str = "ctr";

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            model_name: DEFAULT_MODEL_NAME.into(),
            // Followers do not migrate: sqlx holds a database-wide advisory
            // lock while it migrates, and a ranker frozen or partitioned
            // mid-migration would hold it and stall every other migration
            // (the catalog's too). `adservectl` (any command) and
            // `adservectl migrate` own the schema.
            postgres: PostgresConfig {
                schema: "model_registry".into(),
                max_connections: 2,
                timeout: Duration::from_secs(2),
                migrate: false,
                ..PostgresConfig::default()
            },
            poll_interval: Duration::from_secs(10),
            keep_previous: Duration::from_secs(600),
            load_timeout: Duration::from_secs(1800),
        }
    }
}

impl RegistryConfig {
    /// Validation; keys are reported under `registry.`.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_name(&self.model_name).map_err(|why| Invalid::new("registry.model_name", why))?;
        self.postgres.validate().map_err(|e| Invalid::new(format!("registry.{}", e.key), e.why))?;
        if self.postgres.max_connections < 2 {
            return Err(Invalid::new(
                "registry.postgres.max_connections",
                "must be at least 2: one connection is held for LISTEN, the other reads",
            ));
        }
        check_duration(
            "registry.poll_interval",
            self.poll_interval,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        check_duration("registry.keep_previous", self.keep_previous, Duration::ZERO, Duration::from_secs(86_400))?;
        check_duration("registry.load_timeout", self.load_timeout, Duration::from_secs(1), Duration::from_secs(86_400))
    }
}

/// Buckets a canary share is cut into: a share s serves the routing keys
/// whose [`canary_bucket`] is below `s * CANARY_BUCKETS`.
pub const CANARY_BUCKETS: u64 = 10_000;

/// The bucket of a routing key (a user id): FNV-1a 64 of its UTF-8 bytes,
/// mod [`CANARY_BUCKETS`]. Stable across processes, versions and languages,
/// so an analysis job can tell which users a canary served.
pub fn canary_bucket(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % CANARY_BUCKETS
}

/// Whether a canary with `share` serves `key`. Empty keys never go to a
/// canary (anonymous and COPPA traffic stays on production).
pub fn in_canary(key: &str, share: f64) -> bool {
    !key.is_empty() && (canary_bucket(key) as f64) < share * CANARY_BUCKETS as f64
}

/// Model names: what the registry's CHECK constraint accepts.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a model name: 1-64 of a-z 0-9 _ . - starting with a-z or 0-9"))
    }
}

/// A registry failure, each with what an operator needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The database refused or did not answer.
    #[error("model registry database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("model registry migrations: {0}")]
    Migrate(#[from] adserve_catalog::CatalogError),
    /// The model directory is not a servable model.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A bad argument (name, share, path).
    #[error("{0}")]
    Invalid(String),
    /// No such version.
    #[error("model {name} has no version {version:?} (adservectl models list --name {name})")]
    NotFound {
        /// Model name.
        name: String,
        /// Version asked for.
        version: String,
    },
    /// The version is registered already.
    #[error("model {name} version {version:?} is already registered (from {artifact})")]
    AlreadyRegistered {
        /// Model name.
        name: String,
        /// Version.
        version: String,
        /// Where the registered one lives.
        artifact: String,
    },
    /// The stage change is not allowed.
    #[error("cannot move {name} {version:?} from {from} to {to}: {why}")]
    Illegal {
        /// Model name.
        name: String,
        /// Version.
        version: String,
        /// Its stage.
        from: Stage,
        /// The stage asked for.
        to: Stage,
        /// Why not.
        why: String,
    },
    /// Another version holds the (single) canary or shadow slot.
    #[error("{name} already has a {stage} version, {holder:?}: retire or promote it first")]
    Occupied {
        /// Model name.
        name: String,
        /// The slot.
        stage: Stage,
        /// Its holder.
        holder: String,
    },
    /// Nothing to roll back to.
    #[error("cannot roll back {name}: {why}")]
    NoRollback {
        /// Model name.
        name: String,
        /// Why not.
        why: String,
    },
}

/// One registered model version.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelRecord {
    /// Model name.
    pub name: String,
    /// Version (the manifest's `model_version`).
    pub version: String,
    /// Directory with `model.onnx` and `manifest.json`.
    pub artifact: String,
    /// The manifest as registered.
    pub manifest: serde_json::Value,
    /// `model.onnx`'s SHA-256 at registration.
    pub onnx_sha256: String,
    /// Offline metrics.
    pub metrics: serde_json::Value,
    /// Stage.
    pub stage: Stage,
    /// Share of users served, for a canary.
    pub canary_share: f64,
    /// Who registered it.
    pub registered_by: String,
    /// When (RFC 3339).
    pub registered_at: String,
    /// Who changed its stage last.
    pub stage_changed_by: String,
    /// When (RFC 3339).
    pub stage_changed_at: String,
}

#[derive(FromRow)]
struct Row {
    name: String,
    version: String,
    artifact: String,
    manifest: String,
    onnx_sha256: String,
    metrics: String,
    stage: String,
    canary_share: f64,
    registered_by: String,
    registered_at: String,
    stage_changed_by: String,
    stage_changed_at: String,
}

const SELECT: &str = "SELECT name, version, artifact, manifest::text AS manifest, onnx_sha256, metrics::text AS metrics, \
     stage, canary_share, registered_by, \
     to_char(registered_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS registered_at, stage_changed_by, \
     to_char(stage_changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS stage_changed_at FROM models";

impl TryFrom<Row> for ModelRecord {
    type Error = RegistryError;

    fn try_from(r: Row) -> Result<Self, Self::Error> {
        let json = |s: &str| serde_json::from_str(s).map_err(|e| RegistryError::Invalid(format!("stored JSON: {e}")));
        Ok(Self {
            stage: Stage::parse(&r.stage)
                .ok_or_else(|| RegistryError::Invalid(format!("stored stage {:?}", r.stage)))?,
            manifest: json(&r.manifest)?,
            metrics: json(&r.metrics)?,
            name: r.name,
            version: r.version,
            artifact: r.artifact,
            onnx_sha256: r.onnx_sha256,
            canary_share: r.canary_share,
            registered_by: r.registered_by,
            registered_at: r.registered_at,
            stage_changed_by: r.stage_changed_by,
            stage_changed_at: r.stage_changed_at,
        })
    }
}

/// One entry of a model's stage history.
#[derive(Debug, Clone, Serialize, PartialEq, FromRow)]
pub struct StageChange {
    /// Version.
    pub version: String,
    /// Stage before (none for the registration).
    pub from_stage: Option<String>,
    /// Stage after.
    pub to_stage: String,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// Made by a rollback.
    pub rollback: bool,
    /// When (RFC 3339, UTC, milliseconds).
    pub at: String,
}

/// What a promotion or rollback changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Moved {
    /// Version.
    pub version: String,
    /// From.
    pub from: Stage,
    /// To.
    pub to: Stage,
}

/// The registry over a PostgreSQL pool.
#[derive(Debug, Clone)]
pub struct Registry {
    pool: PgPool,
    schema: String,
    /// Set once migrations succeeded: later calls are no-ops.
    migrated: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Registry {
    /// Connects lazily (see [`adserve_catalog::pool_lazy`]).
    pub fn connect_lazy(config: &PostgresConfig) -> Result<Self, RegistryError> {
        Ok(Self {
            pool: adserve_catalog::pool_lazy(config)?,
            schema: config.schema.clone(),
            migrated: Default::default(),
        })
    }

    /// The pool (for LISTEN).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the schema and applies pending migrations, once per
    /// `Registry` (and its clones): after a success, a no-op.
    pub async fn migrate(&self) -> Result<(), RegistryError> {
        use std::sync::atomic::Ordering;
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        adserve_catalog::migrate(&self.pool, &self.schema, &MIGRATOR).await?;
        self.migrated.store(true, Ordering::Release);
        Ok(())
    }

    /// Registers the model in `dir` under `name` as a candidate. The
    /// manifest, the file's checksum and its `reference.json` (if any: see
    /// [`Reference::read`]) are checked first, so a model the ranker would
    /// refuse at load is refused here, before anyone promotes it. The version
    /// is the manifest's `model_version`; `dir` is stored as an absolute path.
    pub async fn register(&self, name: &str, dir: &Path, actor: &str) -> Result<ModelRecord, RegistryError> {
        check_name(name).map_err(RegistryError::Invalid)?;
        check_actor(actor)?;
        let (manifest, _) = read_model_dir(dir)?;
        Reference::read(dir, &manifest).map_err(|why| RegistryError::Invalid(format!("{REFERENCE_FILE}: {why}")))?;
        let artifact = std::fs::canonicalize(dir)
            .map_err(|e| RegistryError::Invalid(format!("{}: {e}", dir.display())))?
            .to_str()
            .ok_or_else(|| RegistryError::Invalid(format!("{} is not UTF-8", dir.display())))?
            .to_string();
        let manifest_json =
            serde_json::to_string(&manifest).map_err(|e| RegistryError::Invalid(format!("manifest: {e}")))?;
        let metrics = manifest.metrics().to_string();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO models (name, version, artifact, manifest, onnx_sha256, metrics, registered_by, stage_changed_by) \
             VALUES ($1, $2, $3, $4::jsonb, $5, $6::jsonb, $7, $7) ON CONFLICT (name, version) DO NOTHING",
        )
        .bind(name)
        .bind(&manifest.model_version)
        .bind(&artifact)
        .bind(&manifest_json)
        .bind(manifest.onnx_sha256.to_ascii_lowercase())
        .bind(&metrics)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            drop(tx);
            let existing = self.get(name, &manifest.model_version).await?;
            return Err(RegistryError::AlreadyRegistered {
                name: name.into(),
                version: manifest.model_version,
                artifact: existing.artifact,
            });
        }
        let change = Change { actor, reason: "registered", rollback: false };
        record_change(&mut tx, name, &manifest.model_version, None, Stage::Candidate, &change).await?;
        tx.commit().await?;
        self.get(name, &manifest.model_version).await
    }

    /// One version.
    pub async fn get(&self, name: &str, version: &str) -> Result<ModelRecord, RegistryError> {
        let sql = format!("{SELECT} WHERE name = $1 AND version = $2");
        let row = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| RegistryError::NotFound { name: name.into(), version: version.into() })?;
        row.try_into()
    }

    /// Every version (of `name`, or of every model), newest first.
    pub async fn list(&self, name: Option<&str>) -> Result<Vec<ModelRecord>, RegistryError> {
        let sql =
            format!("{SELECT} WHERE $1::text IS NULL OR name = $1 ORDER BY name, registered_at DESC, version DESC");
        let rows = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql)).bind(name).fetch_all(&self.pool).await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    /// The versions of `name` that serve traffic in some way: production,
    /// canary and shadow.
    pub async fn serving(&self, name: &str) -> Result<Vec<ModelRecord>, RegistryError> {
        let sql = format!("{SELECT} WHERE name = $1 AND stage IN ('production', 'canary', 'shadow') ORDER BY stage");
        let rows = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql)).bind(name).fetch_all(&self.pool).await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    /// The stage history of `name`, oldest first.
    pub async fn history(&self, name: &str) -> Result<Vec<StageChange>, RegistryError> {
        Ok(sqlx::query_as::<_, StageChange>(
            "SELECT version, from_stage, to_stage, actor, reason, rollback, \
             to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at \
             FROM model_stage_changes WHERE name = $1 ORDER BY id",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Moves `version` to stage `to`. Promoting to production retires the
    /// current production version in the same transaction; a canary needs a
    /// share in (0, 1]; the canary and shadow slots hold one version each.
    pub async fn promote(
        &self,
        name: &str,
        version: &str,
        to: Stage,
        canary_share: Option<f64>,
        actor: &str,
        reason: &str,
    ) -> Result<Vec<Moved>, RegistryError> {
        check_actor(actor)?;
        let share = match (to, canary_share) {
            (Stage::Canary, Some(s)) if valid_share(s) => s,
            (Stage::Canary, other) => {
                return Err(RegistryError::Invalid(format!(
                    "a canary needs --canary-share in (0, 1], got {}",
                    other.map_or("none".into(), |s| s.to_string())
                )));
            }
            (_, Some(_)) => return Err(RegistryError::Invalid("--canary-share applies to canary only".into())),
            (_, None) => 0.0,
        };
        let change = Change { actor, reason, rollback: false };
        let mut tx = self.pool.begin().await?;
        let rows = lock(&mut tx, name).await?;
        let from = stage_in(&rows, name, version)?;
        from.check_promotion(to).map_err(|why| RegistryError::Illegal {
            name: name.into(),
            version: version.into(),
            from,
            to,
            why,
        })?;
        let mut moved = Vec::new();
        if let Some((holder, _)) = rows.iter().find(|(v, s)| *s == to && v != version) {
            match to {
                Stage::Production => {
                    set_stage(&mut tx, name, holder, Stage::Production, Stage::Retired, 0.0, &change).await?;
                    moved.push(Moved { version: holder.clone(), from: Stage::Production, to: Stage::Retired });
                }
                Stage::Canary | Stage::Shadow => {
                    return Err(RegistryError::Occupied { name: name.into(), stage: to, holder: holder.clone() });
                }
                Stage::Candidate | Stage::Retired => {}
            }
        }
        set_stage(&mut tx, name, version, from, to, share, &change).await?;
        moved.push(Moved { version: version.into(), from, to });
        tx.commit().await?;
        Ok(moved)
    }

    /// Changes the share of users a canary serves (a ramp, 0.05 -> 0.3, or a
    /// cut), keeping it canary: the rankers re-route on the notification
    /// without reloading it, and users already in the canary stay in it
    /// while the share grows (the bucket of a user id is fixed). Recorded in
    /// the history as canary -> canary, with the old and new share.
    pub async fn set_canary_share(
        &self,
        name: &str,
        version: &str,
        share: f64,
        actor: &str,
        reason: &str,
    ) -> Result<Moved, RegistryError> {
        check_actor(actor)?;
        if !valid_share(share) {
            return Err(RegistryError::Invalid(format!("--share must be in (0, 1], got {share}")));
        }
        let mut tx = self.pool.begin().await?;
        let rows = lock(&mut tx, name).await?;
        let stage = stage_in(&rows, name, version)?;
        if stage != Stage::Canary {
            return Err(RegistryError::Invalid(format!(
                "{name} {version:?} is {}, not canary: only a canary has a share (promote it --to canary \
                 --canary-share S first)",
                stage.as_str()
            )));
        }
        let (was,): (f64,) = sqlx::query_as("SELECT canary_share FROM models WHERE name = $1 AND version = $2")
            .bind(name)
            .bind(version)
            .fetch_one(&mut *tx)
            .await?;
        let noted = format!("canary share {was} -> {share}");
        let reason = if reason.is_empty() { noted } else { format!("{noted}: {reason}") };
        let change = Change { actor, reason: &reason, rollback: false };
        set_stage(&mut tx, name, version, Stage::Canary, Stage::Canary, share, &change).await?;
        tx.commit().await?;
        Ok(Moved { version: version.into(), from: Stage::Canary, to: Stage::Canary })
    }

    /// Puts back the version that was production before the current one and
    /// retires the current one, in one transaction.
    pub async fn rollback(&self, name: &str, actor: &str, reason: &str) -> Result<Vec<Moved>, RegistryError> {
        check_actor(actor)?;
        let no = |why: String| RegistryError::NoRollback { name: name.into(), why };
        let mut tx = self.pool.begin().await?;
        let rows = lock(&mut tx, name).await?;
        let current = rows
            .iter()
            .find(|(_, s)| *s == Stage::Production)
            .map(|(v, _)| v.clone())
            .ok_or_else(|| no("it has no production version".into()))?;
        // The production history as a stack: a promotion pushes its version,
        // a rollback pops the version it retired. The one under the top is
        // what a rollback restores, so rollbacks walk back one reign at a time.
        let reigns: Vec<(String, bool)> = sqlx::query_as(
            "SELECT version, rollback FROM model_stage_changes WHERE name = $1 AND to_stage = 'production' ORDER BY id",
        )
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        let stack = production_stack(&reigns);
        if stack.last() != Some(&current) {
            return Err(no(format!(
                "its history does not end with the current production version {current:?}; promote a version explicitly"
            )));
        }
        let previous = stack
            .len()
            .checked_sub(2)
            .map(|i| stack[i].clone())
            .ok_or_else(|| no(format!("{current:?} has no earlier production version to go back to")))?;
        let stage = rows.iter().find(|(v, _)| *v == previous).map(|(_, s)| *s);
        if stage != Some(Stage::Retired) {
            return Err(no(format!(
                "the previous production version {previous:?} is {} now, not retired; promote a version explicitly",
                stage.map_or("gone", |s| s.as_str())
            )));
        }
        let reason = if reason.is_empty() { "rollback" } else { reason };
        let rollback = Change { actor, reason, rollback: true };
        set_stage(&mut tx, name, &current, Stage::Production, Stage::Retired, 0.0, &rollback).await?;
        set_stage(&mut tx, name, &previous, Stage::Retired, Stage::Production, 0.0, &rollback).await?;
        tx.commit().await?;
        Ok(vec![
            Moved { version: current, from: Stage::Production, to: Stage::Retired },
            Moved { version: previous, from: Stage::Retired, to: Stage::Production },
        ])
    }
}

fn check_actor(actor: &str) -> Result<(), RegistryError> {
    if actor.trim().is_empty() || actor.len() > 128 {
        return Err(RegistryError::Invalid("the actor (--actor, default $USER) must be 1 to 128 bytes".into()));
    }
    Ok(())
}

/// Locks every version of `name` for the transaction; (version, stage).
async fn lock(tx: &mut Transaction<'static, Postgres>, name: &str) -> Result<Vec<(String, Stage)>, RegistryError> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT version, stage FROM models WHERE name = $1 ORDER BY version FOR UPDATE")
            .bind(name)
            .fetch_all(&mut **tx)
            .await?;
    if rows.is_empty() {
        return Err(RegistryError::Invalid(format!("no model named {name:?} is registered")));
    }
    rows.into_iter()
        .map(|(v, s)| {
            let stage = Stage::parse(&s).ok_or_else(|| RegistryError::Invalid(format!("stored stage {s:?}")))?;
            Ok((v, stage))
        })
        .collect()
}

/// A canary's share of users: in (0, 1] (NaN is not).
fn valid_share(share: f64) -> bool {
    share > 0.0 && share <= 1.0
}

/// The stage of `version` among the locked `rows` of model `name`.
fn stage_in(rows: &[(String, Stage)], name: &str, version: &str) -> Result<Stage, RegistryError> {
    rows.iter()
        .find(|(v, _)| v == version)
        .map(|(_, s)| *s)
        .ok_or_else(|| RegistryError::NotFound { name: name.into(), version: version.into() })
}

/// Who made a change, why, and whether it is a rollback.
struct Change<'a> {
    actor: &'a str,
    reason: &'a str,
    rollback: bool,
}

/// Production versions in reign order, from the `(version, rollback)` of
/// every change into production: a promotion pushes; a rollback pops the
/// version it retired (the one it restores is then on top).
fn production_stack(reigns: &[(String, bool)]) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    for (version, rollback) in reigns {
        if *rollback {
            stack.pop();
            if stack.last() != Some(version) {
                // History edited by hand: restart from what it says now.
                stack.push(version.clone());
            }
        } else {
            stack.push(version.clone());
        }
    }
    stack
}

async fn set_stage(
    tx: &mut Transaction<'static, Postgres>,
    name: &str,
    version: &str,
    from: Stage,
    to: Stage,
    canary_share: f64,
    change: &Change<'_>,
) -> Result<(), RegistryError> {
    sqlx::query(
        "UPDATE models SET stage = $3, canary_share = $4, stage_changed_by = $5, stage_changed_at = now() \
         WHERE name = $1 AND version = $2",
    )
    .bind(name)
    .bind(version)
    .bind(to.as_str())
    .bind(canary_share)
    .bind(change.actor)
    .execute(&mut **tx)
    .await?;
    record_change(tx, name, version, Some(from), to, change).await
}

async fn record_change(
    tx: &mut Transaction<'static, Postgres>,
    name: &str,
    version: &str,
    from: Option<Stage>,
    to: Stage,
    change: &Change<'_>,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO model_stage_changes (name, version, from_stage, to_stage, actor, reason, rollback) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(name)
    .bind(version)
    .bind(from.map(Stage::as_str))
    .bind(to.as_str())
    .bind(change.actor)
    .bind(change.reason)
    .bind(change.rollback)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_match_the_registry_constraint() {
        for ok in ["ctr", "ctr-v2", "ctr_dcn.2", "0ctr"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "CTR", "-ctr", "ctr v2", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn canary_routing_is_deterministic_and_serves_its_share() {
        // FNV-1a 64 reference values (empty input: the offset basis).
        assert_eq!(canary_bucket(""), 0xcbf2_9ce4_8422_2325 % CANARY_BUCKETS);
        assert_eq!(canary_bucket("a"), 0xaf63_dc4c_8601_ec8c % CANARY_BUCKETS);
        let keys: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        for share in [0.01, 0.05, 0.3, 0.5] {
            let served = keys.iter().filter(|k| in_canary(k, share)).count() as f64 / keys.len() as f64;
            assert!((served - share).abs() < 0.02, "share {share}: served {served}");
        }
        assert!(keys.iter().all(|k| in_canary(k, 1.0)));
        assert!(!keys.iter().any(|k| in_canary(k, 0.0)));
        assert!(!in_canary("", 1.0), "anonymous traffic stays on production");
        // A bigger share serves a superset: users in a 5% canary stay in it at 30%.
        assert!(keys.iter().filter(|k| in_canary(k, 0.05)).all(|k| in_canary(k, 0.3)));
    }

    #[test]
    fn rollbacks_walk_back_one_reign_at_a_time() {
        let r = |v: &str, rb: bool| (v.to_string(), rb);
        // v1, v2, v3 promoted; rollback to v2; rollback to v1.
        let mut h = vec![r("v1", false), r("v2", false), r("v3", false)];
        assert_eq!(production_stack(&h), ["v1", "v2", "v3"]);
        h.push(r("v2", true));
        assert_eq!(production_stack(&h), ["v1", "v2"]);
        h.push(r("v1", true));
        assert_eq!(production_stack(&h), ["v1"]);
        // A promotion after rollbacks stacks on what serves.
        h.push(r("v4", false));
        assert_eq!(production_stack(&h), ["v1", "v4"]);
        // A version promoted twice appears twice, like its two reigns.
        assert_eq!(production_stack(&[r("v1", false), r("v2", false), r("v1", false)]), ["v1", "v2", "v1"]);
    }

    #[test]
    fn defaults_validate() {
        RegistryConfig::default().validate().expect("defaults");
        let c = RegistryConfig { model_name: "Bad".into(), ..RegistryConfig::default() };
        assert_eq!(c.validate().unwrap_err().key, "registry.model_name");
    }
}
