//! The model a ranker serves, and how it follows the model registry.
//!
//! [`Serving`] holds the production model behind an atomic pointer. A Score
//! call takes its own reference at the start and finishes on that model, so
//! a swap never fails or drops a call in flight: the old model's queue keeps
//! scoring until its last call is answered, then its session threads exit.
//!
//! [`follow`] keeps `Serving` equal to the registry: on every notification
//! (LISTEN `adserve_models`) and every `registry.poll_interval` it reads the
//! model name's production version and, when it differs from the one
//! served, loads it beside the old one (checksum, graph checks, warm-up on
//! every session), then swaps. A version that fails its checks is refused
//! with a log line and `adserve_ranker_model_swaps_total{result="refused"}`;
//! the previous one keeps serving. A refused version is retried on the next
//! notification for the model, or on a poll once its backoff has passed
//! (from `poll_interval`, doubling to 15 minutes), so a transient failure
//! heals and a bad artifact is not reloaded every few seconds.
//!
//! Every registry call is bounded on the client side too (a frozen
//! PostgreSQL holds a query past its `statement_timeout`), and the LISTEN
//! connection is probed when idle, so a peer that hangs costs at most a
//! poll, and following resumes when it comes back.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use adserve_registry::{ModelRecord, NOTIFY_CHANNEL, Registry, RegistryConfig, RegistryError, Stage};
use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::{BatchingConfig, CtrModel, ModelConfig, ModelError};

/// Where the served model came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `model.dir` from config (the registry is off, unreachable at start,
    /// or has no production version for the name).
    Config,
    /// The registry's production version.
    Registry,
}

impl Source {
    fn as_str(&self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Registry => "registry",
        }
    }
}

/// Which of the served models scored a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The production model.
    Production,
    /// The canary.
    Canary,
    /// The shadow (scores off the critical path, never served).
    Shadow,
}

impl Role {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Production => "production",
            Self::Canary => "canary",
            Self::Shadow => "shadow",
        }
    }
}

/// A canary model and the share of routing keys it serves.
#[derive(Clone)]
pub struct Canary {
    /// The model.
    pub model: Arc<CtrModel>,
    /// Share in (0, 1].
    pub share: f64,
}

#[derive(Clone)]
struct Active {
    model: Arc<CtrModel>,
    source: Source,
    canary: Option<Canary>,
    shadow: Option<Arc<CtrModel>>,
}

/// The production model and the canary, swapped atomically.
pub struct Serving {
    active: ArcSwap<Active>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = self.active.load();
        f.debug_struct("Serving")
            .field("model", &a.model)
            .field("source", &a.source)
            .field("canary", &a.canary.as_ref().map(|c| (c.model.manifest().model_version.clone(), c.share)))
            .finish()
    }
}

impl Serving {
    /// Serving `model`, no canary.
    pub fn new(model: CtrModel, source: Source) -> Self {
        let this = Self {
            active: ArcSwap::from_pointee(Active { model: Arc::new(model), source, canary: None, shadow: None }),
        };
        this.publish(None);
        this
    }

    /// The production model (the caller keeps it alive).
    pub fn production(&self) -> Arc<CtrModel> {
        self.active.load().model.clone()
    }

    /// The model for a call with `routing_key`: the canary for its share of
    /// keys ([`adserve_registry::in_canary`]), production otherwise.
    pub fn route(&self, routing_key: &str) -> (Arc<CtrModel>, Role) {
        let a = self.active.load();
        match &a.canary {
            Some(c) if adserve_registry::in_canary(routing_key, c.share) => (c.model.clone(), Role::Canary),
            _ => (a.model.clone(), Role::Production),
        }
    }

    /// The canary, if one is served.
    pub fn canary(&self) -> Option<Canary> {
        self.active.load().canary.clone()
    }

    /// The shadow model, if one is loaded.
    pub fn shadow(&self) -> Option<Arc<CtrModel>> {
        self.active.load().shadow.clone()
    }

