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
//! **Deadline misses are predicted** (`predict_misses`): the queue fits what
//! one run of n rows costs here, a + b·n, by exponentially weighted least
//! squares over recent runs ([`CostModel`]), and a call that arrives with a
//! deadline it would miss (the batches queued and running ahead of it, shared
//! across the sessions, then its own run) is refused at once (`WouldMiss`):
//! the caller's fallback answers now instead of after the wait, and the
//! queue does not grow with work nobody will read. At most one such call a
//! second runs anyway, so a cost inflated by a past burst is re-measured.
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
    model::{self, Input, MIN_PCTR, ModelManifest},
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
    /// The call would finish after its deadline (predicted at arrival).
    #[error(
        "the model would miss the call's deadline: predicted {predicted:?} ({queued} rows queued, {running} running), {left:?} left"
    )]
    WouldMiss {
        /// Predicted time from arrival to the call's scores.
        predicted: Duration,
        /// Time left before the call's deadline.
        left: Duration,
        /// Rows queued ahead of it.
        queued: usize,
        /// Rows being scored.
        running: usize,
    },
    /// Scoring failed: ONNX Runtime's error, a panic in the session thread,
    /// or an output that is not a probability. A run merged from several
    /// calls that ONNX Runtime refuses is split until each call fails or
    /// runs on its own; a model failure fails every call in the batch.
    #[error("scoring failed: {0}")]
    Failed(String),
}

/// Which of a ranker's queues a [`Batcher`] is: the `queue` label of its
/// metrics, beside `model_version`, and its session threads' names and
/// priority. The served models (production, canary) differ by version; the
/// fallback model can be the same version as production (both are
/// `model.dir` until the registry has a production version), so its queue
/// needs a label of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    /// A served model: production or canary (a canary is promoted in place).
    #[default]
    Model,
    /// The fallback model (`fallback.model_dir`).
    Fallback,
    /// The shadow model, which scores after the answer. Its session threads
    /// run at the lowest CPU priority (nice 19, Linux): when the CPU is
    /// contended the served models' threads get it first. (Under a CPU
    /// limit the shadow's CPU still counts against the pod's quota, and
    /// ONNX Runtime's own intra-op threads, with `intra_threads` > 1, keep
    /// normal priority.) A shadow version is never promoted in place:
    /// promoted, it is loaded again as a served model.
    Shadow,
}

impl QueueKind {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Fallback => "fallback",
            Self::Shadow => "shadow",
        }
    }

    /// Session thread name (at most 15 bytes: what Linux keeps).
    fn thread_name(self, i: usize) -> String {
        match self {
            Self::Model => format!("rank-model-{i}"),
            Self::Fallback => format!("rank-fallbk-{i}"),
            Self::Shadow => format!("rank-shadow-{i}"),
        }
    }
}

/// Lowers the calling thread's CPU priority to nice 19. On Linux the nice
/// value is per thread, so `setpriority(PRIO_PROCESS, 0)` changes only this
/// one; elsewhere it would lower the whole process, so nothing is done. A
/// failure is logged, not fatal: the thread then runs at normal priority.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a plain system call with integer arguments only (no
        // pointers): it cannot touch this process's memory.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(error = %e, "could not lower the shadow session thread's priority");
        }
    }
}

/// One queue's metric handles, labelled `model_version` and `queue` once at
/// start (so the shadow's queue never overwrites production's depth, and no
/// call pays a registry lookup).
struct QueueMetrics {
    queue_rows: metrics::Gauge,
    queue_wait: metrics::Histogram,
    batch_rows: metrics::Histogram,
    batch_calls: metrics::Histogram,
    inference: metrics::Histogram,
    cancelled: metrics::Counter,
    overloaded: metrics::Counter,
    predicted_miss: metrics::Counter,
    deadline: metrics::Counter,
    split: metrics::Counter,
}

impl QueueMetrics {
    fn new(version: &str, kind: QueueKind) -> Self {
        let (v, q) = (version.to_string(), kind.as_str());
        let dropped = |reason: &'static str| metrics::counter!("adserve_ranker_dropped_total", "reason" => reason, "model_version" => v.clone(), "queue" => q);
        Self {
            queue_rows: metrics::gauge!("adserve_ranker_queue_rows", "model_version" => v.clone(), "queue" => q),
            queue_wait: metrics::histogram!("adserve_ranker_queue_wait_seconds", "model_version" => v.clone(), "queue" => q),
            batch_rows: metrics::histogram!("adserve_ranker_batch_rows", "model_version" => v.clone(), "queue" => q),
            batch_calls: metrics::histogram!("adserve_ranker_batch_calls", "model_version" => v.clone(), "queue" => q),
            inference: metrics::histogram!("adserve_ranker_inference_seconds", "model_version" => v.clone(), "queue" => q),
            cancelled: dropped("cancelled"),
            overloaded: dropped("overloaded"),
            predicted_miss: dropped("predicted_miss"),
            deadline: dropped("deadline"),
            split: metrics::counter!("adserve_ranker_batch_splits_total", "model_version" => v.clone(), "queue" => q),
        }
    }
}

