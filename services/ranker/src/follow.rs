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
//! the previous one keeps serving, and the refused version is retried only
//! on the next notification (not every poll).

use std::{sync::Arc, time::Duration};

use adserve_registry::{ModelRecord, NOTIFY_CHANNEL, Registry, RegistryConfig, Stage};
use arc_swap::ArcSwap;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;

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

struct Active {
    model: Arc<CtrModel>,
    source: Source,
}

/// The production model, swapped atomically.
pub struct Serving {
    active: ArcSwap<Active>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = self.active.load();
        f.debug_struct("Serving").field("model", &a.model).field("source", &a.source).finish()
    }
}

impl Serving {
    /// Serving `model`.
    pub fn new(model: CtrModel, source: Source) -> Self {
        let this = Self { active: ArcSwap::from_pointee(Active { model: Arc::new(model), source }) };
        this.publish(None);
        this
    }

    /// The model to score the next call with (the caller keeps it alive).
    pub fn production(&self) -> Arc<CtrModel> {
        self.active.load().model.clone()
    }

    /// Where it came from.
    pub fn source(&self) -> Source {
        self.active.load().source.clone()
    }

    /// Serves `model` from now on; calls already holding the old one finish
    /// on it.
    pub fn swap(&self, model: CtrModel, source: Source) {
        let old = self.active.swap(Arc::new(Active { model: Arc::new(model), source }));
        self.publish(Some(&old));
    }

    fn publish(&self, old: Option<&Active>) {
        if let Some(old) = old {
            metrics::gauge!(
                "adserve_ranker_model_info",
                "model_version" => old.model.manifest().model_version.clone(),
                "source" => old.source.as_str(),
            )
            .set(0.0);
        }
        let a = self.active.load();
        metrics::gauge!(
            "adserve_ranker_model_info",
            "model_version" => a.model.manifest().model_version.clone(),
            "source" => a.source.as_str(),
        )
        .set(1.0);
    }
}

/// Loads the model the ranker starts with: the registry's production version
/// when the registry is on, answers within `patience` and has one that
/// passes its checks; otherwise `model.dir`. Never fails over the registry:
/// only a `model.dir` that cannot be served stops the start.
pub async fn initial(
    registry: Option<&Registry>,
    config: &RegistryConfig,
    model: &ModelConfig,
    batching: &BatchingConfig,
    dylib: &str,
    patience: Duration,
) -> Result<Serving, ModelError> {
    if let Some(registry) = registry {
        let lookup = async {
            if config.postgres.migrate {
                registry.migrate().await?;
            }
            registry.serving(&config.model_name).await
        };
        match tokio::time::timeout(patience, lookup).await {
            Ok(Ok(rows)) => match rows.into_iter().find(|r| r.stage == Stage::Production) {
                Some(prod) => match load_record(&prod, model, batching, dylib).await {
                    Ok(m) => return Ok(Serving::new(m, Source::Registry)),
                    Err(e) => {
                        tracing::error!(version = %prod.version, error = %e, "registry production model refused; serving model.dir")
                    }
                },
                None => {
                    tracing::info!(name = %config.model_name, "the registry has no production version; serving model.dir")
                }
            },
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "model registry unavailable at start; serving model.dir, following it in the background")
            }
            Err(_) => tracing::warn!(
                ?patience,
                "model registry did not answer at start; serving model.dir, following it in the background"
            ),
        }
    }
    let m = load_blocking(model.clone(), batching.clone(), dylib.to_string()).await?;
    Ok(Serving::new(m, Source::Config))
}

