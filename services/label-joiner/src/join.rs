//! The join itself, as a pure state machine over (message, offset) inputs.
//!
//! **Co-partitioning.** Impressions and clicks are both keyed by impression
//! id on topics with the same partition count, so the click for an
//! impression on impressions partition `k` is on clicks partition `k`. All
//! state here is kept per partition number: a joiner that owns `k` owns both
//! halves of the join, and giving `k` up ([`Joiner::revoke`]) drops exactly
//! that state.
//!
//! **Event time and watermarks.** A window closes when the *clicks*
//! watermark of its partition passes the impression's `served_at + window`:
//! the largest `clicked_at` read from clicks partition `k` minus the allowed
//! lateness, or, when the consumer has read partition `k` up to its high
//! watermark, the wall clock minus the allowed lateness (an idle partition
//! does not hold windows open). Under steady traffic the watermark follows
//! the clicks; after a restart on a quiet topic it follows the clock. Orphan
//! clicks (read before their impression) expire on the *impressions*
//! watermark the same way: once impressions up to the click's time have been
//! read, the impression does not exist. Watermarks never move backwards.
//!
//! **Billing notices.** An impression logged `billed_on_notice` is a bid
//! into another auction (OpenRTB): it is a training row only once the
//! exchange's billing notice for it (a [`ClickEvent`] with `billing_notice`,
//! on the clicks topic, so it shares the clicks watermark) or a click on it
//! (which proves it was shown) arrives inside its window. A bid neither
//! billed nor clicked when its window closes lost its auction: it writes no
//! row (`unbilled`), where it used to become a false label-0 row. In
//! streaming mode its provisional negative waits for the notice.
//!
//! **Offsets.** An offset stays *in flight* until everything it contributed
//! is durable (its impression's final row is in a written file) or it is
//! known to contribute nothing (duplicate, late click, dead-lettered,
//! downsampled). The committable position of a partition is its lowest
//! in-flight offset, or one past the highest offset seen when none is in
//! flight, so a crash can only make the joiner re-read, never skip; rows
//! re-read that are already in a file are recognised from the files
//! ([`Joiner::preload_written`]) and not written again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::{BuildHasher, Hasher},
    sync::Arc,
};

use adserve_proto::v1::{ClickEvent, ImpressionEvent};
use prost::Message as _;
use prost_types::Timestamp;
use serde::{Deserialize, Serialize};

/// A topic-partition.
pub type TopicPartition = (&'static str, i32);

/// Milliseconds since the Unix epoch of a protobuf timestamp.
pub fn millis(ts: &Timestamp) -> i64 {
    ts.seconds.saturating_mul(1000).saturating_add(i64::from(ts.nanos) / 1_000_000)
}

/// How rows are emitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One final row per impression, once its window has closed.
    #[default]
    Window,
    /// A provisional negative at impression time (reduced weight), a
    /// correction when a click arrives inside the window, and the final row
    /// when the window closes.
    Streaming,
}

/// What a row is, in the `row_kind` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RowKind {
    /// The impression's label once its window has closed (`is_final`).
    Final,
    /// Streaming mode: label 0 at impression time, before any click could arrive.
    Provisional,
    /// Streaming mode: label 1 as soon as a click arrives inside the window.
    Correction,
}

impl RowKind {
    /// Every kind.
    pub const ALL: [RowKind; 3] = [RowKind::Final, RowKind::Provisional, RowKind::Correction];

    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::Final => "final",
            RowKind::Provisional => "provisional",
            RowKind::Correction => "correction",
        }
    }

    /// Parses a column value.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn bit(self) -> u8 {
        match self {
            RowKind::Final => 1,
            RowKind::Provisional => 2,
            RowKind::Correction => 4,
        }
    }
}

/// Row kinds already written for one impression (found in files at start or
/// on assignment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    /// Adds `kind`.
    pub fn insert(&mut self, kind: RowKind) {
        self.0 |= kind.bit();
    }
    /// Whether `kind` is in.
    pub fn contains(self, kind: RowKind) -> bool {
        self.0 & kind.bit() != 0
    }
}

/// A row found in a dataset file past the committed offsets (see
/// [`Joiner::preload_written`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenRow {
    /// The impression.
    pub impression_id: String,
    /// Its impressions partition.
    pub partition: i32,
    /// Which row of it.
    pub kind: RowKind,
    /// The row's label.
    pub label: bool,
}

/// What the files say about one impression.
#[derive(Debug, Clone, Copy)]
struct Written {
    partition: i32,
    kinds: Kinds,
    /// The final row's label (false without a final row).
    clicked: bool,
}

