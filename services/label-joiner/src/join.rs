//! The join itself, as a pure state machine over (message, offset) inputs.
//!
//! Offsets are tracked per topic-partition: an offset stays *in flight* until
//! everything it contributed is durable (its impression's row is in a written
//! file) or it is known to contribute nothing (duplicate, late click,
//! dead-lettered). The committable position of a partition is its lowest
//! in-flight offset, or one past the highest offset seen when none is in
//! flight, so a crash can only make the joiner re-read, never skip.

use std::collections::{BTreeSet, HashMap};

use adserve_proto::v1::{ClickEvent, ImpressionEvent};
use prost_types::Timestamp;

/// A topic-partition.
pub type TopicPartition = (&'static str, i32);

/// Milliseconds since the Unix epoch of a protobuf timestamp.
pub fn millis(ts: &Timestamp) -> i64 {
    ts.seconds.saturating_mul(1000).saturating_add(i64::from(ts.nanos) / 1_000_000)
}

/// One training row: an impression, its label and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledRow {
    /// The impression as served, with its feature row.
    pub event: ImpressionEvent,
    /// Clicked within the label window.
    pub label: bool,
    /// When the click arrived, if it did.
    pub clicked_at: Option<Timestamp>,
    /// When the window closed and the row was labelled (ms).
    pub joined_at_ms: i64,
    /// Impression's partition in the impressions topic.
    pub partition: i32,
    /// Impression's offset.
    pub offset: i64,
    click_source: Option<(TopicPartition, i64)>,
}

#[derive(Debug)]
struct Pending {
    event: ImpressionEvent,
    source: (TopicPartition, i64),
    deadline_ms: i64,
    click: Option<(Timestamp, (TopicPartition, i64))>,
}

#[derive(Debug)]
struct Orphan {
    click: ClickEvent,
    source: (TopicPartition, i64),
    expires_ms: i64,
}

/// Counters for status and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JoinStats {
    /// Clicks attached to their impression within the window.
    pub clicks_joined: u64,
    /// Clicks that arrived after the window (row already labelled 0).
    pub late_clicks: u64,
    /// Clicks whose impression never arrived within the window.
    pub unmatched_clicks: u64,
    /// Impressions or clicks seen twice.
    pub duplicates: u64,
}

/// Joins impressions with clicks within a label window.
#[derive(Debug)]
pub struct Joiner {
    window_ms: i64,
    pending: HashMap<String, Pending>,
    orphans: HashMap<String, Orphan>,
    ready: Vec<LabelledRow>,
    /// Impressions already labelled (ready or written), with when: dedupe
    /// and late-click detection.
    done: HashMap<String, i64>,
    inflight: HashMap<TopicPartition, BTreeSet<i64>>,
    next: HashMap<TopicPartition, i64>,
    stats: JoinStats,
}

impl Joiner {
    /// A joiner with the given label window.
    pub fn new(window_ms: u64) -> Self {
        Self {
            window_ms: window_ms as i64,
            pending: HashMap::new(),
            orphans: HashMap::new(),
            ready: Vec::new(),
            done: HashMap::new(),
            inflight: HashMap::new(),
            next: HashMap::new(),
            stats: JoinStats::default(),
        }
    }

    /// Impressions already written by an earlier run (read back from files at
    /// start): seeing them again is a duplicate, not a new row.
    pub fn preload_written(&mut self, ids: impl IntoIterator<Item = String>, now_ms: i64) {
        for id in ids {
            self.done.insert(id, now_ms);
        }
    }

    fn seen(&mut self, tp: TopicPartition, offset: i64) {
        let next = self.next.entry(tp).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
    }

    fn hold(&mut self, tp: TopicPartition, offset: i64) {
        self.inflight.entry(tp).or_default().insert(offset);
    }

    fn release(&mut self, tp: TopicPartition, offset: i64) {
        if let Some(set) = self.inflight.get_mut(&tp) {
            set.remove(&offset);
        }
    }

    /// A message that contributes nothing (e.g. dead-lettered) at `offset`.
    pub fn skip(&mut self, tp: TopicPartition, offset: i64) {
        self.seen(tp, offset);
    }

    /// An impression read at `offset`.
    pub fn on_impression(&mut self, event: ImpressionEvent, tp: TopicPartition, offset: i64) {
        self.seen(tp, offset);
        let id = event.impression_id.clone();
        if self.pending.contains_key(&id) || self.done.contains_key(&id) {
            self.stats.duplicates += 1;
            return;
        }
        let served_ms = event.served_at.as_ref().map(millis).unwrap_or_default();
        let deadline_ms = served_ms + self.window_ms;
        self.hold(tp, offset);
        let mut pending = Pending { event, source: (tp, offset), deadline_ms, click: None };
        if let Some(orphan) = self.orphans.remove(&id) {
            let at = orphan.click.clicked_at.unwrap_or_default();
            if millis(&at) <= deadline_ms {
                pending.click = Some((at, orphan.source));
                self.stats.clicks_joined += 1;
            } else {
                self.release(orphan.source.0, orphan.source.1);
                self.stats.late_clicks += 1;
            }
        }
        self.pending.insert(id, pending);
    }