    /// Scores calls with `shadow` (or none) beside production from now on.
    pub fn set_shadow(&self, shadow: Option<Arc<CtrModel>>) {
        let old = self.active.rcu(|a| Active { shadow: shadow.clone(), ..(**a).clone() });
        self.publish(Some(&*old));
    }

    /// Serves `model` as production from now on (the canary stays); calls
    /// already holding the old one finish on it.
    pub fn swap(&self, model: Arc<CtrModel>, source: Source) {
        let old = self.active.rcu(|a| Active { model: model.clone(), source: source.clone(), ..(**a).clone() });
        self.publish(Some(&*old));
    }

    /// Serves `canary` (or none) beside production from now on.
    pub fn set_canary(&self, canary: Option<Canary>) {
        let old = self.active.rcu(|a| Active { canary: canary.clone(), ..(**a).clone() });
        self.publish(Some(&*old));
    }

    fn publish(&self, old: Option<&Active>) {
        let info = |a: &Active, on: f64| {
            let served = std::iter::once((&a.model, a.source.as_str(), Role::Production))
                .chain(a.canary.as_ref().map(|c| (&c.model, "registry", Role::Canary)))
                .chain(a.shadow.as_ref().map(|s| (s, "registry", Role::Shadow)));
            for (model, source, role) in served {
                metrics::gauge!(
                    "adserve_ranker_model_info",
                    "model_version" => model.manifest().model_version.clone(),
                    "source" => source,
                    "role" => role.as_str(),
                )
                .set(on);
            }
        };
        if let Some(old) = old {
            info(old, 0.0);
        }
        info(&self.active.load(), 1.0);
    }
}

/// How the ranker loads models: the settings every version is loaded with.
#[derive(Debug, Clone)]
pub struct Loader {
    /// Model settings (`dir` is replaced by a registry artifact's).
    pub model: ModelConfig,
    /// Batching settings.
    pub batching: BatchingConfig,
    /// Largest call (warmed up at load).
    pub max_rows: usize,
    /// `libonnxruntime.so`.
    pub dylib: String,
}

impl Loader {
    /// Loads `dir` (or `model.dir`) off the async runtime.
    pub async fn load(&self, dir: Option<PathBuf>) -> Result<CtrModel, ModelError> {
        let mut model = self.model.clone();
        if let Some(dir) = dir {
            model.dir = dir;
        }
        let (batching, max_rows, dylib) = (self.batching.clone(), self.max_rows, self.dylib.clone());
        tokio::task::spawn_blocking(move || CtrModel::load(&model, &batching, max_rows, &dylib))
            .await
            .map_err(|e| ModelError::Panicked(e.to_string()))?
    }

    /// Loads a registry record's artifact and checks it is what was
    /// registered.
    async fn load_record(&self, record: &ModelRecord) -> Result<CtrModel, ModelError> {
        let loaded = self.load(Some(record.artifact.clone().into())).await?;
        if !same(&loaded, record) {
            let m = loaded.manifest();
            return Err(ModelError::Mismatch(format!(
                "{} now holds version {:?} (sha256 {}), the registry registered {:?} (sha256 {}): the artifact \
                 changed after registration",
                record.artifact, m.model_version, m.onnx_sha256, record.version, record.onnx_sha256
            )));
        }
        Ok(loaded)
    }
}

/// A registry call bounded on the client side: the query's statement
/// timeout, plus the wait for a connection, plus slack.
async fn bounded<T>(
    config: &RegistryConfig,
    what: &'static str,
    call: impl Future<Output = Result<T, RegistryError>>,
) -> Result<T, String> {
    let limit = config.postgres.timeout * 2 + Duration::from_secs(1);
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {limit:?}")),
    }
}

