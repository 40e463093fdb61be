//! The consume -> join -> write -> commit loop, and what happens when the
//! group rebalances.
//!
//! The join state lives in a [`Core`] shared (behind a mutex that is never
//! held across an `.await`) between the loop and the consumer's
//! [`JoinContext`]: librdkafka calls the context's rebalance hook from inside
//! `recv()`, and before partitions are revoked the hook writes every ready
//! row, commits what the partitions owe and forgets their state; when
//! partitions are assigned it reads the files for rows the previous owner
//! wrote past the committed offsets, so none is written twice.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use adserve_core::{Lifecycle, Readiness, Shutdown};
use adserve_events::{CLICKS_TOPIC, EventPublisher, IMPRESSIONS_TOPIC, decode_click, decode_impressions};
use futures::FutureExt as _;
use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Joiner, LabelJoinerConfig, ParquetSink,
    join::{LabelledRow, RowKind, TopicPartition, millis},
    sink::{self, SinkError},
};

/// What the gRPC service can ask of the loop.
#[derive(Debug)]
pub enum Command {
    /// Write buffered rows now (closing open windows too when asked).
    Flush {
        /// Close windows that are still open.
        close_open_windows: bool,
        /// What was written, or why not.
        reply: oneshot::Sender<Result<Flushed, RunError>>,
    },
}

/// What one flush wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flushed {
    /// The last file written (path or URL), if any.
    pub file: Option<String>,
    /// Rows written, across every file.
    pub rows: usize,
}