/// How often a call runs despite a predicted miss (see the module doc).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

struct Job {
    /// The call's rows, gathered into the model's inputs.
    input: Input,
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
    /// Batches being scored, and their rows.
    running: usize,
    running_rows: usize,
    /// What a run costs, fitted on the runs so far.
    cost: CostModel,
    /// When a call last ran despite a predicted miss.
    probed: Option<Instant>,
}

/// What one `session.run` of n rows costs: a + b·n seconds, fitted by least
/// squares with exponentially decaying weights (each run's weight halves
/// after ~70 more), so it follows the machine's load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CostModel {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
    runs: u64,
}

impl CostModel {
    const DECAY: f64 = 0.99;
    /// Runs observed before the fit is trusted.
    pub const WARM: u64 = 16;

    /// Records one run of `rows` rows that took `secs`.
    pub fn observe(&mut self, rows: usize, secs: f64) {
        let (x, d) = (rows as f64, Self::DECAY);
        self.w = self.w * d + 1.0;
        self.x = self.x * d + x;
        self.y = self.y * d + secs;
        self.xx = self.xx * d + x * x;
        self.xy = self.xy * d + x * secs;
        self.runs += 1;
    }

    /// `(a, b)`: seconds per run and per row, both >= 0; `None` until
    /// [`WARM`](Self::WARM) runs. When every run had about the same size the
    /// two cannot be told apart, and the cost is taken as proportional to
    /// the rows.
    pub fn fit(&self) -> Option<(f64, f64)> {
        if self.runs < Self::WARM || self.x <= 0.0 {
            return None;
        }
        let mean_x = self.x / self.w;
        let var = self.xx / self.w - mean_x * mean_x;
        if var <= (0.05 * mean_x).powi(2) {
            return Some((0.0, self.y / self.x));
        }
        let b = ((self.xy / self.w - mean_x * self.y / self.w) / var).max(0.0);
        let a = ((self.y - b * self.x) / self.w).max(0.0);
        Some((a, b))
    }

    /// Seconds one run of `rows` rows takes, once warm.
    pub fn cost(&self, rows: usize) -> Option<f64> {
        self.fit().map(|(a, b)| a + b * rows as f64)
    }
}

/// When a call of `rows` rows arriving now would have its scores: the
/// queued batches (`max_batch_rows` each) and half of each running one,
/// shared across `sessions`, then its own run. `None` until the cost model
/// is warm.
fn predict(st: &State, rows: usize, sessions: usize, max_batch_rows: usize) -> Option<Duration> {
    let (a, b) = st.cost.fit()?;
    let own = a + b * rows as f64;
    let wait = if st.rows == 0 && st.running < sessions {
        0.0
    } else {
        let queued = st.rows.div_ceil(max_batch_rows.max(1)) as f64 * a + b * st.rows as f64;
        let running = 0.5 * (st.running as f64 * a + b * st.running_rows as f64);
        (queued + running) / sessions.max(1) as f64
    };
    Some(Duration::from_secs_f64(wait + own))
}

struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    config: BatchingConfig,
    version: String,
    stats: Mutex<BatchStats>,
    metrics: QueueMetrics,
}