/// The join's rules (from config).
#[derive(Debug, Clone, PartialEq)]
pub struct JoinRules {
    /// Label window (ms): a click counts when `clicked_at <= served_at + window`.
    pub window_ms: i64,
    /// How far behind the newest event time (or the clock, on a caught-up
    /// partition) the watermark stays, for events published out of order.
    pub lateness_ms: i64,
    /// Window or streaming rows.
    pub mode: Mode,
    /// Weight of a provisional negative (streaming mode).
    pub provisional_weight: f32,
    /// Share of negatives kept (1 = all); recorded on every row.
    pub negative_keep_rate: f64,
    /// Orphan clicks held at most; the oldest beyond it are dropped and counted.
    pub max_orphans: usize,
    /// An impression stamped further than this in the future is refused.
    pub max_clock_skew_ms: i64,
}

impl JoinRules {
    /// Window mode, no downsampling, with `window_ms` and `lateness_ms`.
    pub fn window(window_ms: i64, lateness_ms: i64) -> Self {
        Self {
            window_ms,
            lateness_ms,
            mode: Mode::Window,
            provisional_weight: 0.5,
            negative_keep_rate: 1.0,
            max_orphans: 100_000,
            max_clock_skew_ms: 60_000,
        }
    }
}

/// One training row: an impression, its label and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledRow {
    /// The impression as served. Its feature row's names are moved to
    /// `names` (shared by every row with the same list); values stay.
    pub event: ImpressionEvent,
    /// Feature names, aligned with `event.features.values`.
    pub names: Arc<[String]>,
    /// Final, provisional or correction.
    pub kind: RowKind,
    /// Clicked (within the window, for final rows).
    pub label: bool,
    /// Sample weight.
    pub weight: f32,
    /// Share of negatives kept when this row was written.
    pub keep_rate: f32,
    /// When the click happened, if it did.
    pub clicked_at: Option<Timestamp>,
    /// When the row was made (ms, wall clock).
    pub joined_at_ms: i64,
    /// Impression's partition in the impressions topic.
    pub partition: i32,
    /// Impression's offset.
    pub offset: i64,
    /// Offsets this row's durability releases.
    releases: Vec<(TopicPartition, i64)>,
    /// Bytes it counts for in the joiner's state (final rows only).
    bytes: usize,
}

impl LabelledRow {
    /// A row for the tests of what consumes rows.
    #[cfg(test)]
    pub(crate) fn test_row(event: ImpressionEvent, kind: RowKind, label: bool, keep_rate: f32) -> Self {
        Self {
            event,
            names: Vec::new().into(),
            kind,
            label,
            weight: 1.0,
            keep_rate,
            clicked_at: None,
            joined_at_ms: 0,
            partition: 0,
            offset: 0,
            releases: Vec::new(),
            bytes: 0,
        }
    }
}

/// Why an event was refused (it goes to the dead-letter topic with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// No impression id.
    #[error("impression_id is empty")]
    NoImpressionId,
    /// No `served_at`.
    #[error("served_at is missing")]
    NoServedAt,
    /// `served_at` far in the future.
    #[error("served_at is {0} ms in the future")]
    FutureServedAt(i64),
    /// The impression carries no feature row.
    #[error("features: the impression carries no feature row")]
    NoFeatureRow,
    /// Names and values disagree.
    #[error("features: {names} names but {values} values")]
    MisalignedFeatures {
        /// Names.
        names: usize,
        /// Values.
        values: usize,
    },
    /// No `clicked_at`.
    #[error("clicked_at is missing")]
    NoClickedAt,
}

impl Rejected {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Rejected::NoImpressionId => "no_impression_id",
            Rejected::NoServedAt => "no_served_at",
            Rejected::FutureServedAt(_) => "future_served_at",
            Rejected::NoFeatureRow => "no_feature_row",
            Rejected::MisalignedFeatures { .. } => "misaligned_features",
            Rejected::NoClickedAt => "no_clicked_at",
        }
    }
}