/// Live counters, read by GetStatus.
#[derive(Debug, Default, Clone)]
pub struct Status {
    /// Impressions in open windows.
    pub pending: u64,
    /// Labelled rows not yet written.
    pub buffered: u64,
    /// Rows written.
    pub rows_written: u64,
    /// Files written.
    pub files_written: u64,
    /// Dead-lettered messages.
    pub dead_lettered: u64,
    /// Last successful commit.
    pub last_commit: Option<std::time::SystemTime>,
    /// The join's counters.
    pub join: crate::join::JoinStats,
    /// Orphan clicks held.
    pub orphans: u64,
    /// Lowest clicks watermark (ms).
    pub watermark_ms: Option<i64>,
    /// Impressions partitions owned.
    pub partitions: Vec<i32>,
    /// Reading impressions is paused (memory budget).
    pub paused: bool,
    /// Approximate bytes of join state.
    pub state_bytes: u64,
}

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Kafka failed in a way the loop cannot ride out (broker unreachable at
    /// start); [`supervise`] starts over.
    #[error("kafka: {during}: {source}")]
    Kafka {
        /// What the loop was doing.
        during: &'static str,
        /// librdkafka's error.
        source: rdkafka::error::KafkaError,
    },
    /// The consumer could not be created.
    #[error("kafka: creating the consumer: {0}")]
    Consumer(#[source] adserve_events::EventError),
    /// The two topics are not co-partitioned, so a click could land on a
    /// partition whose impression another instance owns.
    #[error(
        "{IMPRESSIONS_TOPIC} has {impressions} partitions but {CLICKS_TOPIC} has {clicks}: the topics must be co-partitioned"
    )]
    NotCoPartitioned {
        /// Impressions partitions.
        impressions: usize,
        /// Clicks partitions.
        clicks: usize,
    },
    /// A poison message could not be dead-lettered after retries; it is not
    /// skipped, and [`supervise`] starts over from the committed offsets.
    #[error("dead-letter publish failed: {0}")]
    DeadLetter(#[source] adserve_events::EventError),
    /// A blocking Kafka call's task died.
    #[error("{during}: blocking task failed: {source}")]
    Task {
        /// What the task was doing.
        during: &'static str,
        /// Why it died.
        source: tokio::task::JoinError,
    },
    /// The consumer is in librdkafka's fatal state and will never recover;
    /// [`supervise`] replaces it.
    #[error("kafka consumer in a fatal state: {code:?}: {reason}")]
    FatalConsumer {
        /// librdkafka's fatal error code.
        code: rdkafka::types::RDKafkaErrorCode,
        /// Its description.
        reason: String,
    },
    /// The loop stopped before answering.
    #[error("the join loop has stopped")]
    Stopped,
    /// The dataset location cannot be used (e.g. a malformed `output_url`).
    #[error("output: {0}")]
    Config(String),
    /// Writing Parquet failed. Only [`SinkError::Ambiguous`] stops the
    /// process; other failures keep the rows buffered and are retried.
    #[error(transparent)]
    Sink(#[from] SinkError),
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

fn topic_of(name: &str) -> Option<&'static str> {
    [IMPRESSIONS_TOPIC, CLICKS_TOPIC].into_iter().find(|t| *t == name)
}

const SINK_DEPENDENCY: &str = "parquet sink";

/// Join state, the sink and what was committed: shared by the loop and the
/// rebalance hook.
pub struct Core {
    joiner: Joiner,
    sink: ParquetSink,
    status: Arc<Mutex<Status>>,
    readiness: Readiness,
    max_rows: usize,
    /// Where each assigned partition started (its committed offset, or the
    /// low watermark without one): the position until a message is read.
    assigned: HashMap<TopicPartition, i64>,
    last_committed: Vec<(TopicPartition, i64)>,
}

impl Core {
    /// Writes every ready row, one file per hour and feature list. Rows of a
    /// failed file go back to the buffer (with every row after them).
    fn write_ready(&mut self) -> Result<Flushed, SinkError> {
        let mut flushed = Flushed::default();
        let rows = self.joiner.take_ready(usize::MAX);
        if rows.is_empty() {
            return Ok(flushed);
        }
        let mut groups = sink::groups(rows).into_iter();
        while let Some(mut group) = groups.next() {
            while !group.is_empty() {
                let rest = group.split_off(group.len().min(self.max_rows));
                match self.sink.write(&group) {
                    Ok(path) => {
                        self.joiner.mark_durable(&group);
                        self.record_written(&group, &path);
                        flushed.rows += group.len();
                        flushed.file = Some(path);
                        group = rest;
                    }
                    Err(e) => {
                        group.extend(rest);
                        group.extend(groups.flatten());
                        self.joiner.restore(group);
                        metrics::counter!("adserve_label_joiner_write_errors_total").increment(1);
                        self.readiness.set(SINK_DEPENDENCY, Some(e.to_string()));
                        return Err(e);
                    }
                }
            }
        }
        self.readiness.set(SINK_DEPENDENCY, None);
        Ok(flushed)
    }

    fn record_written(&self, rows: &[LabelledRow], location: &str) {
        let now = now_ms();
        for kind in RowKind::ALL {
            let n = rows.iter().filter(|r| r.kind == kind).count();
            if n > 0 {
                metrics::counter!("adserve_label_joiner_rows_written_total", "kind" => kind.as_str())
                    .increment(n as u64);
            }
        }
        crate::calibration::record(rows);
        let lag = metrics::histogram!("adserve_label_joiner_join_lag_seconds");
        for r in rows.iter().filter(|r| r.kind == RowKind::Final) {
            let served = r.event.served_at.as_ref().map(millis).unwrap_or(now);
            lag.record((now - served).max(0) as f64 / 1000.0);
        }
        metrics::counter!("adserve_label_joiner_files_written_total").increment(1);
        if let Ok(mut s) = self.status.lock() {
            s.rows_written += rows.len() as u64;
            s.files_written += 1;
        }
        tracing::debug!(file = %location, rows = rows.len(), "parquet file written");
    }

    /// Positions to commit (all partitions, or only `only`), if they changed.
    fn to_commit(&self, only: Option<&[i32]>) -> Option<(Vec<(TopicPartition, i64)>, TopicPartitionList)> {
        let mut positions: Vec<(TopicPartition, i64)> =
            self.joiner.committable().into_iter().filter(|((_, p), _)| only.is_none_or(|o| o.contains(p))).collect();
        positions.sort();
        if positions.is_empty() || (only.is_none() && positions == self.last_committed) {
            return None;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &positions {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)).ok()?;
        }
        Some((positions, tpl))
    }

    fn committed(&mut self, positions: Vec<(TopicPartition, i64)>) {
        self.last_committed = positions;
        if let Ok(mut s) = self.status.lock() {
            s.last_commit = Some(std::time::SystemTime::now());
        }
    }

    fn publish_status(&self, paused: bool) {
        let stats = self.joiner.stats();
        let pending = self.joiner.pending_len();
        metrics::gauge!("adserve_label_joiner_pending_impressions").set(pending as f64);
        metrics::gauge!("adserve_label_joiner_orphan_clicks").set(self.joiner.orphans_len() as f64);
        metrics::gauge!("adserve_label_joiner_state_bytes").set(self.joiner.state_bytes() as f64);
        metrics::gauge!("adserve_label_joiner_paused").set(if paused { 1.0 } else { 0.0 });
        let watermark = self.joiner.watermark_ms();
        if let Some(wm) = watermark {
            metrics::gauge!("adserve_label_joiner_watermark_lag_seconds").set((now_ms() - wm).max(0) as f64 / 1000.0);
        }
        for (name, value) in [
            ("adserve_label_joiner_clicks_joined_total", stats.clicks_joined),
            ("adserve_label_joiner_late_clicks_total", stats.late_clicks),
            ("adserve_label_joiner_clicks_after_close_total", stats.clicks_after_close),
            ("adserve_label_joiner_unmatched_clicks_total", stats.unmatched_clicks),
            ("adserve_label_joiner_orphans_evicted_total", stats.orphans_evicted),
            ("adserve_label_joiner_clicks_before_impression_total", stats.clicks_before_impression),
            ("adserve_label_joiner_duplicates_total", stats.duplicates),
            ("adserve_label_joiner_downsampled_total", stats.downsampled),
            ("adserve_label_joiner_already_written_total", stats.already_written),
            ("adserve_label_joiner_billings_joined_total", stats.billings_joined),
            ("adserve_label_joiner_unbilled_total", stats.unbilled),
            ("adserve_label_joiner_late_billings_total", stats.late_billings),
            ("adserve_label_joiner_billings_after_close_total", stats.billings_after_close),
            ("adserve_label_joiner_unmatched_billings_total", stats.unmatched_billings),
            ("adserve_label_joiner_billings_not_expected_total", stats.billings_not_expected),
        ] {
            metrics::counter!(name).absolute(value);
        }
        for (topic, value) in
            [(IMPRESSIONS_TOPIC, stats.out_of_order_impressions), (CLICKS_TOPIC, stats.out_of_order_clicks)]
        {
            metrics::counter!("adserve_label_joiner_out_of_order_total", "topic" => topic).absolute(value);
        }
        let mut partitions: Vec<i32> =
            self.assigned.keys().filter(|(t, _)| *t == IMPRESSIONS_TOPIC).map(|(_, p)| *p).collect();
        partitions.sort_unstable();
        if let Ok(mut s) = self.status.lock() {
            s.pending = pending as u64;
            s.buffered = self.joiner.ready().len() as u64;
            s.join = stats;
            s.orphans = self.joiner.orphans_len() as u64;
            s.watermark_ms = watermark;
            s.partitions = partitions;
            s.paused = paused;
            s.state_bytes = self.joiner.state_bytes() as u64;
        }
    }
}

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    // A panic while holding the lock leaves consistent-enough state for a
    // restart from committed offsets; never propagate the poison.
    core.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The consumer's context: flushes and commits before partitions go, reads
