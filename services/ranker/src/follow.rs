//! The model a ranker serves, and how it follows the model registry.
//!
//! [`Serving`] holds the production model behind an atomic pointer. A Score
//! call takes its own reference at the start and finishes on that model, so
//! a swap never fails or drops a call in flight: the old model's queue keeps
//! scoring until its last call is answered, then its session threads exit.
//!
//! [`follow`] keeps `Serving` equal to the registry: on every notification
//! (LISTEN `adserve_models`) and every `registry.poll_interval` it reads the
//! model name's production, canary and shadow versions. A change that needs
//! no load (a rollback to the model kept warm, a canary promoted, a share
//! changed, a version removed) takes effect at once; a new version is
//! loaded beside the old one (checksum, graph checks, warm-up on every
//! session) in a task of its own, bounded by `registry.load_timeout`, and
//! swapped in when it is ready, if the registry (read again then) still
//! wants it. So a rollback, a removal or a share change never waits for a
//! load, and a role never waits for another role's load (production behind
//! a shadow's TensorRT engine build, say); a role loads one version at a
//! time, so a new version for it waits for the one it is loading (bounded
//! by the timeout; a load that ran out of time cannot be cancelled: its
//! role loads nothing else until its thread ends, and what that thread
//! built is then served if the registry still wants it). A finished load is
//! applied only after a fresh registry read: while PostgreSQL cannot be read
//! it waits. A version that fails its checks is refused
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
        let this = self.clone();
        joined(tokio::task::spawn_blocking(move || this.load_blocking(dir)).await)
    }

    fn load_blocking(&self, dir: Option<PathBuf>) -> Result<CtrModel, ModelError> {
        let mut model = self.model.clone();
        if let Some(dir) = dir {
            model.dir = dir;
        }
        CtrModel::load(&model, &self.batching, self.max_rows, &self.dylib, self.queue)
    }

    /// Loads a registry record's artifact and checks it is what was
    /// registered: the same version, `model.onnx` and manifest (a
    /// calibration, feature order or input edited on disk after
    /// registration would change what is served without a new version).
    /// Blocking, every file read included: a hung file system holds this
    /// thread, never the async runtime.
    fn load_record_blocking(&self, record: &ModelRecord) -> Result<CtrModel, ModelError> {
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
        let loaded = self.load_blocking(Some(dir))?;
        // Again on what was loaded: the files may have changed meanwhile.
        match registered_difference(loaded.manifest(), record) {
            Some(changed) => Err(refuse(changed)),
            None => Ok(loaded),
        }
    }
}

