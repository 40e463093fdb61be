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

use crate::{BatchingConfig, CtrModel, ModelConfig, ModelError, ModelManifest, QueueKind};

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
    /// Which queue the models it loads feed (the label on their metrics).
    pub queue: QueueKind,
}

impl Loader {
    /// Loads `dir` (or `model.dir`) off the async runtime.
    pub async fn load(&self, dir: Option<PathBuf>) -> Result<CtrModel, ModelError> {
        let mut model = self.model.clone();
        if let Some(dir) = dir {
            model.dir = dir;
        }
        let (batching, max_rows, dylib, queue) = (self.batching.clone(), self.max_rows, self.dylib.clone(), self.queue);
        tokio::task::spawn_blocking(move || CtrModel::load(&model, &batching, max_rows, &dylib, queue)).await.map_err(
            |e| {
                // CtrModel::load counts its own failures; a panic is counted here.
                let e = ModelError::Panicked(e.to_string());
                metrics::counter!("adserve_ranker_model_load_failures_total", "reason" => e.reason()).increment(1);
                e
            },
        )?
    }

    /// Loads a registry record's artifact and checks it is what was
    /// registered: the same version, `model.onnx` and manifest (a
    /// calibration, feature order or input edited on disk after
    /// registration would change what is served without a new version).
    async fn load_record(&self, record: &ModelRecord) -> Result<CtrModel, ModelError> {
        let refuse = |changed: String| {
            let e = ModelError::Mismatch(format!("{changed}: the artifact changed after registration"));
            metrics::counter!("adserve_ranker_model_load_failures_total", "reason" => e.reason()).increment(1);
            e
        };
        // Checked first on the manifest alone, before any session is built
        // (on a GPU, before a TensorRT engine build); a manifest that does not
        // read is left to the load, which says why.
        let dir = PathBuf::from(&record.artifact);
        if let Ok(m) = adserve_registry::read_manifest(&dir.join("manifest.json"))
            && let Some(changed) = registered_difference(&m, record)
        {
            return Err(refuse(changed));
        }
        let loaded = self.load(Some(dir)).await?;
        // Again on what was loaded: the files may have changed meanwhile.
        match registered_difference(loaded.manifest(), record) {
            Some(changed) => Err(refuse(changed)),
            None => Ok(loaded),
        }
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
    // The production model last swapped out, kept warm for a rollback
    // (`registry.keep_previous`), and since when.
    let mut previous: Option<(Arc<CtrModel>, Instant)> = None;
    let shadow_loader = Loader { queue: QueueKind::Shadow, ..loader.clone() };
    loop {
        let expires = previous.as_ref().map(|(_, since)| *since + config.keep_previous);
        let notified = tokio::select! {
            Some(w) = wake.recv() => w == Wake::Changed,
            _ = tick.tick() => false,
            () = until(expires) => {
                if let Some((old, _)) = previous.take() {
                    tracing::info!(version = %old.manifest().model_version, "previous production model unloaded");
                }
                continue;
            }
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
                // A canary promoted to production, or the production model
                // swapped out a moment ago (a rollback), is loaded and warm.
                let reuse = match serving.canary().filter(|c| same(&c.model, prod)) {
                    Some(c) => Some((c.model, "canary")),
                    None => previous.as_ref().filter(|(p, _)| same(p, prod)).map(|(p, _)| (p.clone(), "previous")),
                };
                let started = Instant::now();
                let rolled_back = reuse.as_ref().is_some_and(|(_, from)| *from == "previous");
                let loaded = match reuse {
                    Some((model, from)) => {
                        metrics::counter!("adserve_ranker_model_reused_total", "from" => from).increment(1);
                        Ok(model)
                    }
                    None => {
                        // Not the version kept for a rollback: free it before
                        // loading another (on a GPU, device memory).
                        previous = None;
                        loader.load_record(prod).await.map(Arc::new)
                    }
                };
                match loaded {
                    Ok(next) => {
                        let from = current.manifest().model_version.clone();
                        serving.swap(next, Source::Registry);
                        // The model swapped out stays warm for a rollback to
                        // it, unless this swap was that rollback: the registry
                        // retired it, and a rollback never restores a version
                        // it rolled back from. In-flight calls finish on it
                        // either way.
                        previous = (!config.keep_previous.is_zero() && !rolled_back).then(|| (current, Instant::now()));
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
                _ if refused.allows(Role::Shadow, row, notified) => match shadow_loader.load_record(row).await {
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

/// How `m` (an artifact's manifest) differs from what the registry
/// registered for `record`, or `None` when it is the same.
fn registered_difference(m: &ModelManifest, record: &ModelRecord) -> Option<String> {
    if m.model_version != record.version || !m.onnx_sha256.eq_ignore_ascii_case(&record.onnx_sha256) {
        return Some(format!(
            "{} now holds version {:?} (sha256 {}), the registry registered {:?} (sha256 {})",
            record.artifact, m.model_version, m.onnx_sha256, record.version, record.onnx_sha256
        ));
    }
    manifest_changes(m, &record.manifest).map(|fields| {
        format!("{}/manifest.json differs from the one registered for {} in {fields}", record.artifact, record.version)
    })
}

/// Resolves at `at`, never without one.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The top-level fields in which `loaded` differs from the manifest the
/// registry holds (compared as manifests, so key order and number spelling
/// do not count), or `None` when they are the same.
fn manifest_changes(loaded: &ModelManifest, registered: &serde_json::Value) -> Option<String> {
    let registered = match serde_json::from_value::<ModelManifest>(registered.clone()) {
        Ok(m) if m == *loaded => return None,
        Ok(m) => serde_json::to_value(m).unwrap_or_default(),
        Err(e) => return Some(format!("every field (the registered manifest does not read: {e})")),
    };
    let loaded = serde_json::to_value(loaded).unwrap_or_default();
    let (a, b) = (loaded.as_object(), registered.as_object());
    let mut keys: Vec<&String> = a.into_iter().chain(b).flat_map(|o| o.keys()).collect();
    keys.sort();
    keys.dedup();
    let differ: Vec<&str> = keys
        .into_iter()
        .filter(|k| a.and_then(|o| o.get(*k)) != b.and_then(|o| o.get(*k)))
        .map(String::as_str)
        .collect();
    Some(if differ.is_empty() { "a value".into() } else { differ.join(", ") })
}

/// The loaded model is the registry row's version and file (whether a
/// swap is needed; [`registered_difference`] checks a load).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline() -> (ModelManifest, serde_json::Value) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/ctr-baseline/manifest.json");
        let text = std::fs::read_to_string(path).expect("the committed manifest");
        (serde_json::from_str(&text).expect("a manifest"), serde_json::from_str(&text).expect("json"))
    }

    #[test]
    fn a_manifest_edited_after_registration_is_named_by_the_fields_that_changed() {
        let (loaded, registered) = baseline();
        assert_eq!(manifest_changes(&loaded, &registered), None);
        // Key order is not a change.
        let mut reordered = serde_json::Map::new();
        for (k, v) in registered.as_object().expect("object").iter().rev() {
            reordered.insert(k.clone(), v.clone());
        }
        assert_eq!(manifest_changes(&loaded, &serde_json::Value::Object(reordered)), None);
        // A calibration added on disk, and a feature dropped from the order.
        let mut edited = loaded.clone();
        edited.calibration =
            Some(adserve_registry::Calibration { keep_rate: 0.5, mapping: adserve_registry::Mapping::None });
        edited.feature_order.pop();
        assert_eq!(manifest_changes(&edited, &registered).as_deref(), Some("calibration, feature_order"));
        // A field outside the typed ones (kept in `extra`).
        let mut noted = loaded.clone();
        noted.extra.insert("trainer".into(), "someone else".into());
        assert_eq!(manifest_changes(&noted, &registered).as_deref(), Some("trainer"));
        // A registered manifest that no longer reads.
        let broken = serde_json::json!({"model_version": 3});
        assert!(manifest_changes(&loaded, &broken).expect("a change").starts_with("every field"));
    }
}
