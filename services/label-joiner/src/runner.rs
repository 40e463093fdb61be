//! The consume -> join -> write -> commit loop.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration, time::Instant};

use adserve_core::{Lifecycle, Shutdown};
use adserve_events::{CLICKS_TOPIC, EventPublisher, IMPRESSIONS_TOPIC, decode_click, decode_impression};
use backon::Retryable as _;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
};
use tokio::sync::{mpsc, oneshot};

use crate::{Joiner, LabelJoinerConfig, ParquetSink, sink};

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
    /// The last file written, if any.
    pub file: Option<PathBuf>,
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
    /// Clicks joined.
    pub clicks_joined: u64,
    /// Late clicks.
    pub late_clicks: u64,
    /// Dead-lettered messages.
    pub dead_lettered: u64,
    /// Last successful commit.
    pub last_commit: Option<std::time::SystemTime>,
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
    /// Writing Parquet failed.
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

fn topic_of(name: &str) -> Option<&'static str> {
    [IMPRESSIONS_TOPIC, CLICKS_TOPIC].into_iter().find(|t| *t == name)
}

/// The running joiner.
pub struct Runner {
    consumer: Arc<StreamConsumer>,
    publisher: EventPublisher,
    joiner: Joiner,
    sink: ParquetSink,
    status: Arc<std::sync::Mutex<Status>>,
    flush_interval: Duration,
    max_rows: usize,
    last_flush: Instant,
    last_committed: Vec<((&'static str, i32), i64)>,
}

impl Runner {
    /// Subscribes to both topics and recovers what an earlier run wrote but
    /// did not commit.
    pub async fn start(
        config: &LabelJoinerConfig,
        status: Arc<std::sync::Mutex<Status>>,
        publisher: EventPublisher,
    ) -> Result<Self, RunError> {
        let consumer = Arc::new(config.kafka.consumer(&config.group_id).map_err(RunError::Consumer)?);
        let sink = ParquetSink::new(&config.output_dir)?;
        let during = "reading committed offsets";
        let committed = {
            let consumer = consumer.clone();
            tokio::task::spawn_blocking(move || committed_impression_offsets(&consumer))
                .await
                .map_err(|source| RunError::Task { during, source })?
                .map_err(|source| RunError::Kafka { during, source })?
        };
        let mut joiner = Joiner::new(config.label_window.as_millis().try_into().unwrap_or(u64::MAX));
        let written = sink::written_since(sink.dir(), &committed)?;
        if !written.is_empty() {
            tracing::info!(rows = written.len(), "rows written before the last commit will not be written again");
        }
        joiner.preload_written(written, now_ms());
        consumer
            .subscribe(&[IMPRESSIONS_TOPIC, CLICKS_TOPIC])
            .map_err(|source| RunError::Kafka { during: "subscribing", source })?;
        Ok(Self {
            consumer,
            publisher,
            joiner,
            sink,
            status,
            flush_interval: config.flush_interval,
            max_rows: config.max_rows_per_file,
            last_flush: Instant::now(),
            last_committed: Vec::new(),
        })
    }

    /// Runs until `shutdown`; then writes what is labelled, commits, and
    /// leaves the group. Commands (Flush) come from `commands`, which outlives
    /// the runner so a replacement keeps serving them.
    pub async fn run(mut self, shutdown: &Shutdown, commands: &mut mpsc::Receiver<Command>) -> Result<(), RunError> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = self.consumer.recv() => match msg {
                    Ok(m) => {
                        let (topic, partition, offset) = (m.topic().to_string(), m.partition(), m.offset());
                        let key = m.key().map(<[u8]>::to_vec).unwrap_or_default();
                        let payload = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
                        drop(m);
                        self.handle(&topic, partition, offset, &key, &payload).await?;
                    }
                    Err(e) => {
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
                    }
                },
                _ = tick.tick() => {
                    if self.clicks_caught_up().await {
                        self.joiner.close_windows(now_ms(), false);
                    }
                    let due = self.joiner.ready().len() >= self.max_rows
                        || (!self.joiner.ready().is_empty() && self.last_flush.elapsed() >= self.flush_interval);
                    if due {
                        if let Err(e) = self.flush(false).await {
                            tracing::error!(error = %e, "flush failed; rows stay buffered and offsets uncommitted");
                        }
                    } else {
                        self.commit().await;
                    }
                    self.publish_status();
                }
                Some(cmd) = commands.recv() => match cmd {
                    Command::Flush { close_open_windows, reply } => {
                        let _ = reply.send(self.flush(close_open_windows).await);
                    }
                },
                _ = shutdown.wait() => break,
            }
        }
        // Rows whose window closed are written; open windows are re-read after restart.
        if self.clicks_caught_up().await {
            self.joiner.close_windows(now_ms(), false);
        }
        if let Err(e) = self.flush(false).await {
            tracing::error!(error = %e, "final flush failed; rows will be re-read after restart");
        }
        self.consumer.unsubscribe();
        Ok(())
    }

    async fn handle(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        key: &[u8],
        payload: &[u8],
    ) -> Result<(), RunError> {
        let Some(tp) = topic_of(topic) else { return Ok(()) };
        let decoded = if tp == IMPRESSIONS_TOPIC {
            decode_impression(payload).map(|e| self.joiner.on_impression(e, (tp, partition), offset))
        } else {
            decode_click(payload).map(|c| self.joiner.on_click(c, (tp, partition), offset, now_ms()))
        };
        if let Err(reason) = decoded {
            let reason = reason.to_string();
            let source = format!("{topic}/{partition}/{offset}");
            tracing::warn!(%source, %reason, "poison message; dead-lettering");
            // The message is skipped only once the dead-letter topic has it.
            let publisher = self.publisher.clone();
            (|| publisher.dead_letter(&source, key, payload, &reason))
                .retry(
                    backon::ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(100))
                        .with_max_delay(Duration::from_secs(2))
                        .with_max_times(5)
                        .with_jitter(),
                )
                .notify(|e, after| tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64, "dead-letter publish failed"))
                .await
                .map_err(RunError::DeadLetter)?;
            self.joiner.skip((tp, partition), offset);
            metrics::counter!("adserve_label_joiner_dead_lettered_total").increment(1);
            if let Ok(mut s) = self.status.lock() {
                s.dead_lettered += 1;
            }
        }
        metrics::counter!("adserve_label_joiner_consumed_total", "topic" => tp).increment(1);
        Ok(())
    }

    /// True when every clicks partition has been read up to its high
    /// watermark: only then may a window close without missing a click that
    /// is already in the log (matters when catching up after downtime).
    async fn clicks_caught_up(&self) -> bool {
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || -> Result<bool, rdkafka::error::KafkaError> {
            let positions = consumer.position()?;
            let assigned = consumer.assignment()?;
            for el in assigned.elements_for_topic(CLICKS_TOPIC) {
                let (_, high) = consumer.fetch_watermarks(CLICKS_TOPIC, el.partition(), Duration::from_secs(1))?;
                let pos = positions.find_partition(CLICKS_TOPIC, el.partition()).and_then(|p| match p.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
                if high > 0 && pos.is_none_or(|p| p < high) {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(false)
    }

    async fn flush(&mut self, close_open_windows: bool) -> Result<Flushed, RunError> {
        if close_open_windows {
            self.joiner.close_windows(now_ms(), true);
        }
        let mut last = None;
        let mut total = 0;
        while !self.joiner.ready().is_empty() {
            let rows = self.joiner.take_ready(self.max_rows);
            match self.sink.write(&rows) {
                Ok(path) => {
                    self.joiner.mark_durable(&rows, IMPRESSIONS_TOPIC);
                    metrics::counter!("adserve_label_joiner_rows_written_total").increment(rows.len() as u64);
                    metrics::counter!("adserve_label_joiner_files_written_total").increment(1);
                    if let Ok(mut s) = self.status.lock() {
                        s.rows_written += rows.len() as u64;
                        s.files_written += 1;
                    }
                    tracing::info!(file = %path.display(), rows = rows.len(), "parquet file written");
                    total += rows.len();
                    last = Some(path);
                }
                Err(e) => {
                    self.joiner.restore(rows);
                    return Err(e.into());
                }
            }
        }
        self.last_flush = Instant::now();
        self.commit().await;
        self.publish_status();
        Ok(Flushed { file: last, rows: total })
    }

    async fn commit(&mut self) {
        let mut positions = self.joiner.committable();
        positions.sort();
        if positions.is_empty() || positions == self.last_committed {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &positions {
            if tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)).is_err() {
                return;
            }
        }
        let consumer = self.consumer.clone();
        match tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await {
            Ok(Ok(())) => {
                self.last_committed = positions;
                if let Ok(mut s) = self.status.lock() {
                    s.last_commit = Some(std::time::SystemTime::now());
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "offset commit failed; will retry"),
            Err(e) => tracing::warn!(error = %e, "offset commit task failed"),
        }
    }

    fn publish_status(&self) {
        let stats = self.joiner.stats();
        metrics::gauge!("adserve_label_joiner_pending_impressions").set(self.joiner.pending_len() as f64);
        if let Ok(mut s) = self.status.lock() {
            s.pending = self.joiner.pending_len() as u64;
            s.buffered = self.joiner.ready().len() as u64;
            s.clicks_joined = stats.clicks_joined;
            s.late_clicks = stats.late_clicks;
        }
    }
}

/// Runs the join loop until shutdown, replacing it (consumer, producer
/// state, in-memory joins) whenever Kafka fails under it: a fatal consumer, a
/// broker unreachable at start, dead-lettering that keeps failing. Each
/// replacement starts from the committed offsets and the files already
/// written, exactly as a process restart would, after a jittered exponential
/// backoff; readiness reports the consumer down meanwhile. Only a failure of
/// the Parquet sink (the output directory) stops the process.
pub async fn supervise(
    config: &LabelJoinerConfig,
    status: Arc<std::sync::Mutex<Status>>,
    publisher: EventPublisher,
    lifecycle: &Lifecycle,
    mut commands: mpsc::Receiver<Command>,
) -> Result<(), RunError> {
    const DEPENDENCY: &str = "kafka consumer";
    let mut backoff = config.kafka.recovery_backoff();
    loop {
        let result = match Runner::start(config, status.clone(), publisher.clone()).await {
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

/// How long a join loop must run before its failure counts as a new
/// incident (backoff starts over) rather than a crash loop (backoff grows).
pub const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Committed offsets of the impressions topic's partitions for this group.
fn committed_impression_offsets(consumer: &StreamConsumer) -> Result<HashMap<i32, i64>, rdkafka::error::KafkaError> {
    let timeout = Duration::from_secs(5);
    let metadata = consumer.fetch_metadata(Some(IMPRESSIONS_TOPIC), timeout)?;
    let mut tpl = TopicPartitionList::new();
    for topic in metadata.topics() {
        for p in topic.partitions() {
            tpl.add_partition(topic.name(), p.id());
        }
    }
    if tpl.count() == 0 {
        return Ok(HashMap::new());
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            (
                e.partition(),
                match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                },
            )
        })
        .collect())
}