/// A blocking load's result; a panic in it is counted here (CtrModel::load
/// counts its own failures).
fn joined(r: Result<Result<CtrModel, ModelError>, tokio::task::JoinError>) -> Result<CtrModel, ModelError> {
    r.map_err(|e| {
        let e = ModelError::Panicked(e.to_string());
        metrics::counter!("adserve_ranker_model_load_failures_total", "reason" => e.reason()).increment(1);
        e
    })?
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

/// A blocking load bounded by `limit`, as every registry load is: its
/// result, or past the limit `TimedOut` (counted in
/// `adserve_ranker_model_load_failures_total{reason="timeout"}`) and the
/// thread, which cannot be cancelled and runs on.
async fn within(
    limit: Duration,
    load: impl FnOnce() -> Result<CtrModel, ModelError> + Send + 'static,
) -> (Result<CtrModel, ModelError>, Option<LoadThread>) {
    let mut job = tokio::task::spawn_blocking(load);
    tokio::select! {
        loaded = &mut job => (joined(loaded), None),
        () = tokio::time::sleep(limit) => {
            let e = ModelError::TimedOut(limit);
            metrics::counter!("adserve_ranker_model_load_failures_total", "reason" => e.reason()).increment(1);
            (Err(e), Some(job))
        }
    }
}

/// A load's blocking thread, still running past its time limit.
type LoadThread = tokio::task::JoinHandle<Result<CtrModel, ModelError>>;

/// The start's load of the registry's production version, given up on
/// after `registry.load_timeout` (the ranker serves `model.dir` meanwhile):
/// [`follow`] takes it over, and what it builds serves once it ends if the
/// registry still wants that version, as for any load that ran out of time.
pub struct HeldLoad {
    row: ModelRecord,
    started: Instant,
    thread: LoadThread,
}

/// What the ranker starts with: the model it serves, and the start's
/// registry load still running past its time limit, if any (hand it to
/// [`follow`]).
pub struct Start {
    /// The production model (the registry's, or `model.dir`).
    pub serving: Serving,
    /// The registry load the start stopped waiting for.
    pub held: Option<HeldLoad>,
}

/// Loads the model the ranker starts with: the registry's production version
/// when the registry is on, answers in time and has one that passes its
/// checks and loads within `registry.load_timeout`; otherwise `model.dir`.
/// Never fails over the registry: only a `model.dir` that cannot be served
/// stops the start. A production load that runs out of time (an artifact on
/// a file system that stopped answering) is not waited for: it is returned
/// in [`Start::held`], and the start serves `model.dir`.
pub async fn initial(
    registry: Option<&Registry>,
    config: &RegistryConfig,
    loader: &Loader,
) -> Result<Start, ModelError> {
    let mut held = None;
    if let Some(registry) = registry {
        let lookup = async {
            if config.postgres.migrate {
                registry.migrate().await?;
            }
            registry.serving(&config.model_name).await
        };
        match bounded(config, "reading the production version", lookup).await.inspect(|_| read_at()) {
            Ok(rows) => match rows.into_iter().find(|r| r.stage == Stage::Production) {
                Some(prod) => {
                    let (this, record, started) = (loader.clone(), prod.clone(), Instant::now());
                    // Set from the load's start, as the follower's loads do
                    // (AdserveRankerModelLoadHung counts from it).
                    loading_gauge(Role::Production, &prod.version, 1.0);
                    let (result, thread) =
                        within(config.load_timeout, move || this.load_record_blocking(&record)).await;
                    if thread.is_none() {
                        loading_gauge(Role::Production, &prod.version, 0.0);
                    }
                    match (result, thread) {
                        (Ok(m), _) => return Ok(Start { serving: Serving::new(m, Source::Registry), held: None }),
                        (Err(e), Some(thread)) => {
                            tracing::error!(version = %prod.version, error = %e,
                                "registry production model still loading after registry.load_timeout; serving model.dir \
                                 until it ends (adserve_ranker_model_loading)");
                            held = Some(HeldLoad { row: prod, started, thread });
                        }
                        (Err(e), None) => tracing::error!(version = %prod.version, error = %e,
                            "registry production model refused; serving model.dir"),
                    }
                }
                None => tracing::info!(name = %config.model_name,
                    "the registry has no production version; serving model.dir"),
            },
            Err(e) => tracing::warn!(error = %e,
                "model registry unavailable at start; serving model.dir, following it in the background"),
        }
    }
    Ok(Start { serving: Serving::new(loader.load(None).await?, Source::Config), held })
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
    key: Key,
    retry_at: Instant,
    backoff: Duration,
}

/// What identifies a registry version to the follower: its version and
/// `model.onnx` checksum (what [`same`] compares).
type Key = (String, String);

fn key(row: &ModelRecord) -> Key {
    (row.version.clone(), row.onnx_sha256.to_ascii_lowercase())
}

/// A load running beside the follower.
struct Loading {
    /// The role it was started for. When it finishes, the role that wants
    /// the version then takes it: a canary promoted to production while it
    /// loaded is served as production without a second load.
    owner: Role,
    key: Key,
}

/// A load that finished (or ran out of `registry.load_timeout`).
struct Loaded {
    owner: Role,
    row: ModelRecord,
    took: Duration,
    result: Result<Arc<CtrModel>, ModelError>,
}

/// What a load task reports to the follower.
enum Report {
    /// The load finished, failed, or ran out of time.
    Loaded(Loaded),
    /// A load that ran out of time has ended after all (a load cannot be
    /// cancelled: its thread ran on): its role may load again, and what it
    /// built (`late.result`) is served if the registry still wants it, so a
    /// load slower than the limit (a cold TensorRT engine build) is not
    /// started again and again, each time running out of time.
    Released(Loaded),
}

/// The queue a role's models feed: the shadow's sessions run at low
/// priority, so a model loaded for it is not served, nor the reverse.
fn queue_of(role: Role) -> QueueKind {
    match role {
        Role::Shadow => QueueKind::Shadow,
        Role::Production | Role::Canary => QueueKind::Model,
    }
}

fn stage_of(role: Role) -> Stage {
    match role {
        Role::Production => Stage::Production,
        Role::Canary => Stage::Canary,
        Role::Shadow => Stage::Shadow,
    }
}

/// The follower's state between registry reads.
struct Follower {
    config: RegistryConfig,
    /// Loads production and canary models.
    loader: Loader,
    /// Loads shadow models (their own low-priority queue).
    shadow_loader: Loader,
    serving: Arc<Serving>,
    /// The registry's serving rows as last read.
    rows: Vec<ModelRecord>,
    /// Loads in flight: at most one per role, so memory (on a GPU, device
    /// memory) holds at most one model per role beyond those serving.
    loading: Vec<Loading>,
    /// Loads that ran out of time and whose thread still runs: their role
    /// loads nothing else, and no role fed by the same queue loads their
    /// version, until it ends, so a slow load (a cold TensorRT engine build)
    /// is not started again beside itself.
    abandoned: Vec<Loading>,
    done: mpsc::Sender<Report>,
    refused: RefusedVersions,
    /// The production model last swapped out, kept warm for a rollback
    /// (`registry.keep_previous`), and since when.
    previous: Option<(Arc<CtrModel>, Instant)>,
    /// Load reports received while the registry could not be read: applied
    /// after the next read, so no finished load is served against rows a
    /// rollback has since changed.
    pending: Vec<Report>,
}

impl Follower {
    /// A follower with nothing read yet, and where its loads report back.
    fn new(config: RegistryConfig, loader: Loader, serving: Arc<Serving>) -> (Self, mpsc::Receiver<Report>) {
        // At most one load per role is in flight, each sending at most two
        // reports, so its sends never wait long.
        let (done, finished) = mpsc::channel(8);
        let shadow_loader = Loader { queue: QueueKind::Shadow, ..loader.clone() };
        let follower = Self {
            config,
            loader,
            shadow_loader,
            serving,
            rows: Vec::new(),
            loading: Vec::new(),
            abandoned: Vec::new(),
            done,
            refused: RefusedVersions::default(),
            previous: None,
            pending: Vec::new(),
        };
        (follower, finished)
    }

    /// The registry row `role` should serve.
    fn wanted(&self, role: Role) -> Option<&ModelRecord> {
        self.rows.iter().find(|r| r.stage == stage_of(role))
    }

    /// The model `role` serves now.
    fn served(&self, role: Role) -> Option<Arc<CtrModel>> {
        match role {
            Role::Production => Some(self.serving.production()),
            Role::Canary => self.serving.canary().map(|c| c.model),
            Role::Shadow => self.serving.shadow(),
        }
    }

    /// `role` wants the version `k` and does not serve it yet.
    fn needs(&self, role: Role, k: &Key) -> bool {
        self.wanted(role).is_some_and(|row| key(row) == *k && !self.served(role).is_some_and(|m| same(&m, row)))
    }

    /// Brings every role to what the registry last said, without waiting
    /// for any load: removals, share changes and swaps to a model already
    /// loaded happen now; loads are started and finish in [`Self::finish`].
    /// So a rollback is never held behind a shadow, canary or production
    /// load in flight.
    fn reconcile(&mut self, notified: bool) {
        if let Some(prod) = self.wanted(Role::Production).cloned() {
            let current = self.serving.production();
            if !same(&current, &prod) {
                // A canary promoted to production, or the production model
                // swapped out a moment ago (a rollback), is loaded and warm.
                let reuse = match self.serving.canary().filter(|c| same(&c.model, &prod)) {
                    Some(c) => Some((c.model, "canary")),
                    None => {
                        self.previous.as_ref().filter(|(p, _)| same(p, &prod)).map(|(p, _)| (p.clone(), "previous"))
                    }
                };
                match reuse {
                    Some((model, from)) => {
                        metrics::counter!("adserve_ranker_model_reused_total", "from" => from).increment(1);
                        self.swap(model, &prod, Duration::ZERO, from == "previous");
                    }
                    None => self.start(Role::Production, &prod, notified),
                }
            }
        }
        match self.wanted(Role::Shadow).cloned() {
            None => {
                if let Some(old) = self.serving.shadow() {
                    self.serving.set_shadow(None);
                    tracing::info!(version = %old.manifest().model_version, "shadow removed");
                }
            }
            Some(row) if self.needs(Role::Shadow, &key(&row)) => self.start(Role::Shadow, &row, notified),
            Some(_) => {}
        }
        match self.wanted(Role::Canary).cloned() {
            None => {
                if let Some(old) = self.serving.canary() {
                    self.serving.set_canary(None);
                    tracing::info!(version = %old.model.manifest().model_version, "canary removed");
                }
            }
            Some(row) => match self.serving.canary() {
                Some(c) if same(&c.model, &row) && c.share != row.canary_share => {
                    self.serving.set_canary(Some(Canary { model: c.model, share: row.canary_share }));
                    tracing::info!(version = %row.version, share = row.canary_share, "canary share changed");
                }
                Some(c) if same(&c.model, &row) => {}
                _ => self.start(Role::Canary, &row, notified),
            },
        }
    }

    /// Starts loading `row` for `role`, unless the same version is already
    /// loading for a role fed by the same queue (it is offered to `role`
    /// when it finishes), `role` has another load in flight (that one
    /// finishes or times out first) or a timed-out one still running, or
    /// the version was refused and its backoff has not passed.
    fn start(&mut self, role: Role, row: &ModelRecord, notified: bool) {
        let k = key(row);
        let busy = |l: &Loading| l.owner == role || (queue_of(l.owner) == queue_of(role) && l.key == k);
        if let Some(held) = self.abandoned.iter().find(|l| busy(l)) {
            // Said on every pass (a poll, a notification): a thread that
            // never ends holds the role until the process restarts.
            tracing::warn!(role = role.as_str(), version = %row.version, held_by = %held.key.0,
                "not loading: a load that ran out of registry.load_timeout still runs (adserve_ranker_model_loading); \
                 it loads once that thread ends, or after a restart");
            return;
        }
        if self.loading.iter().any(busy) || !self.refused.allows(role, row, notified) {
            return;
        }
        if role == Role::Production
            && let Some((old, _)) = self.previous.take()
        {
            // Not the version kept for a rollback: free it before loading
            // another (on a GPU, device memory).
            tracing::info!(version = %old.manifest().model_version, "previous production model unloaded");
        }
        let loader = if role == Role::Shadow { self.shadow_loader.clone() } else { self.loader.clone() };
        let (row, done, limit) = (row.clone(), self.done.clone(), self.config.load_timeout);
        loading_gauge(role, &row.version, 1.0);
        tracing::info!(role = role.as_str(), version = %row.version, artifact = %row.artifact, "loading");
        self.loading.push(Loading { owner: role, key: k });
        tokio::spawn(async move {
            let started = Instant::now();
            let record = row.clone();
            let (result, thread) = within(limit, move || loader.load_record_blocking(&record)).await;
            // The follower holds the receiver for the process's life.
            let loaded =
                Loaded { owner: role, row: row.clone(), took: started.elapsed(), result: result.map(Arc::new) };
            let _ = done.send(Report::Loaded(loaded)).await;
            if let Some(thread) = thread {
                Self::released(HeldLoad { row, started, thread }, role, done).await;
            }
        });
    }

    /// Waits for a load's thread that ran out of time to end, and reports
    /// what it built ([`Report::Released`]).
    async fn released(held: HeldLoad, owner: Role, done: mpsc::Sender<Report>) {
        let HeldLoad { row, started, thread } = held;
        let result = joined(thread.await).map(Arc::new);
        let _ = done.send(Report::Released(Loaded { owner, row, took: started.elapsed(), result })).await;
    }

    /// Takes over the start's production load that ran out of time
    /// ([`Start::held`]) as if it were one of its own that did: refused as
    /// `timeout` (a late failure then backs off further; a late success
    /// forgets the refusal), holding the production role until its thread
    /// ends, with no second load beside it; then what it built is offered.
    fn adopt(&mut self, held: HeldLoad) {
        let limit = self.config.load_timeout;
        self.refused.refuse(Role::Production, &held.row, &ModelError::TimedOut(limit), self.config.poll_interval);
        self.abandoned.push(Loading { owner: Role::Production, key: key(&held.row) });
        tokio::spawn(Self::released(held, Role::Production, self.done.clone()));
    }

    /// A load task's report, received: applied once the registry has been
    /// read after it ([`Self::read`]; at once when the caller read it), so a
    /// version rolled back while it loaded is never served, not even while
    /// the registry cannot be read (the load waits, holding its role).
    fn received(&mut self, report: Report, fresh: Option<Vec<ModelRecord>>) {
        self.pending.push(report);
        if let Some(rows) = fresh {
            self.read(rows, false);
        }
    }

    /// The registry's serving rows, just read: finished loads waiting for a
    /// read are applied against them, then every role is brought to them.
    fn read(&mut self, rows: Vec<ModelRecord>, notified: bool) {
        self.rows = rows;
        for report in std::mem::take(&mut self.pending) {
            self.report(report);
        }
        self.reconcile(notified);
    }

    /// A load task's report, applied against the rows last read.
    fn report(&mut self, report: Report) {
        match report {
            Report::Loaded(loaded) => self.finish(loaded),
            Report::Released(late) => {
                let (owner, row) = (late.owner, &late.row);
                let k = key(row);
                self.abandoned.retain(|l| !(l.owner == owner && l.key == k));
                loading_gauge(owner, &row.version, 0.0);
                // Whatever held it (a hung file system, a slow engine build)
                // has answered, and what the load built is offered like any
                // load's. If it built a model, the refusal for running out of
                // time is forgotten by every role fed by the same queue (a
                // canary promoted while it loaded was refused as production);
                // if it failed, that failure replaces the refusal and its
                // backoff grows (a version that always times out, then
                // fails, is not retried every poll).
                if late.result.is_ok() {
                    for role in [Role::Production, Role::Canary, Role::Shadow] {
                        if queue_of(role) == queue_of(owner) {
                            self.refused.forget(role, row);
                        }
                    }
                }
                tracing::info!(role = owner.as_str(), version = %row.version, took = ?late.took, ok = late.result.is_ok(),
                    "a load that ran out of time has ended; its role may load again");
                self.apply(late);
            }
        }
    }

    /// A load finished: the role that wants its version now serves it (its
    /// owner first), or it is dropped because the registry moved on.
    fn finish(&mut self, loaded: Loaded) {
        let (owner, k) = (loaded.owner, key(&loaded.row));
        self.loading.retain(|l| !(l.owner == owner && l.key == k));
        if matches!(loaded.result, Err(ModelError::TimedOut(_))) {
            // Its thread runs on (the gauge stays 1) until Report::Released.
            self.abandoned.push(Loading { owner, key: k });
        } else {
            loading_gauge(owner, &loaded.row.version, 0.0);
        }
        self.apply(loaded);
    }

    /// Offers what a load built to the role that wants its version now
    /// (its owner first, then any role fed by the same queue), or refuses
    /// the version for them when the load failed.
    fn apply(&mut self, loaded: Loaded) {
        let Loaded { owner, row, took, result } = loaded;
        let k = key(&row);
        // The owner first, then any other role fed by the same queue.
        let others = [Role::Production, Role::Canary, Role::Shadow].into_iter().filter(|r| *r != owner);
        let same_queue = std::iter::once(owner).chain(others).filter(|r| queue_of(*r) == queue_of(owner));
        let takers: Vec<Role> = same_queue.filter(|r| self.needs(*r, &k)).collect();
        match result {
            Ok(model) => {
                metrics::histogram!("adserve_ranker_model_load_seconds", "role" => owner.as_str())
                    .record(took.as_secs_f64());
                match takers.first() {
                    Some(Role::Production) => self.swap(model, &row, took, false),
                    Some(Role::Canary) => {
                        let share = self.wanted(Role::Canary).map_or(row.canary_share, |r| r.canary_share);
                        self.serving.set_canary(Some(Canary { model, share }));
                        self.refused.clear(Role::Canary);
                        metrics::counter!("adserve_ranker_model_swaps_total", "result" => "canary").increment(1);
                        tracing::info!(version = %row.version, share, ?took, "canary serving");
                    }
                    Some(Role::Shadow) => {
                        self.serving.set_shadow(Some(model));
                        self.refused.clear(Role::Shadow);
                        metrics::counter!("adserve_ranker_model_swaps_total", "result" => "shadow").increment(1);
                        tracing::info!(version = %row.version, ?took, "shadow scoring");
                    }
                    None => tracing::info!(role = owner.as_str(), version = %row.version, ?took,
                        "loaded after the registry moved on; dropped"),
                }
            }
            // No role wants it any more: nothing to refuse (the load failure
            // itself is counted in adserve_ranker_model_load_failures_total).
            Err(e) if takers.is_empty() => tracing::warn!(role = owner.as_str(), version = %row.version, error = %e,
                "a load the registry has moved on from failed"),
            Err(e) => {
                for role in takers {
                    self.refused.refuse(role, &row, &e, self.config.poll_interval);
                }
            }
        }
    }

    /// Serves `next` as production; the model it replaces stays warm for a
    /// rollback to it, unless this swap was that rollback (the registry
    /// retired it, and a rollback never restores a version it rolled back
    /// from). In-flight calls finish on the old model either way.
    fn swap(&mut self, next: Arc<CtrModel>, row: &ModelRecord, took: Duration, rolled_back: bool) {
        let current = self.serving.production();
        self.serving.swap(next, Source::Registry);
        self.previous =
            (!self.config.keep_previous.is_zero() && !rolled_back).then(|| (current.clone(), Instant::now()));
        self.refused.clear(Role::Production);
        metrics::counter!("adserve_ranker_model_swaps_total", "result" => "swapped").increment(1);
        tracing::info!(from = %current.manifest().model_version, to = %row.version, ?took, "model swapped");
    }
}

/// How often a finished load waiting for the registry (unreadable when it
/// finished) tries to read it again.
const PENDING_RETRY: Duration = Duration::from_secs(1);

/// `adserve_ranker_registry_read_timestamp_seconds`: when the follower last
/// read the registry and applied what it read (an alert's input: a ranker
/// that stopped following).
fn read_at() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    metrics::gauge!("adserve_ranker_registry_read_timestamp_seconds").set(now.as_secs_f64());
}

