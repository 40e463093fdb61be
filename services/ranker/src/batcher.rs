//! Dynamic batching: concurrent Score calls queue per model and run together
//! on a bounded pool of ONNX Runtime sessions.
//!
//! Each session lives on its own OS thread (ort's `Session::run` needs
//! `&mut`, and inference must not block the async runtime). A thread takes
//! the oldest queued call, waits at most `max_queue_delay` from that call's
//! arrival for others to join, and runs them as one `[rows, F]` tensor once
//! the batch holds `max_batch_rows` rows or the delay is up (Triton's dynamic
//! batcher, with TEI's "budget in rows, not requests": one call may carry
//! 1 to 1000+ candidates).
//!
//! Calls whose caller has gone (the gateway gave up at its deadline) or whose
//! deadline has passed are dropped before they cost compute, the latter
//! answered `DeadlineExceeded`. The queue is bounded in rows: a call that
//! would exceed `max_queue_rows` is refused at once (`Overloaded`) instead of
//! waiting behind work it cannot outlive.
//!
//! Dropping the [`Batcher`] (the last handle of a model, e.g. after a swap)
//! closes the queue: calls already queued are still scored, then the threads
//! exit.

use std::{
    collections::VecDeque,
    panic::AssertUnwindSafe,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use ort::session::Session;
use tokio::sync::oneshot;

use crate::{
    config::BatchingConfig,
    model::{self, MIN_PCTR, ModelManifest},
};

/// Why a queued call was not scored.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// The call's deadline passed before a session was free.
    #[error("deadline passed after {waited:?} in the ranker's queue, before scoring")]
    DeadlineExceeded {
        /// Time spent queued.
        waited: Duration,
    },
    /// The queue is full (`batching.max_queue_rows`).
    #[error("ranker overloaded: {queued} rows queued, {rows} more would pass batching.max_queue_rows = {limit}")]
    Overloaded {
        /// Rows already queued.
        queued: usize,
        /// Rows of the refused call.
        rows: usize,
        /// The limit.
        limit: usize,
    },
    /// Scoring failed: ONNX Runtime's error, a panic in the session thread,
    /// or an output that is not a probability. Every call in the batch gets
    /// the same message.
    #[error("scoring failed: {0}")]
    Failed(String),
}

struct Job {
    /// `rows × features`, in the model's column order.
    input: Vec<f32>,
    rows: usize,
    enqueued: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Scores, ScoreError>>,
}

/// One call's scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// The model's output, one per row.
    pub raw: Vec<f32>,
    /// Calibrated (the manifest's downsampling correction and mapping), floored
    /// at [`MIN_PCTR`]: what the auction prices with.
    pub pctr: Vec<f32>,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    rows: usize,
    closed: bool,
}

struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    config: BatchingConfig,
    version: String,
    stats: Mutex<BatchStats>,
}

/// What a model's queue has done since it started (also exported as
/// metrics; kept here so tests and `GetModel` can read them per model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// `session.run` calls.
    pub batches: u64,
    /// Score calls run through `session.run`.
    pub calls: u64,
    /// Rows scored.
    pub rows: u64,
    /// Calls dropped unscored because their deadline had passed.
    pub expired: u64,
    /// Calls dropped unscored because their caller had gone.
    pub cancelled: u64,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic is caught around `session.run`, never while the lock is
        // held; recover the state rather than wedge every session.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A model's queue and its session threads. Cheap to share by reference;
/// dropping it drains the queue and stops the threads.
pub struct Batcher {
    queue: Arc<Queue>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("version", &self.queue.version).finish()
    }
}

impl Batcher {
    /// Starts one thread per session.
    pub(crate) fn start(sessions: Vec<Session>, manifest: ModelManifest, config: BatchingConfig) -> Self {
        let queue = Arc::new(Queue {
            state: Mutex::default(),
            ready: Condvar::new(),
            config,
            version: manifest.model_version.clone(),
            stats: Mutex::default(),
        });
        let manifest = Arc::new(manifest);
        for (i, session) in sessions.into_iter().enumerate() {
            let (queue, manifest) = (queue.clone(), manifest.clone());
            std::thread::Builder::new()
                .name(format!("ranker-session-{i}"))
                .spawn(move || worker(session, &queue, &manifest))
                .expect("spawning a session thread");
        }
        Self { queue }
    }

    /// Queues `rows` rows (`input` is `rows × features`, already gathered and
    /// checked) and waits for their scores. When the returned future is
    /// dropped the call is skipped, not scored.
    pub async fn score(&self, input: Vec<f32>, rows: usize, deadline: Option<Instant>) -> Result<Scores, ScoreError> {
        let (reply, answer) = oneshot::channel();
        {
            // Never closed here: the queue closes only when the Batcher is
            // dropped, and a caller holding `&self` keeps it alive.
            let mut st = self.queue.lock();
            let limit = self.queue.config.max_queue_rows;
            if st.rows + rows > limit {
                // Calls whose callers have gone do not count against the limit.
                let before = st.jobs.len();
                st.jobs.retain(|j| !j.reply.is_closed());
                st.rows = st.jobs.iter().map(|j| j.rows).sum();
                let purged = (before - st.jobs.len()) as u64;
                if purged > 0 {
                    metrics::counter!("adserve_ranker_dropped_total", "reason" => "cancelled").increment(purged);
                    self.queue.stats.lock().unwrap_or_else(|p| p.into_inner()).cancelled += purged;
                }
            }
            if st.rows + rows > limit {
                metrics::counter!("adserve_ranker_dropped_total", "reason" => "overloaded").increment(1);
                metrics::gauge!("adserve_ranker_queue_rows").set(st.rows as f64);
                return Err(ScoreError::Overloaded { queued: st.rows, rows, limit });
            }
            st.rows += rows;
            st.jobs.push_back(Job { input, rows, enqueued: Instant::now(), deadline, reply });
            metrics::gauge!("adserve_ranker_queue_rows").set(st.rows as f64);
        }
        self.queue.ready.notify_one();
        answer.await.map_err(|_| ScoreError::Failed("the session thread dropped the call".into()))?
    }