/// Loads the model the ranker starts with: the registry's production version
/// when the registry is on, answers in time and has one that passes its
/// checks; otherwise `model.dir`. Never fails over the registry: only a
/// `model.dir` that cannot be served stops the start.
pub async fn initial(
    registry: Option<&Registry>,
    config: &RegistryConfig,
    loader: &Loader,
) -> Result<Serving, ModelError> {
    if let Some(registry) = registry {
        let lookup = async {
            if config.postgres.migrate {
                registry.migrate().await?;
            }
            registry.serving(&config.model_name).await
        };
        match bounded(config, "reading the production version", lookup).await {
            Ok(rows) => match rows.into_iter().find(|r| r.stage == Stage::Production) {
                Some(prod) => match loader.load_record(&prod).await {
                    Ok(m) => return Ok(Serving::new(m, Source::Registry)),
                    Err(e) => tracing::error!(version = %prod.version, error = %e,
                        "registry production model refused; serving model.dir"),
                },
                None => tracing::info!(name = %config.model_name,
                    "the registry has no production version; serving model.dir"),
            },
            Err(e) => tracing::warn!(error = %e,
                "model registry unavailable at start; serving model.dir, following it in the background"),
        }
    }
    Ok(Serving::new(loader.load(None).await?, Source::Config))
}

/// Why the follower woke up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// A NOTIFY for this model name.
    Changed,
    /// The LISTEN connection was (re)established: notifications may have
    /// been missed, so look (like a poll).
    Resync,
}

/// A version the ranker refused, and when to try it again.
struct Refused {
    key: (String, String),
    retry_at: Instant,
    backoff: Duration,
}

/// Follows the registry until the process ends (spawn it).
pub async fn follow(registry: Registry, config: RegistryConfig, loader: Loader, serving: Arc<Serving>) {
    let (wake_tx, mut wake) = mpsc::channel(16);
    tokio::spawn(listen(registry.clone(), config.model_name.clone(), wake_tx));
    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused = RefusedVersions::default();
    loop {
        let notified = tokio::select! {
            Some(w) = wake.recv() => w == Wake::Changed,
            _ = tick.tick() => false,
        };
        // Registry::migrate runs the migrations once per process (a no-op
        // after initial() or an earlier pass succeeded).
        if config.postgres.migrate
            && let Err(e) = bounded(&config, "migrations", registry.migrate()).await
        {
            metrics::counter!("adserve_ranker_registry_errors_total").increment(1);
            tracing::warn!(error = %e, "model registry: migrations failed; retrying");
            continue;
        }
        let rows = match bounded(&config, "reading the production version", registry.serving(&config.model_name)).await
        {
            Ok(rows) => rows,
            Err(e) => {
                metrics::counter!("adserve_ranker_registry_errors_total").increment(1);
                tracing::warn!(error = %e, "model registry unavailable; still serving the current model");
                continue;
            }
        };
        if let Some(prod) = rows.iter().find(|r| r.stage == Stage::Production) {
            let current = serving.production();
            if !same(&current, prod) && refused.allows(Role::Production, prod, notified) {
                // A canary promoted to production is already loaded and warm.
                let reuse = serving.canary().filter(|c| same(&c.model, prod)).map(|c| c.model);
                let started = Instant::now();
                let loaded = match reuse {
                    Some(model) => Ok(model),
                    None => loader.load_record(prod).await.map(Arc::new),
                };
                match loaded {
                    Ok(next) => {
                        let from = current.manifest().model_version.clone();
                        drop(current);
                        serving.swap(next, Source::Registry);
                        refused.clear(Role::Production);
                        metrics::counter!("adserve_ranker_model_swaps_total", "result" => "swapped").increment(1);
                        tracing::info!(%from, to = %prod.version, took = ?started.elapsed(), "model swapped");
                    }
                    Err(e) => refused.refuse(Role::Production, prod, &e, config.poll_interval),
                }
            }
        }
        match rows.iter().find(|r| r.stage == Stage::Shadow) {
            None => {
                if let Some(old) = serving.shadow() {
                    serving.set_shadow(None);
                    tracing::info!(version = %old.manifest().model_version, "shadow removed");
                }
            }
            Some(row) => match serving.shadow() {
                Some(s) if same(&s, row) => {}
                _ if refused.allows(Role::Shadow, row, notified) => match loader.load_record(row).await {
                    Ok(model) => {
                        serving.set_shadow(Some(Arc::new(model)));
                        refused.clear(Role::Shadow);
                        metrics::counter!("adserve_ranker_model_swaps_total", "result" => "shadow").increment(1);
                        tracing::info!(version = %row.version, "shadow scoring");
                    }
                    Err(e) => refused.refuse(Role::Shadow, row, &e, config.poll_interval),
                },
                _ => {}
            },
        }
        match rows.iter().find(|r| r.stage == Stage::Canary) {
            None => {
                if let Some(old) = serving.canary() {
                    serving.set_canary(None);
                    tracing::info!(version = %old.model.manifest().model_version, "canary removed");
                }
            }
            Some(row) => match serving.canary() {
                Some(c) if same(&c.model, row) && c.share != row.canary_share => {
                    serving.set_canary(Some(Canary { model: c.model, share: row.canary_share }));
                    tracing::info!(version = %row.version, share = row.canary_share, "canary share changed");
                }
                Some(c) if same(&c.model, row) => {}
                _ if refused.allows(Role::Canary, row, notified) => match loader.load_record(row).await {
                    Ok(model) => {
                        serving.set_canary(Some(Canary { model: Arc::new(model), share: row.canary_share }));
                        refused.clear(Role::Canary);
                        metrics::counter!("adserve_ranker_model_swaps_total", "result" => "canary").increment(1);
                        tracing::info!(version = %row.version, share = row.canary_share, "canary serving");
                    }
                    Err(e) => refused.refuse(Role::Canary, row, &e, config.poll_interval),
                },
                _ => {}
            },
        }
    }
}