/// What a model's queue has done since it started (also exported as
/// metrics; kept here so tests and `GetModel` can read them per model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// `session.run` calls (a failed batch's runs again included).
    pub batches: u64,
    /// Score calls run through `session.run`.
    pub calls: u64,
    /// Rows scored.
    pub rows: u64,
    /// Calls dropped unscored because their deadline had passed.
    pub expired: u64,
    /// Calls dropped unscored because their caller had gone.
    pub cancelled: u64,
    /// Calls refused at arrival because they would have missed their deadline.
    pub predicted_misses: u64,
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
    pub(crate) fn start(
        sessions: Vec<Session>,
        manifest: ModelManifest,
        config: BatchingConfig,
        kind: QueueKind,
    ) -> Self {
        let queue = Arc::new(Queue {
            state: Mutex::default(),
            ready: Condvar::new(),
            config,
            version: manifest.model_version.clone(),
            stats: Mutex::default(),
            metrics: QueueMetrics::new(&manifest.model_version, kind),
        });
        let manifest = Arc::new(manifest);
        // Each thread reports once its priority is set, so the queue is
        // returned (and the model served) only with every thread as it will run.
        let (started, all_started) = std::sync::mpsc::channel();
        let threads = sessions.len();
        for (i, session) in sessions.into_iter().enumerate() {
            let (queue, manifest, started) = (queue.clone(), manifest.clone(), started.clone());
            std::thread::Builder::new()
                .name(kind.thread_name(i))
                .spawn(move || {
                    if kind == QueueKind::Shadow {
                        lower_this_threads_priority();
                    }
                    let _ = started.send(());
                    worker(session, &queue, &manifest)
                })
                .expect("spawning a session thread");
        }
        // Only the threads hold senders now: a thread that died before
        // reporting ends the wait instead of hanging it.
        drop(started);
        for _ in 0..threads {
            if all_started.recv().is_err() {
                tracing::error!(version = %queue.version, "a session thread exited before it started");
                break;
            }
        }
        Self { queue }
    }

    /// Queues a call's rows (already gathered and checked) and waits for
    /// their scores. When the returned future is dropped the call is
    /// skipped, not scored.
    pub async fn score(&self, input: Input, deadline: Option<Instant>) -> Result<Scores, ScoreError> {
        let rows = input.rows;
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
                    self.queue.metrics.cancelled.increment(purged);
                    self.queue.stats.lock().unwrap_or_else(|p| p.into_inner()).cancelled += purged;
                }
            }
            if st.rows + rows > limit {
                self.queue.metrics.overloaded.increment(1);
                self.queue.metrics.queue_rows.set(st.rows as f64);
                return Err(ScoreError::Overloaded { queued: st.rows, rows, limit });
            }
            let config = &self.queue.config;
            if let Some(deadline) = deadline.filter(|_| config.predict_misses) {
                let now = Instant::now();
                if let Some(predicted) = predict(&st, rows, config.sessions, config.max_batch_rows)
                    && now + predicted > deadline
                {
                    if st.probed.is_some_and(|at| now.duration_since(at) < PROBE_INTERVAL) {
                        self.queue.metrics.predicted_miss.increment(1);
                        self.queue.stats.lock().unwrap_or_else(|p| p.into_inner()).predicted_misses += 1;
                        return Err(ScoreError::WouldMiss {
                            predicted,
                            left: deadline.saturating_duration_since(now),
                            queued: st.rows,
                            running: st.running_rows,
                        });
                    }
                    // The probe: runs despite the prediction, so the cost is re-measured.
                    st.probed = Some(now);
                }
            }
            st.rows += rows;
            st.jobs.push_back(Job { input, rows, enqueued: Instant::now(), deadline, reply });
            self.queue.metrics.queue_rows.set(st.rows as f64);
        }
        self.queue.ready.notify_one();
        answer.await.map_err(|_| ScoreError::Failed("the session thread dropped the call".into()))?
    }

    /// Rows waiting in the queue now.
    pub fn queued_rows(&self) -> usize {
        self.queue.lock().rows
    }

    /// What a run costs here, as fitted so far.
    pub fn cost_model(&self) -> CostModel {
        self.queue.lock().cost
    }

    /// Counts since the queue started.
    pub fn stats(&self) -> BatchStats {
        *self.queue.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        let mut st = self.queue.lock();
        st.closed = true;
        // Calls still queued are scored (and the gauge follows them); an idle
        // queue's gauge reads 0 rather than its last depth.
        if st.jobs.is_empty() {
            self.queue.metrics.queue_rows.set(0.0);
        }
        drop(st);
        self.queue.ready.notify_all();
    }
}