/// Counters for status and metrics (cumulative).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JoinStats {
    /// Clicks attached to their impression within the window.
    pub clicks_joined: u64,
    /// Clicks after the window (the row is, or will be, labelled 0).
    pub late_clicks: u64,
    /// Clicks stamped *inside* their impression's window that were read after
    /// the watermark had closed it: the row went out labelled 0 although the
    /// click counts. Only event time published further out of order than
    /// `allowed_lateness` (a replayed or merged backlog) causes these; each
    /// one is a false negative in the training data.
    pub clicks_after_close: u64,
    /// Impressions read with `served_at` more than `allowed_lateness` before
    /// the newest `served_at` already read from their partition: the log is
    /// out of event-time order, and windows may have closed too early.
    pub out_of_order_impressions: u64,
    /// Clicks read with `clicked_at` more than `allowed_lateness` before the
    /// newest `clicked_at` already read from their partition.
    pub out_of_order_clicks: u64,
    /// Clicks whose impression never came (expired on the impressions watermark).
    pub unmatched_clicks: u64,
    /// Orphan clicks dropped because `max_orphans` were already held.
    pub orphans_evicted: u64,
    /// Clicks stamped before their impression was served (dropped).
    pub clicks_before_impression: u64,
    /// Billing notices attached to their (billed on notice) impression
    /// within the window.
    pub billings_joined: u64,
    /// Billing notices after their impression's window: the bid wrote no
    /// row (see `unbilled`), or it was clicked and did.
    pub late_billings: u64,
    /// Billing notices stamped inside their impression's window but read
    /// after the watermark had closed it unbilled: a shown ad that wrote no
    /// row (as `clicks_after_close`, from event time far out of order).
    pub billings_after_close: u64,
    /// Billing notices whose impression never came.
    pub unmatched_billings: u64,
    /// Billing notices for an impression billed when served (the native
    /// API): ignored.
    pub billings_not_expected: u64,
    /// Bids (impressions billed on notice) whose window closed with neither
    /// a billing notice nor a click: auctions lost at the exchange, not
    /// training rows.
    pub unbilled: u64,
    /// Impressions or clicks seen twice.
    pub duplicates: u64,
    /// Negatives not written (downsampling).
    pub downsampled: u64,
    /// Impressions re-read after a restart or rebalance whose final row is
    /// already in a file.
    pub already_written: u64,
}

#[derive(Debug)]
struct Pending {
    event: ImpressionEvent,
    names: Arc<[String]>,
    offset: i64,
    served_ms: i64,
    deadline_ms: i64,
    click: Option<(Timestamp, (TopicPartition, i64))>,
    /// Billed on notice: the notice's offset once it came (None: not yet).
    /// Always None for an impression billed when served.
    billing: Option<(TopicPartition, i64)>,
    written: Kinds,
    bytes: usize,
}

impl Pending {
    /// Shown, as far as the join knows: billed when served, or billed on
    /// notice and the notice (or a click, which proves it) came.
    fn shown(&self) -> bool {
        !self.event.billed_on_notice || self.billing.is_some() || self.click.is_some()
    }
}

/// An orphan's key: the impression's, and whether it is a billing notice
/// (one click and one notice may wait for the same impression).
type OrphanKey = (u128, bool);

#[derive(Debug)]
struct Orphan {
    click: ClickEvent,
    at_ms: i64,
    offset: i64,
    bytes: usize,
}

#[derive(Debug, Clone, Copy)]
struct Done {
    clicked: bool,
    /// Logged billed on notice (a bid).
    on_notice: bool,
    /// Billed on notice and closed without notice or click: no row.
    unbilled: bool,
    /// End of the label window (ms, event time).
    deadline_ms: i64,
}

/// Per partition number: event-time progress and the ordered queues.
#[derive(Debug)]
struct Part {
    max_served_ms: Option<i64>,
    max_clicked_ms: Option<i64>,
    impressions_caught_up: bool,
    clicks_caught_up: bool,
    /// Monotone watermarks (ms); `i64::MIN` until known.
    clicks_wm: i64,
    impressions_wm: i64,
    /// (deadline, offset, key) of pending impressions: rows leave in
    /// deadline order, then log order.
    windows: BTreeSet<(i64, i64, u128)>,
    /// (clicked_at, key) of orphan clicks and billing notices.
    orphans: BTreeSet<(i64, OrphanKey)>,
    /// (forget at, key) of labelled impressions.
    done: BTreeSet<(i64, u128)>,
}

impl Default for Part {
    fn default() -> Self {
        Self {
            max_served_ms: None,
            max_clicked_ms: None,
            impressions_caught_up: false,
            clicks_caught_up: false,
            clicks_wm: i64::MIN,
            impressions_wm: i64::MIN,
            windows: BTreeSet::new(),
            orphans: BTreeSet::new(),
            done: BTreeSet::new(),
        }
    }
}

/// Folds an event time into its partition's newest (`max`); true when the
/// event is more than `lateness` behind it (the log is out of event-time
/// order).
fn observe(max: &mut Option<i64>, at_ms: i64, lateness: i64) -> bool {
    let behind = max.is_some_and(|m| at_ms < m.saturating_sub(lateness));
    *max = Some(max.map_or(at_ms, |m| m.max(at_ms)));
    behind
}

/// Approximate bytes of a labelled impression remembered for dedupe.
const DONE_BYTES: usize = 64;

/// A 128-bit key for an impression id: the UUID itself when it is one (the
/// gateway's ids are), else two independent 64-bit hashes.
pub fn id_key(id: &str) -> u128 {
    if let Ok(u) = uuid::Uuid::parse_str(id) {
        return u.as_u128();
    }
    let hash = |seed: u64| {
        let mut h =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().build_hasher();
        h.write_u64(seed);
        h.write(id.as_bytes());
        h.finish()
    };
    (u128::from(hash(0x9e37_79b9_7f4a_7c15)) << 64) | u128::from(hash(0xc2b2_ae3d_27d4_eb4f))
}