    /// Rows waiting in the queue now.
    pub fn queued_rows(&self) -> usize {
        self.queue.lock().rows
    }

    /// Counts since the queue started.
    pub fn stats(&self) -> BatchStats {
        *self.queue.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

/// A session thread: take a batch, drop what is stale, score the rest.
fn worker(mut session: Session, queue: &Queue, manifest: &ModelManifest) {
    while let Some(batch) = next_batch(queue) {
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        let (mut expired, mut cancelled) = (Vec::new(), 0);
        for job in batch {
            let waited = now.duration_since(job.enqueued);
            if job.reply.is_closed() {
                metrics::counter!("adserve_ranker_dropped_total", "reason" => "cancelled").increment(1);
                cancelled += 1;
            } else if job.deadline.is_some_and(|d| d <= now) {
                metrics::counter!("adserve_ranker_dropped_total", "reason" => "deadline").increment(1);
                expired.push((job, waited));
            } else {
                metrics::histogram!("adserve_ranker_queue_wait_seconds").record(waited.as_secs_f64());
                live.push(job);
            }
        }
        let rows: usize = live.iter().map(|j| j.rows).sum();
        {
            // Counted before anyone is answered, so a caller that reads the
            // stats after its answer sees itself counted.
            let mut stats = queue.stats.lock().unwrap_or_else(|p| p.into_inner());
            stats.expired += expired.len() as u64;
            stats.cancelled += cancelled;
            if !live.is_empty() {
                stats.batches += 1;
                stats.calls += live.len() as u64;
                stats.rows += rows as u64;
            }
        }
        for (job, waited) in expired {
            let _ = job.reply.send(Err(ScoreError::DeadlineExceeded { waited }));
        }
        if live.is_empty() {
            continue;
        }
        metrics::histogram!("adserve_ranker_batch_rows").record(rows as f64);
        metrics::histogram!("adserve_ranker_batch_calls").record(live.len() as f64);
        let input = if live.len() == 1 {
            std::mem::take(&mut live[0].input)
        } else {
            let mut input = Vec::with_capacity(live.iter().map(|j| j.input.len()).sum());
            for job in &live {
                input.extend_from_slice(&job.input);
            }
            input
        };
        let start = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| model::run(&mut session, manifest, input, rows)));
        metrics::histogram!("adserve_ranker_inference_seconds").record(start.elapsed().as_secs_f64());
        match result {
            Ok(Ok(scores)) => {
                let mut at = 0;
                for job in live {
                    let _ = job.reply.send(calibrate(&scores[at..at + job.rows], manifest));
                    at += job.rows;
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, rows, version = %manifest.model_version, "batch failed");
                for job in live {
                    let _ = job.reply.send(Err(ScoreError::Failed(e.to_string())));
                }
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(panic = %message, rows, "session.run panicked");
                for job in live {
                    let _ = job.reply.send(Err(ScoreError::Failed(format!("session.run panicked: {message}"))));
                }
            }
        }
    }
}

/// Checks one call's raw scores are probabilities, and calibrates them
/// (floored at [`MIN_PCTR`]).
fn calibrate(raw: &[f32], manifest: &ModelManifest) -> Result<Scores, ScoreError> {
    let mut pctr = Vec::with_capacity(raw.len());
    for &p in raw {
        if !(p.is_finite() && (0.0..=1.0).contains(&p)) {
            return Err(ScoreError::Failed(format!("model output: pCTR {p} is not a probability")));
        }
        let q = manifest.calibration.as_ref().map_or(p, |c| c.apply(p));
        if !(q.is_finite() && (0.0..=1.0).contains(&q)) {
            return Err(ScoreError::Failed(format!("calibration mapped {p} to {q}, not a probability")));
        }
        pctr.push(q.max(MIN_PCTR));
    }
    Ok(Scores { raw: raw.to_vec(), pctr })
}

/// Blocks until a batch is due; `None` once the queue is closed and empty.
fn next_batch(queue: &Queue) -> Option<Vec<Job>> {
    let config = &queue.config;
    let mut st = queue.lock();
    loop {
        while st.jobs.is_empty() {
            if st.closed {
                return None;
            }
            st = queue.ready.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        // Wait for the batch to fill, at most max_queue_delay from the oldest
        // queued call's arrival (recomputed on every pass: another thread may
        // have taken the calls this one was waiting with).
        while st.rows < config.max_batch_rows && !st.closed {
            let Some(flush_at) = st.jobs.front().map(|j| j.enqueued + config.max_queue_delay) else { break };
            let now = Instant::now();
            if now >= flush_at {
                break;
            }
            st = queue.ready.wait_timeout(st, flush_at - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        if st.jobs.is_empty() {
            continue;
        }
        // Take calls in arrival order up to max_batch_rows (at least one).
        let mut batch = Vec::new();
        let mut rows = 0;
        while let Some(job) = st.jobs.front() {
            if !batch.is_empty() && rows + job.rows > config.max_batch_rows {
                break;
            }
            rows += job.rows;
            batch.extend(st.jobs.pop_front());
        }
        st.rows -= rows;
        metrics::gauge!("adserve_ranker_queue_rows").set(st.rows as f64);
        if !st.jobs.is_empty() {
            // What is left is due for another session.
            queue.ready.notify_one();
        }
        return Some(batch);
    }
}