/// A session thread: take a batch, drop what is stale, score the rest.
fn worker(mut session: Session, queue: &Queue, manifest: &ModelManifest) {
    while let Some(batch) = next_batch(queue) {
        let taken: usize = batch.iter().map(|j| j.rows).sum();
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        let (mut expired, mut cancelled) = (Vec::new(), 0);
        for job in batch {
            let waited = now.duration_since(job.enqueued);
            if job.reply.is_closed() {
                queue.metrics.cancelled.increment(1);
                cancelled += 1;
            } else if job.deadline.is_some_and(|d| d <= now) {
                queue.metrics.deadline.increment(1);
                expired.push((job, waited));
            } else {
                queue.metrics.queue_wait.record(waited.as_secs_f64());
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
            release(queue, taken);
            continue;
        }
        queue.metrics.batch_rows.record(rows as f64);
        queue.metrics.batch_calls.record(live.len() as f64);
        let result = run_jobs(&mut session, queue, manifest, &mut live);
        if let (Err(Failure::Rows(e)), true) = (&result, live.len() > 1) {
            // One call's rows can fail a run merged from several (a value
            // the graph cannot take, such as an index past a table), and
            // would fail every call batched with it. The batch is halved
            // and each half run again, down to single calls: only a call
            // that fails by itself fails (the fallback chain answers it),
            // and a half that runs answers all its calls at once (about
            // 2 log2(calls) runs for one bad call, not one per call). The
            // session stays counted as busy with the batch meanwhile, so
            // arrivals are predicted to wait for it.
            queue.metrics.split.increment(1);
            tracing::warn!(error = %e, calls = live.len(), rows, version = %manifest.model_version,
                "a batch failed; running its halves again");
            let right = live.split_off(live.len() / 2);
            settle(&mut session, queue, manifest, live);
            settle(&mut session, queue, manifest, right);
            release(queue, taken);
        } else {
            release(queue, taken);
            answer(live, result, manifest);
        }
    }
}

/// Why a run failed.
enum Failure {
    /// ONNX Runtime would not run these rows: some of the calls merged
    /// into the run may run on their own.
    Rows(String),
    /// The model or the session failed (an output that is not one score
    /// per row, a panic): any run would fail the same way.
    Model(String),
}

/// One `session.run` of `jobs`' rows, timed (and, when it runs, fed to
/// the queue's cost model). Each job keeps its input when there are
/// several (concatenated by copy), so a failed run can be split.
fn run_jobs(
    session: &mut Session,
    queue: &Queue,
    manifest: &ModelManifest,
    jobs: &mut [Job],
) -> Result<Vec<f32>, Failure> {
    let rows = jobs.iter().map(|j| j.rows).sum();
    let input = Input::concat(&mut jobs.iter_mut().map(|j| &mut j.input).collect::<Vec<_>>());
    let start = Instant::now();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| model::run(session, manifest, input)));
    let took = start.elapsed();
    queue.metrics.inference.record(took.as_secs_f64());
    match result {
        Ok(Ok(scores)) => {
            queue.lock().cost.observe(rows, took.as_secs_f64());
            Ok(scores)
        }
        Ok(Err(e @ model::ModelError::Runtime { stage: "run", .. })) => Err(Failure::Rows(e.to_string())),
        Ok(Err(e)) => Err(Failure::Model(e.to_string())),
        Err(panic) => Err(Failure::Model(format!("session.run panicked: {}", panic_message(&*panic)))),
    }
}

/// Runs part of a failed batch again ([`worker`]): its calls whose caller
/// is still there and in time, halved again while a run of several fails
/// on its rows.
fn settle(session: &mut Session, queue: &Queue, manifest: &ModelManifest, jobs: Vec<Job>) {
    let now = Instant::now();
    let mut live = Vec::with_capacity(jobs.len());
    for job in jobs {
        if job.reply.is_closed() {
            queue.metrics.cancelled.increment(1);
            queue.stats.lock().unwrap_or_else(|p| p.into_inner()).cancelled += 1;
        } else if job.deadline.is_some_and(|d| d <= now) {
            queue.metrics.deadline.increment(1);
            queue.stats.lock().unwrap_or_else(|p| p.into_inner()).expired += 1;
            let _ = job.reply.send(Err(ScoreError::DeadlineExceeded { waited: now.duration_since(job.enqueued) }));
        } else {
            live.push(job);
        }
    }
    if live.is_empty() {
        return;
    }
    queue.stats.lock().unwrap_or_else(|p| p.into_inner()).batches += 1;
    let result = run_jobs(session, queue, manifest, &mut live);
    if let (Err(Failure::Rows(_)), true) = (&result, live.len() > 1) {
        let right = live.split_off(live.len() / 2);
        settle(session, queue, manifest, live);
        settle(session, queue, manifest, right);
    } else {
        answer(live, result, manifest);
    }
}

/// Answers `jobs` with their share of a run's scores, or its failure.
fn answer(jobs: Vec<Job>, result: Result<Vec<f32>, Failure>, manifest: &ModelManifest) {
    match result {
        Ok(scores) => {
            let mut at = 0;
            for job in jobs {
                let _ = job.reply.send(calibrate(&scores[at..at + job.rows], manifest));
                at += job.rows;
            }
        }
        Err(Failure::Rows(e) | Failure::Model(e)) => {
            let rows: usize = jobs.iter().map(|j| j.rows).sum();
            tracing::error!(error = %e, calls = jobs.len(), rows, version = %manifest.model_version, "session.run failed");
            for job in jobs {
                let _ = job.reply.send(Err(ScoreError::Failed(e.clone())));
            }
        }
    }
}

/// The session is done with a batch of `taken` rows.
fn release(queue: &Queue, taken: usize) {
    let mut st = queue.lock();
    st.running -= 1;
    st.running_rows -= taken;
}

/// What a panic said, if it said it as a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
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
        st.running += 1;
        st.running_rows += rows;
        queue.metrics.queue_rows.set(st.rows as f64);
        if !st.jobs.is_empty() {
            // What is left is due for another session.
            queue.ready.notify_one();
        }
        return Some(batch);
    }
}