/// the files before partitions come.
pub struct JoinContext {
    core: Arc<Mutex<Core>>,
}

impl ClientContext for JoinContext {}

impl ConsumerContext for JoinContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => self.revoke(consumer, tpl),
            Rebalance::Assign(tpl) => self.assign(consumer, tpl),
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    parts.sort_unstable();
    parts.dedup();
    parts
}

impl JoinContext {
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let parts = partitions_of(tpl);
        metrics::counter!("adserve_label_joiner_rebalances_total", "change" => "revoke").increment(1);
        let mut core = lock(&self.core);
        let before = core.joiner.pending_len();
        // Rows whose window closed are written now; open windows are the next
        // owner's (it re-reads them from the committed offsets).
        match core.write_ready() {
            Ok(f) if f.rows > 0 => tracing::info!(rows = f.rows, "wrote ready rows before giving partitions up"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "write before revocation failed; the next owner re-reads those rows"),
        }
        if let Some((positions, commit)) = core.to_commit(Some(&parts)) {
            match consumer.commit(&commit, CommitMode::Sync) {
                Ok(()) => core.committed(positions),
                Err(e) => tracing::warn!(error = %e, "commit before revocation failed; the next owner re-reads more"),
            }
        }
        core.joiner.revoke(&parts);
        core.assigned.retain(|(_, p), _| !parts.contains(p));
        tracing::info!(
            partitions = ?parts,
            dropped_pending = before - core.joiner.pending_len(),
            "partitions revoked"
        );
        core.publish_status(false);
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        metrics::counter!("adserve_label_joiner_rebalances_total", "change" => "assign").increment(1);
        let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                // Without the committed offsets the files cannot be matched:
                // treat every row of these partitions as possibly written.
                tracing::warn!(error = %e, "reading committed offsets on assignment failed; scanning from 0");
                tpl.clone()
            }
        };
        let mut from: HashMap<TopicPartition, i64> = HashMap::new();
        for e in committed.elements() {
            let Some(topic) = topic_of(e.topic()) else { continue };
            let offset = match e.offset() {
                Offset::Offset(o) => o,
                _ => consumer.fetch_watermarks(topic, e.partition(), Duration::from_secs(5)).map_or(0, |(low, _)| low),
            };
            from.insert((topic, e.partition()), offset);
        }
        let impressions: HashMap<i32, i64> =
            from.iter().filter(|((t, _), _)| *t == IMPRESSIONS_TOPIC).map(|((_, p), o)| (*p, *o)).collect();
        let mut core = lock(&self.core);
        match core.sink.written_since(&impressions) {
            Ok(written) => {
                if !written.is_empty() {
                    tracing::info!(
                        rows = written.len(),
                        "rows written before the last commit will not be written again"
                    );
                }
                core.joiner.preload_written(written);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot list the dataset; rows past the committed offsets may repeat")
            }
        }
        tracing::info!(partitions = ?partitions_of(tpl), "partitions assigned");
        core.assigned.extend(from);
        core.publish_status(false);
    }
}