    /// A click read at `offset`, received by the joiner at `now_ms`.
    pub fn on_click(&mut self, click: ClickEvent, tp: TopicPartition, offset: i64, now_ms: i64) {
        self.seen(tp, offset);
        let at = click.clicked_at.unwrap_or_default();
        if let Some(p) = self.pending.get_mut(&click.impression_id) {
            if p.click.is_some() {
                self.stats.duplicates += 1;
            } else if millis(&at) <= p.deadline_ms {
                p.click = Some((at, (tp, offset)));
                self.stats.clicks_joined += 1;
                self.hold(tp, offset);
            } else {
                self.stats.late_clicks += 1;
            }
            return;
        }
        if self.done.contains_key(&click.impression_id) {
            // The row is already labelled 0; corrections are a later step.
            self.stats.late_clicks += 1;
            return;
        }
        if self.orphans.contains_key(&click.impression_id) {
            self.stats.duplicates += 1;
            return;
        }
        // The impression may still be on its way (partitions are consumed
        // independently): hold the click for one window.
        self.hold(tp, offset);
        let id = click.impression_id.clone();
        self.orphans.insert(id, Orphan { click, source: (tp, offset), expires_ms: now_ms + self.window_ms });
    }

    /// Labels every impression whose window has closed by `now_ms` (all of
    /// them when `all`), and drops clicks whose impression never came.
    pub fn close_windows(&mut self, now_ms: i64, all: bool) -> usize {
        let mut closing: Vec<((TopicPartition, i64), String)> = self
            .pending
            .iter()
            .filter(|(_, p)| all || p.deadline_ms <= now_ms)
            .map(|(id, p)| (p.source, id.clone()))
            .collect();
        // Rows leave in log order, so files are deterministic for the same input.
        closing.sort();
        for (_, id) in &closing {
            if let Some(p) = self.pending.remove(id) {
                self.done.insert(id.clone(), now_ms);
                self.ready.push(LabelledRow {
                    label: p.click.is_some(),
                    clicked_at: p.click.as_ref().map(|c| c.0),
                    joined_at_ms: now_ms,
                    partition: p.source.0.1,
                    offset: p.source.1,
                    click_source: p.click.map(|c| c.1),
                    event: p.event,
                });
            }
        }
        let expired: Vec<String> =
            self.orphans.iter().filter(|(_, o)| all || o.expires_ms <= now_ms).map(|(id, _)| id.clone()).collect();
        for id in expired {
            if let Some(o) = self.orphans.remove(&id) {
                self.release(o.source.0, o.source.1);
                self.stats.unmatched_clicks += 1;
            }
        }
        // Forget labelled impressions once no click could still be matched to them.
        let horizon = now_ms - 2 * self.window_ms;
        self.done.retain(|_, at| *at > horizon);
        closing.len()
    }

    /// Rows whose window has closed, not yet written.
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
    pub fn mark_durable(&mut self, rows: &[LabelledRow], impressions: &'static str) {
        for r in rows {
            self.release((impressions, r.partition), r.offset);
            if let Some((tp, off)) = r.click_source {
                self.release(tp, off);
            }
        }
    }

    /// Offsets safe to commit: per partition, the lowest in-flight offset or
    /// one past the highest seen.
    pub fn committable(&self) -> Vec<(TopicPartition, i64)> {
        self.next
            .iter()
            .map(|(tp, next)| {
                let low = self.inflight.get(tp).and_then(|s| s.first().copied());
                (*tp, low.unwrap_or(*next))
            })
            .collect()
    }

    /// Impressions waiting for their window to close.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Counters.
    pub fn stats(&self) -> JoinStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adserve_proto::v1::FeatureRow;

    const IMP: &str = "imps";
    const CLK: &str = "clicks";

    fn ts(ms: i64) -> Timestamp {
        Timestamp { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 }
    }

    fn imp(id: &str, served_ms: i64) -> ImpressionEvent {
        ImpressionEvent {
            impression_id: id.into(),
            served_at: Some(ts(served_ms)),
            features: Some(FeatureRow { names: vec!["f".into()], values: vec![1.0] }),
            ..Default::default()
        }
    }

    fn click(id: &str, at_ms: i64) -> ClickEvent {
        ClickEvent { click_id: format!("c-{id}"), impression_id: id.into(), clicked_at: Some(ts(at_ms)) }
    }