/// Follows the registry until the process ends (spawn it).
pub async fn follow(
    registry: Registry,
    config: RegistryConfig,
    model: ModelConfig,
    batching: BatchingConfig,
    dylib: String,
    serving: Arc<Serving>,
) {
    let wake = Arc::new(Notify::new());
    tokio::spawn(listen(registry.clone(), config.model_name.clone(), wake.clone()));
    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused: Option<(String, String)> = None;
    let mut migrated = !config.postgres.migrate;
    loop {
        let notified = tokio::select! {
            _ = wake.notified() => true,
            _ = tick.tick() => false,
        };
        if !migrated {
            match registry.migrate().await {
                Ok(()) => migrated = true,
                Err(e) => {
                    tracing::warn!(error = %e, "model registry: migrations failed; retrying");
                    continue;
                }
            }
        }
        let rows = match registry.serving(&config.model_name).await {
            Ok(rows) => rows,
            Err(e) => {
                metrics::counter!("adserve_ranker_registry_errors_total").increment(1);
                tracing::warn!(error = %e, "model registry unavailable; still serving the current model");
                continue;
            }
        };
        let Some(prod) = rows.into_iter().find(|r| r.stage == Stage::Production) else { continue };
        let current = serving.production();
        let m = current.manifest();
        if m.model_version == prod.version && m.onnx_sha256.eq_ignore_ascii_case(&prod.onnx_sha256) {
            refused = None;
            continue;
        }
        let key = (prod.version.clone(), prod.onnx_sha256.clone());
        if !notified && refused.as_ref() == Some(&key) {
            continue;
        }
        let started = std::time::Instant::now();
        match load_record(&prod, &model, &batching, &dylib).await {
            Ok(next) => {
                let from = m.model_version.clone();
                drop(current);
                serving.swap(next, Source::Registry);
                refused = None;
                metrics::counter!("adserve_ranker_model_swaps_total", "result" => "swapped").increment(1);
                tracing::info!(%from, to = %prod.version, took = ?started.elapsed(), "model swapped");
            }
            Err(e) => {
                refused = Some(key);
                metrics::counter!("adserve_ranker_model_swaps_total", "result" => "refused").increment(1);
                tracing::error!(version = %prod.version, artifact = %prod.artifact, error = %e,
                    "registry production model refused; the previous model keeps serving");
            }
        }
    }
}

/// Forwards notifications for `name` to `wake`, reconnecting forever. A
/// (re)connect wakes too: notifications sent while disconnected are lost.
async fn listen(registry: Registry, name: String, wake: Arc<Notify>) {
    let mut pause = Duration::from_millis(200);
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(registry.pool()).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match tokio::time::timeout(Duration::from_secs(10), connected).await {
            Ok(Ok(mut listener)) => {
                pause = Duration::from_millis(200);
                wake.notify_one();
                loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) if n.payload() == name => wake.notify_one(),
                        Ok(Some(_)) => {}
                        // Reconnected underneath: catch up.
                        Ok(None) => wake.notify_one(),
                        Err(e) => {
                            tracing::warn!(error = %e, "model registry: LISTEN connection lost");
                            break;
                        }
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "model registry: cannot LISTEN; polling only until it can"),
            Err(_) => tracing::warn!("model registry: LISTEN connect timed out; polling only until it can"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

/// Loads a registry record's artifact and checks it is what was registered.
async fn load_record(
    record: &ModelRecord,
    model: &ModelConfig,
    batching: &BatchingConfig,
    dylib: &str,
) -> Result<CtrModel, ModelError> {
    let config = ModelConfig { dir: record.artifact.clone().into(), ..model.clone() };
    let loaded = load_blocking(config, batching.clone(), dylib.to_string()).await?;
    let m = loaded.manifest();
    if m.model_version != record.version || !m.onnx_sha256.eq_ignore_ascii_case(&record.onnx_sha256) {
        return Err(ModelError::Mismatch(format!(
            "{} now holds version {:?} (sha256 {}), the registry registered {:?} (sha256 {}): the artifact changed after registration",
            record.artifact, m.model_version, m.onnx_sha256, record.version, record.onnx_sha256
        )));
    }
    Ok(loaded)
}

async fn load_blocking(config: ModelConfig, batching: BatchingConfig, dylib: String) -> Result<CtrModel, ModelError> {
    tokio::task::spawn_blocking(move || CtrModel::load(&config, &batching, &dylib))
        .await
        .map_err(|e| ModelError::Panicked(e.to_string()))?
}