/// The running joiner.
pub struct Runner {
    consumer: Arc<StreamConsumer<JoinContext>>,
    core: Arc<Mutex<Core>>,
    publisher: EventPublisher,
    status: Arc<Mutex<Status>>,
    flush_interval: Duration,
    budget: usize,
    pause_before_commit: Duration,
    paused: bool,
    last_flush: Instant,
}

impl Runner {
    /// Checks the topics are co-partitioned and subscribes to both.
    pub async fn start(
        config: &LabelJoinerConfig,
        status: Arc<Mutex<Status>>,
        publisher: EventPublisher,
        readiness: Readiness,
    ) -> Result<Self, RunError> {
        let core = Arc::new(Mutex::new(Core {
            joiner: Joiner::new(config.rules(), IMPRESSIONS_TOPIC, CLICKS_TOPIC),
            sink: ParquetSink::with_target(config.target().map_err(RunError::Config)?),
            status: status.clone(),
            readiness,
            max_rows: config.max_rows_per_file,
            assigned: HashMap::new(),
            last_committed: Vec::new(),
        }));
        let context = JoinContext { core: core.clone() };
        let consumer =
            Arc::new(config.kafka.consumer_with_context(&config.group_id, context).map_err(RunError::Consumer)?);
        let during = "reading topic metadata";
        let counts = {
            let consumer = consumer.clone();
            tokio::task::spawn_blocking(move || -> Result<(usize, usize), rdkafka::error::KafkaError> {
                let count = |topic: &str| -> Result<usize, rdkafka::error::KafkaError> {
                    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
                    Ok(md.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len()))
                };
                Ok((count(IMPRESSIONS_TOPIC)?, count(CLICKS_TOPIC)?))
            })
            .await
            .map_err(|source| RunError::Task { during, source })?
            .map_err(|source| RunError::Kafka { during, source })?
        };
        if counts.0 != counts.1 && counts.0 > 0 && counts.1 > 0 {
            return Err(RunError::NotCoPartitioned { impressions: counts.0, clicks: counts.1 });
        }
        consumer
            .subscribe(&[IMPRESSIONS_TOPIC, CLICKS_TOPIC])
            .map_err(|source| RunError::Kafka { during: "subscribing", source })?;
        Ok(Self {
            consumer,
            core,
            publisher,
            status,
            flush_interval: config.flush_interval,
            budget: config.memory_budget_bytes,
            pause_before_commit: config.test_pause_before_commit,
            paused: false,
            last_flush: Instant::now(),
        })
    }

    /// Runs until `shutdown`; then writes what is labelled, commits, and
    /// leaves the group. Commands (Flush) come from `commands`, which outlives
    /// the runner so a replacement keeps serving them.
    pub async fn run(mut self, shutdown: &Shutdown, commands: &mut mpsc::Receiver<Command>) -> Result<(), RunError> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = self.consumer.recv() => {
                    // Whatever else is already fetched, up to a bound, before the
                    // next select: one message per turn let the tick (due on most
                    // turns under a backlog) set the pace.
                    let mut next = Some(msg);
                    let mut drained = 0;
                    // (`next` is moved, not taken, while a message is handled: a
                    // message borrows the consumer, and `handle` needs `&mut self`.)
                    while let Some(msg) = next {
                        match msg {
                            Ok(m) => {
                                let (topic, partition, offset) = (m.topic().to_string(), m.partition(), m.offset());
                                let key = m.key().map(<[u8]>::to_vec).unwrap_or_default();
                                let payload = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
                                let payload_type = adserve_events::payload_type(m.headers()).map(str::to_owned);
                                drop(m);
                                let message = Read { key: &key, payload: &payload, payload_type: payload_type.as_deref() };
                                self.handle(&topic, partition, offset, message).await?;
                                drained += 1;
                                next = if drained < DRAIN_PER_TURN { self.consumer.recv().now_or_never() } else { None };
                            }
                            Err(e) => {
                                self.on_consume_error(e).await?;
                                next = None;
                            }
                        }
                    }
                }
                _ = tick.tick() => self.on_tick().await?,
                Some(cmd) = commands.recv() => match cmd {
                    Command::Flush { close_open_windows, reply } => {
                        let _ = reply.send(self.flush(close_open_windows).await);
                    }
                },
                _ = shutdown.wait() => break,
            }
        }
        // Rows whose window closed are written; open windows are re-read after restart.
        self.advance().await;
        if let Err(e) = self.flush(false).await {
            tracing::error!(error = %e, "final flush failed; rows will be re-read after restart");
        }
        self.consumer.unsubscribe();
        Ok(())
    }

    /// A consume error: a fatal consumer ends this run (the supervisor
    /// replaces it); anything else is logged and retried after a pause.
    async fn on_consume_error(&mut self, e: rdkafka::error::KafkaError) -> Result<(), RunError> {
        if let Some((code, reason)) = self.consumer.client().fatal_error() {
            // Rows whose window closed are written; their offsets stay
            // uncommitted and the replacement consumer re-reads them
            // (and skips them: they are in a file).
            if let Err(e) = self.flush(false).await {
                tracing::error!(error = %e, "flush before replacing the consumer failed");
            }
            return Err(RunError::FatalConsumer { code, reason });
        }
        tracing::warn!(error = %e, "kafka consume error");
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }

    async fn on_tick(&mut self) -> Result<(), RunError> {
        self.advance().await;
        let ready = lock(&self.core).joiner.ready().len();
        let due = ready > 0 && self.last_flush.elapsed() >= self.flush_interval;
        if due {
            match self.flush(false).await {
                Ok(_) => {}
                Err(e @ RunError::Sink(SinkError::Ambiguous { .. })) => return Err(e),
                Err(e) => tracing::error!(error = %e, "flush failed; rows stay buffered and offsets uncommitted"),
            }
        } else {
            self.commit().await;
        }
        self.apply_budget();
        lock(&self.core).publish_status(self.paused);
        Ok(())
    }

    /// Marks which partitions are read to their end, then closes the windows
    /// the watermarks passed.
    async fn advance(&mut self) {
        let mut core = lock(&self.core);
        let assigned = core.assigned.clone();
        match caught_up(&self.consumer, &assigned) {
            Ok(flags) => {
                for (topic, partition, flag) in flags {
                    core.joiner.set_caught_up(topic, partition, flag);
                }
            }
            Err(e) => {
                // Unknown: event time alone moves the watermarks meanwhile.
                tracing::debug!(error = %e, "reading consumer positions failed");
                for (topic, partition) in assigned.keys().copied() {
                    core.joiner.set_caught_up(topic, partition, false);
                }
            }
        }
        core.joiner.advance(now_ms());
    }

    /// Stops reading impressions while the join state is over budget
    /// (clicks are still read, so windows keep closing and rows keep leaving).
    fn apply_budget(&mut self) {
        let (bytes, impressions) = {
            let core = lock(&self.core);
            let mut tpl = TopicPartitionList::new();
            for (topic, partition) in core.assigned.keys() {
                if *topic == IMPRESSIONS_TOPIC {
                    tpl.add_partition(topic, *partition);
                }
            }
            (core.joiner.state_bytes(), tpl)
        };
        if bytes > self.budget {
            if !self.paused {
                tracing::warn!(bytes, budget = self.budget, "join state over its memory budget; pausing impressions");
            }
            if let Err(e) = self.consumer.pause(&impressions) {
                tracing::warn!(error = %e, "pausing impressions failed");
            }
            self.paused = true;
        } else if self.paused && bytes < self.budget / 10 * 8 {
            if let Err(e) = self.consumer.resume(&impressions) {
                tracing::warn!(error = %e, "resuming impressions failed");
                return;
            }
            tracing::info!(bytes, "join state back under budget; reading impressions again");
            self.paused = false;
        }
    }

    async fn handle(&mut self, topic: &str, partition: i32, offset: i64, m: Read<'_>) -> Result<(), RunError> {
        let Some(tp) = topic_of(topic) else { return Ok(()) };
        let now = now_ms();
        let refused = {
            let mut core = lock(&self.core);
            if tp == IMPRESSIONS_TOPIC {
                // One impression, or a multi-slot answer's batch, taken whole or refused whole.
                decode_impressions(m.payload, m.payload_type)
                    .map_err(|e| e.to_string())
                    .and_then(|es| core.joiner.on_impressions(es, partition, offset, now).map_err(|r| r.to_string()))
            } else {
                decode_click(m.payload)
                    .map_err(|e| e.to_string())
                    .and_then(|c| core.joiner.on_click(c, partition, offset, now).map_err(|r| r.to_string()))
            }
        };
        if let Err(reason) = refused {
            let source = format!("{topic}/{partition}/{offset}");
            tracing::warn!(%source, %reason, "refused message; dead-lettering");
            // The message is skipped only once the dead-letter topic has it.
            let refused = adserve_events::Refused {
                source: &source,
                key: m.key,
                payload: m.payload,
                payload_type: m.payload_type,
                reason: &reason,
            };
            self.publisher.dead_letter_patiently(&refused).await.map_err(RunError::DeadLetter)?;
            lock(&self.core).joiner.skip((tp, partition), offset);
            metrics::counter!("adserve_label_joiner_dead_lettered_total", "topic" => tp).increment(1);
            if let Ok(mut s) = self.status.lock() {
                s.dead_lettered += 1;
            }
        }
        metrics::counter!("adserve_label_joiner_consumed_total", "topic" => tp).increment(1);
        Ok(())
    }

    async fn flush(&mut self, close_open_windows: bool) -> Result<Flushed, RunError> {
        let written = {
            let mut core = lock(&self.core);
            if close_open_windows {
                core.joiner.close_all(now_ms());
            }
            core.write_ready()
        };
        self.last_flush = Instant::now();
        let flushed = written?;
        if flushed.rows > 0 && !self.pause_before_commit.is_zero() {
            tokio::time::sleep(self.pause_before_commit).await;
        }
        self.commit().await;
        lock(&self.core).publish_status(self.paused);
        Ok(flushed)
    }

    async fn commit(&mut self) {
        let Some((positions, tpl)) = lock(&self.core).to_commit(None) else { return };
        let consumer = self.consumer.clone();
        match tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await {
            Ok(Ok(())) => lock(&self.core).committed(positions),
            Ok(Err(e)) => tracing::warn!(error = %e, "offset commit failed; will retry"),
            Err(e) => tracing::warn!(error = %e, "offset commit task failed"),
        }
    }
}