/// The loaded model is the registry row's version and file.
fn same(model: &CtrModel, row: &ModelRecord) -> bool {
    let m = model.manifest();
    m.model_version == row.version && m.onnx_sha256.eq_ignore_ascii_case(&row.onnx_sha256)
}

/// Versions refused per role, and when each may be tried again.
#[derive(Default)]
struct RefusedVersions {
    by_role: Vec<(Role, Refused)>,
}

impl RefusedVersions {
    /// A notification always allows a retry; a poll only after the backoff.
    fn allows(&self, role: Role, row: &ModelRecord, notified: bool) -> bool {
        let key = (row.version.clone(), row.onnx_sha256.clone());
        match self.by_role.iter().find(|(r, _)| *r == role) {
            Some((_, refused)) if refused.key == key => notified || Instant::now() >= refused.retry_at,
            _ => true,
        }
    }

    fn clear(&mut self, role: Role) {
        self.by_role.retain(|(r, _)| *r != role);
    }

    fn refuse(&mut self, role: Role, row: &ModelRecord, e: &ModelError, poll: Duration) {
        let key = (row.version.clone(), row.onnx_sha256.clone());
        let backoff = match self.by_role.iter().find(|(r, _)| *r == role) {
            Some((_, r)) if r.key == key => (r.backoff * 2).min(Duration::from_secs(15 * 60)),
            _ => poll,
        };
        self.clear(role);
        self.by_role.push((role, Refused { key, retry_at: Instant::now() + backoff, backoff }));
        metrics::counter!("adserve_ranker_model_swaps_total", "result" => "refused").increment(1);
        tracing::error!(role = role.as_str(), version = %row.version, artifact = %row.artifact, error = %e,
            retry_in = ?backoff, "registry model refused; the models already serving keep serving");
    }
}

/// Forwards notifications for `name`, reconnecting forever. A (re)connect
/// asks for a resync: notifications sent while disconnected are lost.
async fn listen(registry: Registry, name: String, wake: mpsc::Sender<Wake>) {
    use adserve_registry::notify::{Notice, listen_forever};
    listen_forever(
        registry.pool().clone(),
        NOTIFY_CHANNEL,
        "model registry",
        || true,
        |notice| {
            match notice {
                Notice::Payload(p) if p == name => {
                    let _ = wake.try_send(Wake::Changed);
                }
                Notice::Payload(_) => {}
                Notice::Resync => {
                    let _ = wake.try_send(Wake::Resync);
                }
            }
            true
        },
    )
    .await;
}