/// Whether a negative for `key` is kept at `rate`: a deterministic draw, so a
/// re-read after a restart decides the same way.
pub fn kept(key: u128, rate: f64) -> bool {
    if rate >= 1.0 {
        return true;
    }
    // splitmix64 over both halves: uniform even for sequential ids.
    let mut z = (key as u64) ^ ((key >> 64) as u64).rotate_left(17);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < rate
}

/// Joins impressions with clicks within a label window.
#[derive(Debug)]
pub struct Joiner {
    rules: JoinRules,
    impressions: &'static str,
    clicks: &'static str,
    pending: HashMap<u128, Pending>,
    orphans: HashMap<OrphanKey, Orphan>,
    done: HashMap<u128, Done>,
    written: HashMap<u128, Written>,
    parts: HashMap<i32, Part>,
    ready: Vec<LabelledRow>,
    names: HashSet<Arc<[String]>>,
    /// Per topic-partition, each in-flight offset and how many holds it has
    /// (a multi-slot answer's impressions share their message's offset).
    inflight: HashMap<TopicPartition, BTreeMap<i64, u32>>,
    next: HashMap<TopicPartition, i64>,
    bytes: usize,
    stats: JoinStats,
}

impl Joiner {
    /// A joiner reading `impressions` and `clicks` under `rules`.
    pub fn new(rules: JoinRules, impressions: &'static str, clicks: &'static str) -> Self {
        Self {
            rules,
            impressions,
            clicks,
            pending: HashMap::new(),
            orphans: HashMap::new(),
            done: HashMap::new(),
            written: HashMap::new(),
            parts: HashMap::new(),
            ready: Vec::new(),
            names: HashSet::new(),
            inflight: HashMap::new(),
            next: HashMap::new(),
            bytes: 0,
            stats: JoinStats::default(),
        }
    }

    /// The rules.
    pub fn rules(&self) -> &JoinRules {
        &self.rules
    }

    /// Rows an earlier run (or the partition's previous owner) wrote past the
    /// committed offsets, read back from files. Seeing those impressions
    /// again writes nothing twice, and a click re-read for a final row
    /// labelled 1 is a duplicate, not a late click.
    pub fn preload_written(&mut self, rows: impl IntoIterator<Item = WrittenRow>) {
        for row in rows {
            let entry = self.written.entry(id_key(&row.impression_id)).or_insert(Written {
                partition: row.partition,
                kinds: Kinds::default(),
                clicked: false,
            });
            entry.kinds.insert(row.kind);
            if row.kind == RowKind::Final {
                entry.clicked = row.label;
            }
        }
    }

    fn part(&mut self, partition: i32) -> &mut Part {
        self.parts.entry(partition).or_default()
    }

    fn seen(&mut self, tp: TopicPartition, offset: i64) {
        let next = self.next.entry(tp).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
    }

    fn hold(&mut self, tp: TopicPartition, offset: i64) {
        hold(&mut self.inflight, tp, offset);
    }