/// A message read, as `handle` needs it.
struct Read<'a> {
    key: &'a [u8],
    payload: &'a [u8],
    /// Its `adserve-payload` header (an impression batch).
    payload_type: Option<&'a str>,
}

/// For each assigned topic-partition: whether the consumer has read it to
/// its high watermark, as of the last fetch response (no broker round trip:
/// this runs on every tick, on the loop). A partition no fetch has answered
/// for yet is not caught up; one nothing was read from yet counts from where
/// it was assigned (its committed offset), so a quiet topic after a restart
/// is caught up once its first (empty) fetch answers, not behind forever.
fn caught_up(
    consumer: &StreamConsumer<JoinContext>,
    assigned: &HashMap<TopicPartition, i64>,
) -> Result<Vec<(&'static str, i32, bool)>, rdkafka::error::KafkaError> {
    let positions = consumer.position()?;
    let mut flags = Vec::with_capacity(assigned.len());
    for (&(topic, partition), &from) in assigned {
        let Some((low, high)) = adserve_events::cached_watermarks(consumer.client(), topic, partition) else {
            flags.push((topic, partition, false));
            continue;
        };
        let position = match positions.find_partition(topic, partition).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => from.max(low),
        };
        flags.push((topic, partition, position >= high));
    }
    Ok(flags)
}