    fn commit_of(j: &Joiner, topic: &'static str) -> i64 {
        j.committable().into_iter().find(|(tp, _)| tp.0 == topic).map(|(_, o)| o).unwrap()
    }

    #[test]
    fn click_within_window_labels_one() {
        let mut j = Joiner::new(1000);
        j.on_impression(imp("a", 10_000), (IMP, 0), 0);
        j.on_click(click("a", 10_500), (CLK, 0), 0, 10_500);
        assert_eq!(j.close_windows(10_999, false), 0, "window still open");
        assert_eq!(j.close_windows(11_000, false), 1);
        let rows = j.take_ready(10);
        assert!(rows[0].label);
        assert_eq!(rows[0].clicked_at, Some(ts(10_500)));
    }

    #[test]
    fn no_click_labels_zero_when_the_window_closes() {
        let mut j = Joiner::new(1000);
        j.on_impression(imp("a", 0), (IMP, 0), 0);
        j.close_windows(1000, false);
        assert!(!j.take_ready(10)[0].label);
    }

    #[test]
    fn late_click_after_window_is_counted_not_joined() {
        let mut j = Joiner::new(1000);
        j.on_impression(imp("a", 0), (IMP, 0), 0);
        j.on_click(click("a", 5000), (CLK, 0), 0, 5000);
        j.close_windows(5000, false);
        assert!(!j.take_ready(10)[0].label);
        assert_eq!(j.stats().late_clicks, 1);
        // A click for an already-labelled impression is late too.
        j.on_click(click("a", 5001), (CLK, 0), 1, 5001);
        assert_eq!(j.stats().late_clicks, 2);
    }

    #[test]
    fn click_before_impression_is_held_and_joined() {
        let mut j = Joiner::new(1000);
        j.on_click(click("a", 100), (CLK, 0), 0, 100);
        assert_eq!(commit_of(&j, CLK), 0, "orphan click stays uncommitted");
        j.on_impression(imp("a", 50), (IMP, 0), 0);
        j.close_windows(2000, false);
        assert!(j.take_ready(10)[0].label);
    }

    #[test]
    fn unmatched_click_expires_and_is_released() {
        let mut j = Joiner::new(1000);
        j.on_click(click("ghost", 0), (CLK, 0), 7, 0);
        j.close_windows(1000, false);
        assert_eq!(j.stats().unmatched_clicks, 1);
        assert_eq!(commit_of(&j, CLK), 8);
    }

    #[test]
    fn offsets_commit_only_after_rows_are_durable() {
        let mut j = Joiner::new(1000);
        j.on_impression(imp("a", 0), (IMP, 0), 0);
        j.on_impression(imp("b", 500), (IMP, 0), 1);
        j.on_click(click("a", 100), (CLK, 0), 0, 100);
        assert_eq!(commit_of(&j, IMP), 0);
        j.close_windows(1000, false); // only "a" closes
        let rows = j.take_ready(10);
        assert_eq!(commit_of(&j, IMP), 0, "taken but not durable");
        j.mark_durable(&rows, IMP);
        assert_eq!(commit_of(&j, IMP), 1, "b still pending");
        assert_eq!(commit_of(&j, CLK), 1, "a's click is durable with its row");
        j.close_windows(1500, false);
        let rows = j.take_ready(10);
        j.mark_durable(&rows, IMP);
        assert_eq!(commit_of(&j, IMP), 2);
    }

    #[test]
    fn duplicate_impressions_produce_one_row() {
        let mut j = Joiner::new(1000);
        j.on_impression(imp("a", 0), (IMP, 0), 0);
        j.on_impression(imp("a", 0), (IMP, 0), 1);
        j.close_windows(1000, true);
        assert_eq!(j.take_ready(10).len(), 1);
        assert_eq!(j.stats().duplicates, 1);
    }

    #[test]
    fn impressions_written_before_a_restart_are_not_written_again() {
        let mut j = Joiner::new(1000);
        j.preload_written(["a".to_string()], 0);
        j.on_impression(imp("a", 0), (IMP, 0), 0);
        j.close_windows(5000, true);
        assert!(j.take_ready(10).is_empty());
        assert_eq!(commit_of(&j, IMP), 1);
    }

    #[test]
    fn failed_write_restores_rows_in_order() {
        let mut j = Joiner::new(10);
        j.on_impression(imp("a", 0), (IMP, 0), 0);
        j.on_impression(imp("b", 0), (IMP, 0), 1);
        j.close_windows(100, false);
        let rows = j.take_ready(1);
        j.restore(rows);
        assert_eq!(j.ready().len(), 2);
        assert_eq!(commit_of(&j, IMP), 0);
    }
}