/// `adserve_ranker_model_loading{role,model_version}`: 1 while a load runs
/// (and until its result is applied).
fn loading_gauge(role: Role, version: &str, value: f64) {
    metrics::gauge!("adserve_ranker_model_loading", "role" => role.as_str(), "model_version" => version.to_string())
        .set(value);
}

/// Follows the registry until the process ends (spawn it). Registry reads
/// and swaps happen in this loop; loads run as tasks beside it and report
/// back, so no swap waits for another role's load.
/// `held`: the start's registry load still running ([`Start::held`]).
pub async fn follow(
    registry: Registry,
    config: RegistryConfig,
    loader: Loader,
    serving: Arc<Serving>,
    held: Option<HeldLoad>,
) {
    let (wake_tx, mut wake) = mpsc::channel(16);
    tokio::spawn(listen(registry.clone(), config.model_name.clone(), wake_tx));
    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut f, mut finished) = Follower::new(config, loader, serving);
    if let Some(held) = held {
        f.adopt(held);
    }
    // Following from now: a ranker that never manages a read (PostgreSQL
    // down since its start) shows as stale too, not as a missing series.
    read_at();
    loop {
        let expires = f.previous.as_ref().map(|(_, since)| *since + f.config.keep_previous);
        // Finished loads waiting for a read are not left to the next poll
        // (up to an hour) when no notification or resync comes.
        let retry = (!f.pending.is_empty()).then(|| Instant::now() + PENDING_RETRY);
        let notified = tokio::select! {
            Some(w) = wake.recv() => w == Wake::Changed,
            _ = tick.tick() => false,
            () = until(retry) => false,
            Some(report) = finished.recv() => {
                // Applied against the registry as it is now, not as last
                // read (a notification may be waiting): a version rolled
                // back while it loaded is not served. While the registry
                // cannot be read the load waits for the next read (a poll,
                // or the LISTEN connection's resync when PostgreSQL returns).
                let config = &f.config;
                let fresh =
                    match bounded(config, "reading the production version", registry.serving(&config.model_name)).await {
                        Ok(rows) => Some(rows),
                        Err(e) => {
                            metrics::counter!("adserve_ranker_registry_errors_total").increment(1);
                            tracing::warn!(error = %e,
                                "model registry unavailable; a finished load waits for it before it is served");
                            None
                        }
                    };
                let read = fresh.is_some();
                f.received(report, fresh);
                if read {
                    read_at();
                }
                continue;
            }
            () = until(expires) => {
                if let Some((old, _)) = f.previous.take() {
                    tracing::info!(version = %old.manifest().model_version, "previous production model unloaded");
                }
                continue;
            }
        };
        let config = &f.config;
        // Registry::migrate runs the migrations once per process (a no-op
        // after initial() or an earlier pass succeeded).
        if config.postgres.migrate
            && let Err(e) = bounded(config, "migrations", registry.migrate()).await
        {
            metrics::counter!("adserve_ranker_registry_errors_total").increment(1);
            tracing::warn!(error = %e, "model registry: migrations failed; retrying");
            continue;
        }
        match bounded(config, "reading the production version", registry.serving(&config.model_name)).await {
            Ok(rows) => {
                f.read(rows, notified);
                read_at();
            }
            Err(e) => {
                metrics::counter!("adserve_ranker_registry_errors_total").increment(1);
                tracing::warn!(error = %e, "model registry unavailable; still serving the current model");
            }
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
        let key = key(row);
        match self.by_role.iter().find(|(r, _)| *r == role) {
            Some((_, refused)) if refused.key == key => notified || Instant::now() >= refused.retry_at,
            _ => true,
        }
    }

    fn clear(&mut self, role: Role) {
        self.by_role.retain(|(r, _)| *r != role);
    }

    /// Forgets `role`'s refusal of `row`'s version (not of another).
    fn forget(&mut self, role: Role, row: &ModelRecord) {
        let k = key(row);
        self.by_role.retain(|(r, refused)| !(*r == role && refused.key == k));
    }

    fn refuse(&mut self, role: Role, row: &ModelRecord, e: &ModelError, poll: Duration) {
        let key = key(row);
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

    /// A copy of the baseline model as registry version `version` at
    /// `stage`, under `root`.
    fn record(root: &std::path::Path, version: &str, stage: Stage) -> ModelRecord {
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/ctr-baseline");
        let dir = root.join(version);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::copy(base.join("model.onnx"), dir.join("model.onnx")).expect("model.onnx");
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(base.join("manifest.json")).expect("manifest")).expect("json");
        manifest["model_version"] = version.into();
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&manifest).expect("json")).expect("write");
        ModelRecord {
            name: "ctr".into(),
            version: version.into(),
            artifact: dir.display().to_string(),
            onnx_sha256: manifest["onnx_sha256"].as_str().expect("sha").into(),
            manifest,
            metrics: serde_json::json!({}),
            stage,
            canary_share: if stage == Stage::Canary { 0.5 } else { 0.0 },
            registered_by: "test".into(),
            registered_at: String::new(),
            stage_changed_by: "test".into(),
            stage_changed_at: String::new(),
        }
    }

    fn at(mut row: ModelRecord, stage: Stage) -> ModelRecord {
        row.stage = stage;
        row
    }

    /// A follower serving `production` (loaded here), and its load reports.
    async fn follower(production: &ModelRecord) -> (Follower, mpsc::Receiver<Report>) {
        let dylib = std::env::var("ORT_DYLIB_PATH")
            .expect("ORT_DYLIB_PATH is unset: run the ranker tests through `make test` (scripts/env.sh)");
        let batching = BatchingConfig { sessions: 1, ..BatchingConfig::default() };
        let loader = Loader { model: ModelConfig::default(), batching, max_rows: 100, dylib, queue: QueueKind::Model };
        let (this, record) = (loader.clone(), production.clone());
        let first = tokio::task::spawn_blocking(move || this.load_record_blocking(&record))
            .await
            .expect("joined")
            .expect("loads");
        let serving = Arc::new(Serving::new(first, Source::Registry));
        Follower::new(RegistryConfig::default(), loader, serving)
    }

    /// Lets a reader still blocked in open() on a FIFO go (an end of file)
    /// when dropped, so a failed assertion ends the test instead of the
    /// runtime waiting on that thread forever.
    struct LetGo(PathBuf);

    impl Drop for LetGo {
        fn drop(&mut self) {
            use std::os::unix::fs::OpenOptionsExt as _;
            let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&self.0);
        }
    }

    /// Puts a FIFO in place of `row`'s `model.onnx`, so a load of it blocks
    /// in open() until [`release`]: the path, the file's bytes, and the
    /// guard that lets a reader still blocked go if the test fails first.
    fn hang(row: &ModelRecord) -> (PathBuf, Vec<u8>, LetGo) {
        let onnx = PathBuf::from(&row.artifact).join("model.onnx");
        let bytes = std::fs::read(&onnx).expect("model");
        std::fs::remove_file(&onnx).expect("rm");
        assert!(std::process::Command::new("mkfifo").arg(&onnx).status().expect("mkfifo").success());
        (onnx.clone(), bytes, LetGo(onnx))
    }

    /// Writes `bytes` to the reader blocked on the FIFO at `fifo`, and puts a
    /// plain file with them in its place before the reader sees the end, so
    /// whatever opens the path afterwards gets the file, never the FIFO.
    async fn release(fifo: PathBuf, bytes: Vec<u8>) {
        tokio::task::spawn_blocking(move || {
            let writer = std::fs::OpenOptions::new().write(true).open(&fifo)?;
            std::io::Write::write_all(&mut &writer, &bytes)?;
            let plain = fifo.with_extension("released");
            std::fs::write(&plain, &bytes)?;
            std::fs::rename(&plain, &fifo)?;
            drop(writer);
            Ok::<_, std::io::Error>(())
        })
        .await
        .expect("joined")
        .expect("written");
    }

    fn version(model: &CtrModel) -> &str {
        &model.manifest().model_version
    }

    #[tokio::test]
    async fn a_canary_promoted_while_it_loads_is_served_as_production_from_that_one_load() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = record(root.path(), "v1", Stage::Production);
        let v2 = record(root.path(), "v2", Stage::Canary);
        let (mut f, mut finished) = follower(&v1).await;
        f.rows = vec![v1.clone(), v2.clone()];
        f.reconcile(true);
        assert_eq!(f.loading.len(), 1, "the canary loads");
        // Promoted before its load finished: production waits for that load.
        f.rows = vec![at(v2, Stage::Production)];
        f.reconcile(true);
        assert_eq!(f.loading.len(), 1, "no second load of the same version");
        assert_eq!(version(&f.serving.production()), "v1", "nothing swaps before the load is ready");
        let loaded = finished.recv().await.expect("a report");
        assert!(matches!(&loaded, Report::Loaded(l) if l.owner == Role::Canary));
        f.report(loaded);
        assert_eq!(version(&f.serving.production()), "v2");
        assert!(f.serving.canary().is_none(), "the canary slot is empty in the registry");
        assert!(f.loading.is_empty());
        // v1 is kept warm: a rollback to it needs no load.
        f.rows = vec![at(v1, Stage::Production)];
        f.reconcile(true);
        assert!(f.loading.is_empty());
        assert_eq!(version(&f.serving.production()), "v1");
    }

    #[tokio::test]
    async fn a_load_the_registry_moved_on_from_is_dropped_and_changes_meanwhile_do_not_wait_for_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = record(root.path(), "v1", Stage::Production);
        let v2 = record(root.path(), "v2", Stage::Production);
        let v3 = record(root.path(), "v3", Stage::Production);
        let (mut f, mut finished) = follower(&v1).await;
        // v2 loads and swaps in; v1 is kept warm.
        f.rows = vec![v2.clone()];
        f.reconcile(true);
        f.report(finished.recv().await.expect("a report"));
        assert_eq!(version(&f.serving.production()), "v2");
        // v3 starts loading, with a shadow; before either finishes the
        // registry goes back to v2 (v3 rolled back) and drops the shadow.
        f.rows = vec![v3.clone(), record(root.path(), "s1", Stage::Shadow)];
        f.reconcile(true);
        assert_eq!(f.loading.len(), 2, "production and shadow load side by side");
        f.rows = vec![v2];
        f.reconcile(true);
        for _ in 0..2 {
            f.report(finished.recv().await.expect("a report"));
        }
        assert_eq!(version(&f.serving.production()), "v2", "v3 finished loading after its rollback: dropped");
        assert!(f.serving.shadow().is_none(), "the shadow finished loading after its removal: dropped");
        assert!(f.loading.is_empty());
    }

    #[tokio::test]
    async fn a_load_out_of_time_is_refused_its_role_waits_for_its_thread_and_what_it_built_serves() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = record(root.path(), "v1", Stage::Production);
        let s1 = record(root.path(), "s1", Stage::Shadow);
        // s1's model file hangs: its load blocks in open() until written.
        let (onnx, bytes, _let_go) = hang(&s1);
        let (mut f, mut finished) = follower(&v1).await;
        f.config.load_timeout = Duration::from_millis(200);
        f.rows = vec![v1.clone(), s1.clone()];
        f.reconcile(true);
        let report = finished.recv().await.expect("a report");
        assert!(matches!(&report, Report::Loaded(l) if matches!(l.result, Err(ModelError::TimedOut(_)))));
        f.report(report);
        assert_eq!(f.abandoned.iter().map(|l| l.owner).collect::<Vec<_>>(), [Role::Shadow]);
        // Even a notification does not start it again beside the thread
        // still blocked on the file.
        f.reconcile(true);
        assert!(f.loading.is_empty(), "no second load while the first one's thread runs");
        // The file system answers: the abandoned load ends, and what it
        // built is offered to the role (below).
        release(onnx, bytes).await;
        let report = finished.recv().await.expect("a report");
        assert!(matches!(&report, Report::Released(l) if l.owner == Role::Shadow && l.result.is_ok()));
        f.received(report, Some(f.rows.clone()));
        // What the late load built serves: a load slower than the limit is
        // not started again (to run out of time again).
        assert_eq!(f.serving.shadow().map(|s| version(&s).to_string()).as_deref(), Some("s1"));
        assert!(f.loading.is_empty() && f.abandoned.is_empty(), "no second load");
    }

    #[tokio::test]
    async fn a_late_load_the_registry_moved_on_from_is_dropped_and_the_role_loads_what_it_wants_now() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = record(root.path(), "v1", Stage::Production);
        let s1 = record(root.path(), "s1", Stage::Shadow);
        let s2 = record(root.path(), "s2", Stage::Shadow);
        // s1's model file hangs, so its load runs out of time for certain.
        let (onnx, bytes, _let_go) = hang(&s1);
        let (mut f, mut finished) = follower(&v1).await;
        f.config.load_timeout = Duration::from_millis(200);
        f.rows = vec![v1.clone(), s1.clone()];
        f.reconcile(true);
        f.received(finished.recv().await.expect("a report"), Some(f.rows.clone()));
        assert_eq!(f.abandoned.len(), 1);
        // Meanwhile the registry replaces s1 with s2: s2 waits for s1's thread.
        f.rows = vec![v1.clone(), s2.clone()];
        f.reconcile(true);
        assert!(f.loading.is_empty(), "held by the thread still running");
        f.config.load_timeout = Duration::from_secs(60);
        // The file returns (written through the FIFO, then in its place).
        release(onnx, bytes).await;
        let late = finished.recv().await.expect("a report");
        assert!(matches!(&late, Report::Released(l) if version_of(l) == "s1"));
        f.received(late, Some(f.rows.clone()));
        assert!(f.serving.shadow().is_none(), "s1 is no longer wanted: dropped");
        assert_eq!(f.loading.len(), 1, "and s2 loads at once");
        f.received(finished.recv().await.expect("a report"), Some(f.rows.clone()));
        assert_eq!(f.serving.shadow().map(|s| version(&s).to_string()).as_deref(), Some("s2"));
    }

    #[tokio::test]
    async fn a_late_load_that_fails_replaces_the_timeout_refusal_and_its_backoff_grows() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = record(root.path(), "v1", Stage::Production);
        let s1 = record(root.path(), "s1", Stage::Shadow);
        // s1's model file hangs, then returns torn (its checksum fails).
        let (onnx, _, _let_go) = hang(&s1);
        let (mut f, mut finished) = follower(&v1).await;
        f.config.load_timeout = Duration::from_millis(200);
        f.rows = vec![v1.clone(), s1.clone()];
        f.reconcile(true);
        f.received(finished.recv().await.expect("a report"), Some(f.rows.clone()));
        let backoff = |f: &Follower| f.refused.by_role.iter().find(|(r, _)| *r == Role::Shadow).map(|(_, r)| r.backoff);
        assert_eq!(backoff(&f), Some(f.config.poll_interval), "refused for running out of time");
        tokio::task::spawn_blocking(move || std::fs::write(&onnx, b"torn")).await.expect("joined").expect("written");
        let late = finished.recv().await.expect("a report");
        assert!(matches!(&late, Report::Released(l) if l.result.is_err()));
        f.received(late, Some(f.rows.clone()));
        assert!(f.serving.shadow().is_none());
        assert!(f.abandoned.is_empty() && f.loading.is_empty(), "the poll that follows does not reload it at once");
        assert_eq!(backoff(&f), Some(f.config.poll_interval * 2), "refused again, with a longer backoff");
    }

    #[tokio::test]
    async fn a_production_load_the_start_stopped_waiting_for_holds_its_role_and_serves_once_it_ends() {
        let root = tempfile::tempdir().expect("tempdir");
        // v0 stands for model.dir, served while the registry's v1 hangs.
        let v0 = record(root.path(), "v0", Stage::Production);
        let v1 = record(root.path(), "v1", Stage::Production);
        let (onnx, bytes, _let_go) = hang(&v1);
        let (mut f, mut finished) = follower(&v0).await;
        // The start's load of v1, as initial() runs it, runs out of time.
        let (this, record) = (f.loader.clone(), v1.clone());
        let (result, thread) = within(Duration::from_millis(200), move || this.load_record_blocking(&record)).await;
        assert!(matches!(result, Err(ModelError::TimedOut(_))), "{result:?}");
        f.adopt(HeldLoad { row: v1.clone(), started: Instant::now(), thread: thread.expect("its thread runs on") });
        assert!(f.refused.by_role.iter().any(|(r, _)| *r == Role::Production), "refused as timeout, as its own");
        // The follower's first read wants v1: no second load beside the
        // start's, and model.dir serves meanwhile.
        f.read(vec![v1.clone()], true);
        assert!(f.loading.is_empty(), "no second load while the start's thread runs");
        assert_eq!(version(&f.serving.production()), "v0");
        release(onnx, bytes).await;
        let report = finished.recv().await.expect("a report");
        assert!(matches!(&report, Report::Released(l) if l.owner == Role::Production && l.result.is_ok()));
        f.received(report, Some(vec![v1]));
        assert_eq!(version(&f.serving.production()), "v1", "what the start's load built serves");
        assert!(f.refused.by_role.is_empty(), "and its refusal is forgotten");
        assert!(f.loading.is_empty() && f.abandoned.is_empty(), "from that one load");
    }

    fn version_of(l: &Loaded) -> &str {
        &l.row.version
    }

    #[tokio::test]
    async fn a_load_finished_while_the_registry_cannot_be_read_waits_for_the_next_read() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = record(root.path(), "v1", Stage::Production);
        let v2 = record(root.path(), "v2", Stage::Production);
        let v3 = record(root.path(), "v3", Stage::Production);
        let (mut f, mut finished) = follower(&v1).await;
        // v2 loads; it finishes while PostgreSQL does not answer, after the
        // operator rolled it back (a change this ranker has not read).
        f.rows = vec![v2.clone()];
        f.reconcile(true);
        f.received(finished.recv().await.expect("a report"), None);
        assert_eq!(version(&f.serving.production()), "v1", "not served on the rows read before the rollback");
        assert_eq!(f.loading.len(), 1, "the load holds its role until it is applied");
        f.reconcile(false);
        assert_eq!(f.loading.len(), 1, "and is not started again");
        // PostgreSQL answers: the rollback is read, and v2 is dropped.
        f.read(vec![v1.clone()], false);
        assert_eq!(version(&f.serving.production()), "v1");
        assert!(f.loading.is_empty() && f.pending.is_empty());
        // A load still wanted when the registry answers again is served.
        f.rows = vec![v3.clone()];
        f.reconcile(true);
        f.received(finished.recv().await.expect("a report"), None);
        assert_eq!(version(&f.serving.production()), "v1");
        f.read(vec![v3], true);
        assert_eq!(version(&f.serving.production()), "v3");
        assert!(f.loading.is_empty() && f.pending.is_empty());
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