    fn release(&mut self, tp: TopicPartition, offset: i64) {
        if let Some(holds) = self.inflight.get_mut(&tp)
            && let std::collections::btree_map::Entry::Occupied(mut n) = holds.entry(offset)
        {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }

    fn intern(&mut self, names: Vec<String>) -> Arc<[String]> {
        if let Some(found) = self.names.get(names.as_slice()) {
            return Arc::clone(found);
        }
        let names: Arc<[String]> = names.into();
        self.names.insert(Arc::clone(&names));
        names
    }

    /// A message that contributes nothing (e.g. dead-lettered) at `offset`.
    pub fn skip(&mut self, tp: TopicPartition, offset: i64) {
        self.seen(tp, offset);
    }

    fn row(&self, p: &Pending, partition: i32, kind: RowKind, now_ms: i64) -> LabelledRow {
        let (label, weight, clicked_at) = match kind {
            RowKind::Final => (p.click.is_some(), 1.0, p.click.as_ref().map(|c| c.0)),
            RowKind::Provisional => (false, self.rules.provisional_weight, None),
            RowKind::Correction => (true, 1.0, p.click.as_ref().map(|c| c.0)),
        };
        LabelledRow {
            event: p.event.clone(),
            names: Arc::clone(&p.names),
            kind,
            label,
            weight,
            keep_rate: self.rules.negative_keep_rate as f32,
            clicked_at,
            joined_at_ms: now_ms,
            partition,
            offset: p.offset,
            releases: Vec::new(),
            bytes: 0,
        }
    }

    /// An impression read at `offset` of impressions partition `partition`,
    /// at wall-clock `now_ms`. A refused impression contributes nothing (the
    /// caller dead-letters it, then calls [`Joiner::skip`]).
    pub fn on_impression(
        &mut self,
        event: ImpressionEvent,
        partition: i32,
        offset: i64,
        now_ms: i64,
    ) -> Result<(), Rejected> {
        self.on_impressions(vec![event], partition, offset, now_ms)
    }

    /// The impressions of one message (one answer: one impression, or a
    /// multi-slot answer's batch) read at `offset`. They are taken all or
    /// none: if any is refused, none contributes (the caller dead-letters the
    /// message whole, then calls [`Joiner::skip`]). The offset stays in
    /// flight until every one of them is done.
    pub fn on_impressions(
        &mut self,
        events: Vec<ImpressionEvent>,
        partition: i32,
        offset: i64,
        now_ms: i64,
    ) -> Result<(), Rejected> {
        for event in &events {
            self.check(event, now_ms)?;
        }
        self.seen((self.impressions, partition), offset);
        for event in events {
            self.accept(event, partition, offset, now_ms);
        }
        Ok(())
    }

    /// Why `event` cannot be joined, if it cannot.
    fn check(&self, event: &ImpressionEvent, now_ms: i64) -> Result<(), Rejected> {
        if event.impression_id.is_empty() {
            return Err(Rejected::NoImpressionId);
        }
        let served_ms = event.served_at.as_ref().map(millis).ok_or(Rejected::NoServedAt)?;
        if served_ms > now_ms + self.rules.max_clock_skew_ms {
            return Err(Rejected::FutureServedAt(served_ms - now_ms));
        }
        let features = event.features.as_ref().ok_or(Rejected::NoFeatureRow)?;
        if features.names.len() != features.values.len() {
            return Err(Rejected::MisalignedFeatures { names: features.names.len(), values: features.values.len() });
        }
        Ok(())
    }

    /// Takes a checked impression.
    fn accept(&mut self, mut event: ImpressionEvent, partition: i32, offset: i64, now_ms: i64) {
        let tp = (self.impressions, partition);
        let served_ms = event.served_at.as_ref().map(millis).unwrap_or_default();
        let lateness = self.rules.lateness_ms;
        if observe(&mut self.part(partition).max_served_ms, served_ms, lateness) {
            self.stats.out_of_order_impressions += 1;
        }
        let key = id_key(&event.impression_id);
        if self.pending.contains_key(&key) || self.done.contains_key(&key) {
            self.stats.duplicates += 1;
            return;
        }
        let (written, clicked) = self.written.remove(&key).map_or((Kinds::default(), false), |w| (w.kinds, w.clicked));
        if written.contains(RowKind::Final) {
            self.stats.already_written += 1;
            let done = Done {
                clicked,
                on_notice: event.billed_on_notice,
                unbilled: false,
                deadline_ms: served_ms + self.rules.window_ms,
            };
            self.remember_done(key, partition, done);
            return;
        }
        let names = self.intern(event.features.as_mut().map(|f| std::mem::take(&mut f.names)).unwrap_or_default());
        let deadline_ms = served_ms + self.rules.window_ms;
        let bytes = event.encoded_len() + 96;
        let mut pending =
            Pending { event, names, offset, served_ms, deadline_ms, click: None, billing: None, written, bytes };
        let click_tp = (self.clicks, partition);
        if let Some(orphan) = self.take_orphan(partition, (key, false)) {
            if orphan.at_ms < served_ms {
                self.stats.clicks_before_impression += 1;
                self.release(click_tp, orphan.offset);
            } else if orphan.at_ms <= deadline_ms {
                pending.click = Some((orphan.click.clicked_at.unwrap_or_default(), (click_tp, orphan.offset)));
                self.stats.clicks_joined += 1;
            } else {
                self.stats.late_clicks += 1;
                self.release(click_tp, orphan.offset);
            }
        }
        if let Some(orphan) = self.take_orphan(partition, (key, true)) {
            if !pending.event.billed_on_notice {
                self.stats.billings_not_expected += 1;
                self.release(click_tp, orphan.offset);
            } else if orphan.at_ms <= deadline_ms {
                pending.billing = Some((click_tp, orphan.offset));
                self.stats.billings_joined += 1;
            } else {
                self.stats.late_billings += 1;
                self.release(click_tp, orphan.offset);
            }
        }
        if self.rules.mode == Mode::Streaming {
            if pending.shown()
                && kept(key, self.rules.negative_keep_rate)
                && !pending.written.contains(RowKind::Provisional)
            {
                let row = self.row(&pending, partition, RowKind::Provisional, now_ms);
                self.ready.push(row);
            }
            if pending.click.is_some() && !pending.written.contains(RowKind::Correction) {
                let row = self.row(&pending, partition, RowKind::Correction, now_ms);
                self.ready.push(row);
            }
        }
        self.hold(tp, offset);
        self.bytes += pending.bytes;
        self.part(partition).windows.insert((deadline_ms, offset, key));
        self.pending.insert(key, pending);
    }

    fn take_orphan(&mut self, partition: i32, key: OrphanKey) -> Option<Orphan> {
        let orphan = self.orphans.remove(&key)?;
        self.bytes = self.bytes.saturating_sub(orphan.bytes);
        self.part(partition).orphans.remove(&(orphan.at_ms, key));
        Some(orphan)
    }

    /// A click, or a billing notice (`billing_notice`), read at `offset` of
    /// clicks partition `partition`, at wall-clock `now_ms`.
    pub fn on_click(&mut self, click: ClickEvent, partition: i32, offset: i64, now_ms: i64) -> Result<(), Rejected> {
        let tp = (self.clicks, partition);
        if click.impression_id.is_empty() {
            return Err(Rejected::NoImpressionId);
        }
        let at_ms = click.clicked_at.as_ref().map(millis).ok_or(Rejected::NoClickedAt)?;
        self.seen(tp, offset);
        let lateness = self.rules.lateness_ms;
        if observe(&mut self.part(partition).max_clicked_ms, at_ms, lateness) {
            self.stats.out_of_order_clicks += 1;
        }
        let key = id_key(&click.impression_id);
        if click.billing_notice {
            self.on_billing(click, key, at_ms, partition, offset, now_ms);
            return Ok(());
        }
        let streaming = self.rules.mode == Mode::Streaming;
        if let Some(p) = self.pending.get_mut(&key) {
            if p.click.is_some() {
                self.stats.duplicates += 1;
            } else if at_ms < p.served_ms {
                self.stats.clicks_before_impression += 1;
            } else if at_ms <= p.deadline_ms {
                p.click = Some((click.clicked_at.unwrap_or_default(), (tp, offset)));
                self.stats.clicks_joined += 1;
                hold(&mut self.inflight, tp, offset);
                if streaming && !p.written.contains(RowKind::Correction) {
                    let p = &self.pending[&key];
                    let row = self.row(p, partition, RowKind::Correction, now_ms);
                    self.ready.push(row);
                }
            } else {
                self.stats.late_clicks += 1;
            }
            return Ok(());
        }
        if let Some(done) = self.done.get(&key) {
            if done.clicked {
                self.stats.duplicates += 1;
            } else if at_ms <= done.deadline_ms {
                self.stats.clicks_after_close += 1;
            } else {
                self.stats.late_clicks += 1;
            }
            return Ok(());
        }
        self.orphan(click, (key, false), at_ms, partition, offset);
        Ok(())
    }

    /// A billing notice: the bid it names won and was shown.
    fn on_billing(&mut self, notice: ClickEvent, key: u128, at_ms: i64, partition: i32, offset: i64, now_ms: i64) {
        let tp = (self.clicks, partition);
        if let Some(p) = self.pending.get_mut(&key) {
            if !p.event.billed_on_notice {
                self.stats.billings_not_expected += 1;
            } else if p.billing.is_some() {
                self.stats.duplicates += 1;
            } else if at_ms <= p.deadline_ms {
                let first_sign = !p.shown();
                p.billing = Some((tp, offset));
                self.stats.billings_joined += 1;
                hold(&mut self.inflight, tp, offset);
                // Streaming: the provisional negative waited for the notice
                // (a click already wrote its correction).
                let p = &self.pending[&key];
                if self.rules.mode == Mode::Streaming
                    && first_sign
                    && kept(key, self.rules.negative_keep_rate)
                    && !p.written.contains(RowKind::Provisional)
                {
                    let row = self.row(p, partition, RowKind::Provisional, now_ms);
                    self.ready.push(row);
                }
            } else {
                self.stats.late_billings += 1;
            }
            return;
        }
        if let Some(done) = self.done.get(&key) {
            if !done.on_notice {
                self.stats.billings_not_expected += 1;
            } else if !done.unbilled {
                // Billed already, or shown by a click: its row is written.
                self.stats.duplicates += 1;
            } else if at_ms <= done.deadline_ms {
                self.stats.billings_after_close += 1;
            } else {
                self.stats.late_billings += 1;
            }
            return;
        }
        self.orphan(notice, (key, true), at_ms, partition, offset);
    }

    /// Holds a click or notice read before its impression (the two topics
    /// are read independently, so it may still be on its way) until the
    /// impressions watermark passes its time.
    fn orphan(&mut self, click: ClickEvent, key: OrphanKey, at_ms: i64, partition: i32, offset: i64) {
        if self.orphans.contains_key(&key) {
            self.stats.duplicates += 1;
            return;
        }
        let bytes = click.encoded_len() + 96;
        self.hold((self.clicks, partition), offset);
        self.bytes += bytes;
        self.part(partition).orphans.insert((at_ms, key));
        self.orphans.insert(key, Orphan { click, at_ms, offset, bytes });
        if self.orphans.len() > self.rules.max_orphans {
            self.evict_oldest_orphan(partition);
        }
    }

    fn evict_oldest_orphan(&mut self, partition: i32) {
        let Some((_, key)) = self.part(partition).orphans.pop_first() else { return };
        if let Some(o) = self.orphans.remove(&key) {
            self.bytes = self.bytes.saturating_sub(o.bytes);
            self.release((self.clicks, partition), o.offset);
            self.stats.orphans_evicted += 1;
        }
    }

    /// An orphan whose impression never came.
    fn unmatched(&mut self, partition: i32, key: OrphanKey) {
        if let Some(o) = self.orphans.remove(&key) {
            self.bytes = self.bytes.saturating_sub(o.bytes);
            self.release((self.clicks, partition), o.offset);
            if key.1 {
                self.stats.unmatched_billings += 1;
            } else {
                self.stats.unmatched_clicks += 1;
            }
        }
    }

    fn remember_done(&mut self, key: u128, partition: i32, done: Done) {
        // Remembered one more window (event time) after closing: a click
        // until then is counted late, an impression re-delivered until then
        // is a duplicate.
        let forget_at = done.deadline_ms.saturating_add(self.rules.window_ms);
        self.part(partition).done.insert((forget_at, key));
        self.done.insert(key, done);
        self.bytes += DONE_BYTES;
    }

    /// Marks whether the consumer has read `topic`/`partition` up to its
    /// high watermark (checked by the caller against the broker).
    pub fn set_caught_up(&mut self, topic: &str, partition: i32, caught_up: bool) {
        let is_clicks = topic == self.clicks;
        let part = self.part(partition);
        if is_clicks {
            part.clicks_caught_up = caught_up;
        } else {
            part.impressions_caught_up = caught_up;
        }
    }

    /// Advances every partition's watermarks to `now_ms`, labels impressions
    /// whose window they passed, and expires orphan clicks and remembered
    /// impressions. Returns the number of windows closed.
    pub fn advance(&mut self, now_ms: i64) -> usize {
        let lateness = self.rules.lateness_ms;
        let partitions: Vec<i32> = self.parts.keys().copied().collect();
        let mut closed = 0;
        for k in partitions {
            let (clicks_wm, impressions_wm) = {
                let p = self.part(k);
                let c = if p.clicks_caught_up { Some(now_ms) } else { p.max_clicked_ms };
                let i = if p.impressions_caught_up { Some(now_ms) } else { p.max_served_ms };
                if let Some(c) = c {
                    p.clicks_wm = p.clicks_wm.max(c - lateness);
                }
                if let Some(i) = i {
                    p.impressions_wm = p.impressions_wm.max(i - lateness);
                }
                (p.clicks_wm, p.impressions_wm)
            };
            closed += self.close_until(k, clicks_wm, now_ms);
            while let Some(&(at, key)) = self.part(k).orphans.first() {
                if at > impressions_wm {
                    break;
                }
                self.part(k).orphans.pop_first();
                self.unmatched(k, key);
            }
            while let Some(&(at, key)) = self.part(k).done.first() {
                if at > clicks_wm {
                    break;
                }
                self.part(k).done.pop_first();
                if self.done.remove(&key).is_some() {
                    self.bytes = self.bytes.saturating_sub(DONE_BYTES);
                }
            }
        }
        if self.names.len() > 64 {
            self.names.retain(|n| Arc::strong_count(n) > 1);
        }
        closed
    }

    fn close_until(&mut self, partition: i32, watermark: i64, now_ms: i64) -> usize {
        let mut closed = 0;
        while let Some(&(deadline, _, key)) = self.part(partition).windows.first() {
            if deadline > watermark {
                break;
            }
            self.part(partition).windows.pop_first();
            self.close(partition, key, now_ms);
            closed += 1;
        }
        closed
    }

    fn close(&mut self, partition: i32, key: u128, now_ms: i64) {
        let Some(p) = self.pending.remove(&key) else { return };
        self.bytes = self.bytes.saturating_sub(p.bytes);
        let clicked = p.click.is_some();
        let imp = (self.impressions, partition);
        let shown = p.shown();
        let done = Done { clicked, on_notice: p.event.billed_on_notice, unbilled: !shown, deadline_ms: p.deadline_ms };
        self.remember_done(key, partition, done);
        if !shown {
            // A bid the exchange never billed: its auction was lost.
            self.stats.unbilled += 1;
            self.release(imp, p.offset);
        } else if clicked || kept(key, self.rules.negative_keep_rate) {
            let mut releases = vec![(imp, p.offset)];
            releases.extend(p.click.as_ref().map(|c| c.1));
            releases.extend(p.billing);
            // The final row takes the pending impression's event (no copy).
            let row = LabelledRow {
                label: clicked,
                weight: 1.0,
                keep_rate: self.rules.negative_keep_rate as f32,
                clicked_at: p.click.map(|c| c.0),
                kind: RowKind::Final,
                joined_at_ms: now_ms,
                partition,
                offset: p.offset,
                names: p.names,
                event: p.event,
                releases,
                bytes: p.bytes,
            };
            self.bytes += row.bytes;
            self.ready.push(row);
        } else {
            self.stats.downsampled += 1;
            self.release(imp, p.offset);
            if let Some((tp, offset)) = p.billing {
                self.release(tp, offset);
            }
        }
    }

    /// Labels every pending impression now, whatever the watermark (tests and
    /// demos; the gRPC Flush guards it), and drops every orphan click.
    pub fn close_all(&mut self, now_ms: i64) -> usize {
        let partitions: Vec<i32> = self.parts.keys().copied().collect();
        let mut closed = 0;
        for k in partitions {
            closed += self.close_until(k, i64::MAX, now_ms);
            while let Some((_, key)) = self.part(k).orphans.pop_first() {
                self.unmatched(k, key);
            }
        }
        closed
    }

    /// Gives partition numbers up: every impression, click, row and offset of
    /// theirs is forgotten (the next owner re-reads from the committed offset).
    /// Write and commit what can be written first.
    pub fn revoke(&mut self, partitions: &[i32]) {
        for &k in partitions {
            if let Some(part) = self.parts.remove(&k) {
                for (_, _, key) in part.windows {
                    if let Some(p) = self.pending.remove(&key) {
                        self.bytes = self.bytes.saturating_sub(p.bytes);
                    }
                }
                for (_, key) in part.orphans {
                    if let Some(o) = self.orphans.remove(&key) {
                        self.bytes = self.bytes.saturating_sub(o.bytes);
                    }
                }
                for (_, key) in part.done {
                    if self.done.remove(&key).is_some() {
                        self.bytes = self.bytes.saturating_sub(DONE_BYTES);
                    }
                }
            }
            for topic in [self.impressions, self.clicks] {
                self.inflight.remove(&(topic, k));
                self.next.remove(&(topic, k));
            }
        }
        let ready = std::mem::take(&mut self.ready);
        for row in ready {
            if partitions.contains(&row.partition) {
                self.bytes = self.bytes.saturating_sub(row.bytes);
            } else {
                self.ready.push(row);
            }
        }
        self.written.retain(|_, w| !partitions.contains(&w.partition));
    }

    /// Rows ready to be written.
    pub fn ready(&self) -> &[LabelledRow] {
        &self.ready
    }

    /// Takes up to `max` ready rows for writing. Their offsets stay in flight
    /// until [`Joiner::mark_durable`].
    pub fn take_ready(&mut self, max: usize) -> Vec<LabelledRow> {
        let n = max.min(self.ready.len());
        self.ready.drain(..n).collect()
    }

    /// Puts rows back after a failed write.
    pub fn restore(&mut self, mut rows: Vec<LabelledRow>) {
        rows.append(&mut self.ready);
        self.ready = rows;
    }

    /// Rows are in a durable file: their offsets may be committed.
    pub fn mark_durable(&mut self, rows: &[LabelledRow]) {
        for r in rows {
            self.bytes = self.bytes.saturating_sub(r.bytes);
            for (tp, off) in &r.releases {
                self.release(*tp, *off);
            }
        }
    }

    /// Offsets safe to commit: per partition, the lowest in-flight offset or
    /// one past the highest seen.
    pub fn committable(&self) -> Vec<(TopicPartition, i64)> {
        self.next
            .iter()
            .map(|(tp, next)| {
                let low = self.inflight.get(tp).and_then(|s| s.first_key_value()).map(|(o, _)| *o);
                (*tp, low.unwrap_or(*next))
            })
            .collect()
    }

    /// Impressions waiting for their window to close.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Orphan clicks held.
    pub fn orphans_len(&self) -> usize {
        self.orphans.len()
    }

    /// Approximate bytes of state: pending impressions, orphan clicks,
    /// remembered impressions and final rows not yet written.
    pub fn state_bytes(&self) -> usize {
        self.bytes
    }

    /// The lowest clicks watermark over the partitions this joiner holds
    /// (ms), if any is known: windows up to it are closed.
    pub fn watermark_ms(&self) -> Option<i64> {
        self.parts.values().map(|p| p.clicks_wm).filter(|w| *w > i64::MIN).min()
    }

    /// Counters.
    pub fn stats(&self) -> JoinStats {
        self.stats
    }
}

/// One more hold on `offset` (a free function: callers hold other borrows of the joiner).
fn hold(inflight: &mut HashMap<TopicPartition, BTreeMap<i64, u32>>, tp: TopicPartition, offset: i64) {
    *inflight.entry(tp).or_default().entry(offset).or_insert(0) += 1;
}

#[cfg(test)]
mod tests;