/// Runs the join loop until shutdown, replacing it (consumer, producer
/// state, in-memory joins) whenever Kafka fails under it: a fatal consumer, a
/// broker unreachable at start, dead-lettering that keeps failing. Each
/// replacement starts from the committed offsets and the files already
/// written, exactly as a process restart would, after a jittered exponential
/// backoff; readiness reports the consumer down meanwhile. Only a sink
/// failure that leaves a file's fate unknown stops the process.
pub async fn supervise(
    config: &LabelJoinerConfig,
    status: Arc<Mutex<Status>>,
    publisher: EventPublisher,
    lifecycle: &Lifecycle,
    mut commands: mpsc::Receiver<Command>,
) -> Result<(), RunError> {
    const DEPENDENCY: &str = "kafka consumer";
    let mut backoff = config.kafka.recovery_backoff();
    loop {
        let result = match Runner::start(config, status.clone(), publisher.clone(), lifecycle.readiness.clone()).await {
            Ok(runner) => {
                lifecycle.readiness.set(DEPENDENCY, None);
                let started = Instant::now();
                let result = runner.run(&lifecycle.shutdown, &mut commands).await;
                // Only a run that stayed up for a while earns a fresh backoff:
                // a loop that fails right after every start keeps backing off.
                if started.elapsed() >= HEALTHY_RUN {
                    backoff = config.kafka.recovery_backoff();
                }
                result
            }
            Err(e) => Err(e),
        };
        let e = match result {
            Ok(()) => return Ok(()),
            Err(e @ RunError::Sink(_)) => return Err(e),
            Err(e) => e,
        };
        let delay = backoff.next().unwrap_or(config.kafka.recovery_backoff_max);
        tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "join loop failed; starting it over");
        metrics::counter!("adserve_label_joiner_restarts_total").increment(1);
        lifecycle.readiness.set(DEPENDENCY, Some(e.to_string()));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = lifecycle.shutdown.wait() => return Ok(()),
        }
    }
}

/// Messages handled per turn of the join loop before ticks and commands
/// get a look in.
const DRAIN_PER_TURN: usize = 1000;

/// How long a join loop must run before its failure counts as a new
/// incident (backoff starts over) rather than a crash loop (backoff grows).
pub const HEALTHY_RUN: Duration = Duration::from_secs(30);
