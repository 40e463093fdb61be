use super::*;
use adserve_proto::v1::FeatureRow;

const IMP: &str = "imps";
const CLK: &str = "clicks";
const W: i64 = 1000;
const L: i64 = 100;

fn ts(ms: i64) -> Timestamp {
    Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

fn imp(id: &str, served_ms: i64) -> ImpressionEvent {
    ImpressionEvent {
        impression_id: id.into(),
        served_at: Some(ts(served_ms)),
        features: Some(FeatureRow {
            names: vec!["f".into(), "g".into()],
            values: vec![1.0, 2.0],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn click(id: &str, at_ms: i64) -> ClickEvent {
    ClickEvent {
        click_id: format!("c-{id}"),
        impression_id: id.into(),
        clicked_at: Some(ts(at_ms)),
        ..Default::default()
    }
}

/// A bid into another auction: shown only if billed.
fn bid(id: &str, served_ms: i64) -> ImpressionEvent {
    ImpressionEvent { billed_on_notice: true, ..imp(id, served_ms) }
}

/// The exchange's billing notice for `id`.
fn notice(id: &str, at_ms: i64) -> ClickEvent {
    ClickEvent { billing_notice: true, price_cpm_micros: 1_500_000, ..click(id, at_ms) }
}

fn written(id: &str, kind: RowKind, label: bool) -> WrittenRow {
    WrittenRow { impression_id: id.into(), partition: 0, kind, label }
}

fn joiner() -> Joiner {
    Joiner::new(JoinRules::window(W, L), IMP, CLK)
}

fn commit_of(j: &Joiner, topic: &'static str, partition: i32) -> i64 {
    j.committable().into_iter().find(|(tp, _)| *tp == (topic, partition)).map(|(_, o)| o).unwrap()
}

/// Both partitions read to their end at `now`.
fn caught_up(j: &mut Joiner, partition: i32) {
    j.set_caught_up(IMP, partition, true);
    j.set_caught_up(CLK, partition, true);
}

#[test]
fn click_within_window_labels_one_once_the_clicks_watermark_passes() {
    let mut j = joiner();
    j.on_impression(imp("a", 10_000), 0, 0, 10_000).unwrap();
    j.on_click(click("a", 10_500), 0, 0, 10_500).unwrap();
    caught_up(&mut j, 0);
    assert_eq!(j.advance(11_000 + L - 1), 0, "watermark = now - lateness is still inside the window");
    assert_eq!(j.advance(11_000 + L), 1);
    let rows = j.take_ready(10);
    assert!(rows[0].label);
    assert_eq!(rows[0].kind, RowKind::Final);
    assert_eq!(rows[0].clicked_at, Some(ts(10_500)));
    assert_eq!(&*rows[0].names, &["f".to_string(), "g".to_string()]);
}

#[test]
fn windows_close_under_steady_click_traffic_without_ever_catching_up() {
    // The defect: windows closed only when every clicks partition sat exactly
    // at its high watermark. Here the consumer is never caught up; event
    // time alone must move the watermark.
    let mut j = joiner();
    let mut closed = 0;
    for t in 0..100 {
        let now = t * 100;
        j.on_impression(imp(&format!("i{t}"), now), 0, t, now).unwrap();
        j.on_click(click(&format!("i{}", t / 2), now), 0, t, now).unwrap();
        j.set_caught_up(CLK, 0, false);
        closed += j.advance(now);
    }
    // Impressions served before 9900 - W - L have closed while traffic went on.
    assert!(closed >= 85, "only {closed} windows closed under steady traffic");
    assert!(j.take_ready(1000).iter().any(|r| r.label));
}

#[test]
fn an_idle_caught_up_partition_does_not_hold_windows_open() {
    let mut j = joiner();
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    // No click ever comes on clicks partition 0, but it is read to its end.
    j.set_caught_up(CLK, 0, false);
    assert_eq!(j.advance(10_000), 0, "behind and without clicks: wait");
    j.set_caught_up(CLK, 0, true);
    assert_eq!(j.advance(10_000), 1);
}

#[test]
fn one_partitions_backlog_does_not_hold_another_partitions_windows() {
    let mut j = joiner();
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    j.on_impression(imp("b", 0), 1, 0, 0).unwrap();
    j.set_caught_up(CLK, 0, true);
    j.set_caught_up(CLK, 1, false); // partition 1 has a backlog of clicks to read
    assert_eq!(j.advance(5000), 1);
    assert_eq!(j.take_ready(10)[0].partition, 0);
    assert_eq!(j.pending_len(), 1);
}

#[test]
fn the_watermark_never_moves_backwards() {
    let mut j = joiner();
    caught_up(&mut j, 0);
    j.advance(50_000);
    let wm = j.watermark_ms().unwrap();
    j.set_caught_up(CLK, 0, false);
    j.on_click(click("x", 1000), 0, 0, 50_000).unwrap();
    j.advance(50_001);
    assert_eq!(j.watermark_ms(), Some(wm));
}

#[test]
fn no_click_labels_zero_when_the_window_closes() {
    let mut j = joiner();
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    caught_up(&mut j, 0);
    j.advance(W + L);
    assert!(!j.take_ready(10)[0].label);
}

#[test]
fn late_click_after_window_is_counted_not_joined() {
    let mut j = joiner();
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    j.on_click(click("a", 1500), 0, 0, 1500).unwrap();
    caught_up(&mut j, 0);
    j.advance(W + L);
    assert!(!j.take_ready(10)[0].label);
    assert_eq!(j.stats().late_clicks, 1);
    // A click for an already-labelled impression is late too (it is
    // remembered one more window in event time).
    j.on_click(click("a", 1600), 0, 1, 1600).unwrap();
    assert_eq!(j.stats().late_clicks, 2);
    assert_eq!(j.orphans_len(), 0);
    assert_eq!(commit_of(&j, CLK, 0), 2, "late clicks contribute nothing and are committed");
}

#[test]
fn click_before_impression_is_held_and_joined() {
    let mut j = joiner();
    j.on_click(click("a", 100), 0, 0, 100).unwrap();
    assert_eq!(commit_of(&j, CLK, 0), 0, "orphan click stays uncommitted");
    j.on_impression(imp("a", 50), 0, 0, 100).unwrap();
    caught_up(&mut j, 0);
    j.advance(2000);
    assert!(j.take_ready(10)[0].label);
}

#[test]
fn a_click_stamped_before_its_impression_is_counted_and_dropped() {
    let mut j = joiner();
    j.on_impression(imp("a", 1000), 0, 0, 1000).unwrap();
    j.on_click(click("a", 999), 0, 0, 1000).unwrap();
    j.on_click(click("b", 10), 0, 1, 1000).unwrap();
    j.on_impression(imp("b", 20), 0, 1, 1000).unwrap();
    assert_eq!(j.stats().clicks_before_impression, 2);
    caught_up(&mut j, 0);
    j.advance(10_000);
    assert!(j.take_ready(10).iter().all(|r| !r.label));
}

#[test]
fn orphan_clicks_expire_on_the_impressions_watermark_not_the_clock() {
    let mut j = joiner();
    j.on_click(click("ghost", 5000), 0, 7, 5000).unwrap();
    // The impressions partition is far behind (a backlog): however late it
    // is by the clock, the impression may still come.
    j.set_caught_up(IMP, 0, false);
    j.on_impression(imp("early", 1000), 0, 0, 1_000_000).unwrap();
    j.advance(1_000_000);
    assert_eq!(j.orphans_len(), 1, "held while impressions are behind the click's time");
    // Impressions read past the click's time (+ lateness): it is unmatched.
    j.on_impression(imp("later", 5000 + L), 0, 1, 1_000_000).unwrap();
    j.advance(1_000_000);
    assert_eq!(j.orphans_len(), 0);
    assert_eq!(j.stats().unmatched_clicks, 1);
    assert_eq!(commit_of(&j, CLK, 0), 8);
}

#[test]
fn orphan_clicks_are_capped_and_the_oldest_is_dropped_and_counted() {
    let mut rules = JoinRules::window(W, L);
    rules.max_orphans = 3;
    let mut j = Joiner::new(rules, IMP, CLK);
    for i in 0..5 {
        j.on_click(click(&format!("ghost-{i}"), 100 + i), 0, i, 1000).unwrap();
    }
    assert_eq!(j.orphans_len(), 3);
    assert_eq!(j.stats().orphans_evicted, 2);
    assert_eq!(commit_of(&j, CLK, 0), 2, "evicted offsets are released");
}

#[test]
fn offsets_commit_only_after_rows_are_durable() {
    let mut j = joiner();
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    j.on_impression(imp("b", 500), 0, 1, 500).unwrap();
    j.on_click(click("a", 100), 0, 0, 500).unwrap();
    assert_eq!(commit_of(&j, IMP, 0), 0);
    caught_up(&mut j, 0);
    j.advance(W + L); // only "a" closes
    let rows = j.take_ready(10);
    assert_eq!(commit_of(&j, IMP, 0), 0, "taken but not durable");
    j.mark_durable(&rows);
    assert_eq!(commit_of(&j, IMP, 0), 1, "b still pending");
    assert_eq!(commit_of(&j, CLK, 0), 1, "a's click is durable with its row");
    j.advance(W + L + 500);
    let rows = j.take_ready(10);
    j.mark_durable(&rows);
    assert_eq!(commit_of(&j, IMP, 0), 2);
}

#[test]
fn an_answers_batch_is_committed_only_once_every_one_of_its_rows_is_durable() {
    // The three ads of one answer share offset 0: the offset is held until
    // the last of their rows is in a file, not released by the first.
    let mut j = joiner();
    let answer = vec![imp("s0", 0), imp("s1", 0), imp("s2", 0)];
    j.on_impressions(answer, 0, 0, 0).unwrap();
    j.on_impression(imp("next", 10), 0, 1, 10).unwrap();
    j.on_click(click("s2", 300), 0, 0, 300).unwrap();
    caught_up(&mut j, 0);
    j.advance(W + L + 10);
    let mut rows = j.take_ready(10);
    assert_eq!(rows.len(), 4);
    rows.sort_by(|a, b| a.event.impression_id.cmp(&b.event.impression_id));
    let labels: Vec<(&str, bool)> = rows.iter().map(|r| (r.event.impression_id.as_str(), r.label)).collect();
    assert_eq!(labels, [("next", false), ("s0", false), ("s1", false), ("s2", true)]);
    let (batch, next): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.event.impression_id != "next");
    j.mark_durable(&next);
    j.mark_durable(&batch[..2]);
    assert_eq!(commit_of(&j, IMP, 0), 0, "s2's row is not durable yet: its batch must be read again after a crash");
    assert_eq!(commit_of(&j, CLK, 0), 0);
    j.mark_durable(&batch[2..]);
    assert_eq!(commit_of(&j, IMP, 0), 2);
    assert_eq!(commit_of(&j, CLK, 0), 1);
}

#[test]
fn a_batch_with_one_bad_impression_is_refused_whole() {
    let mut j = joiner();
    let mut bad = imp("s1", 0);
    bad.features.as_mut().unwrap().values.pop();
    let err = j.on_impressions(vec![imp("s0", 0), bad, imp("s2", 0)], 0, 0, 0).unwrap_err();
    assert!(matches!(err, Rejected::MisalignedFeatures { names: 2, values: 1 }), "{err}");
    assert_eq!(j.pending_len(), 0, "none of the answer was taken");
    let future = imp("s3", 10 * 60_000);
    assert!(matches!(j.on_impressions(vec![imp("s4", 0), future], 0, 0, 0), Err(Rejected::FutureServedAt(_))));
    assert_eq!(j.pending_len(), 0);
    j.skip((IMP, 0), 0);
    assert_eq!(commit_of(&j, IMP, 0), 1, "the refused message is skipped once dead-lettered");
}

#[test]
fn duplicate_impressions_produce_one_row() {
    let mut j = joiner();
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    j.on_impression(imp("a", 0), 0, 1, 0).unwrap();
    j.close_all(1000);
    assert_eq!(j.take_ready(10).len(), 1);
    assert_eq!(j.stats().duplicates, 1);
}

#[test]
fn impressions_written_before_a_restart_are_not_written_again() {
    let mut j = joiner();
    j.preload_written([written("a", RowKind::Final, false)]);
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    j.close_all(5000);
    assert!(j.take_ready(10).is_empty());
    assert_eq!(j.stats().already_written, 1);
    assert_eq!(commit_of(&j, IMP, 0), 1);
}

#[test]
fn a_click_re_read_for_a_row_already_written_as_clicked_is_a_duplicate_not_late() {
    let mut j = joiner();
    j.preload_written([written("a", RowKind::Final, true), written("b", RowKind::Final, false)]);
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    j.on_impression(imp("b", 0), 0, 1, 0).unwrap();
    j.on_click(click("a", 10), 0, 0, 10).unwrap();
    assert_eq!((j.stats().duplicates, j.stats().late_clicks, j.stats().clicks_after_close), (1, 0, 0));
    // b's row says no click came inside its window; a click stamped after
    // the window is late.
    j.on_click(click("b", W + 10), 0, 1, W + 10).unwrap();
    assert_eq!(j.stats().late_clicks, 1);
    assert!(j.take_ready(10).is_empty(), "nothing is written twice");
    assert_eq!(commit_of(&j, CLK, 0), 2);
}

#[test]
fn an_in_window_click_read_after_its_window_closed_is_counted_as_a_false_negative() {
    // A backlog whose event time goes backwards by more than the allowed
    // lateness (newer events first): the watermark has passed the older
    // impression's window before its click is read. The row is already
    // labelled 0; the click is counted apart from late clicks, because it
    // was not late: the log was out of order.
    let mut j = joiner();
    j.on_impression(imp("new", 1800), 0, 0, 1800).unwrap();
    j.on_click(click("new", 1900), 0, 0, 1900).unwrap();
    j.on_impression(imp("old", 0), 0, 1, 1900).unwrap();
    j.advance(1900);
    let rows = j.take_ready(10);
    assert_eq!(rows.len(), 1, "the old impression's window closed on the newer click");
    assert!(!rows[0].label);
    j.on_click(click("old", 500), 0, 1, 1900).unwrap();
    let stats = j.stats();
    assert_eq!((stats.clicks_after_close, stats.late_clicks), (1, 0));
    assert_eq!((stats.out_of_order_impressions, stats.out_of_order_clicks), (1, 1));
}

#[test]
fn events_behind_their_partitions_newest_time_by_more_than_the_lateness_are_counted_out_of_order() {
    let mut j = joiner();
    j.on_impression(imp("a", 10_000), 0, 0, 10_000).unwrap();
    // Within the allowed lateness: ordinary publishing jitter.
    j.on_impression(imp("b", 10_000 - L), 0, 1, 10_000).unwrap();
    // Another partition has its own order.
    j.on_impression(imp("c", 0), 1, 0, 10_000).unwrap();
    assert_eq!(j.stats().out_of_order_impressions, 0);
    j.on_impression(imp("d", 10_000 - L - 1), 0, 2, 10_000).unwrap();
    assert_eq!(j.stats().out_of_order_impressions, 1);
    j.on_click(click("a", 10_500), 0, 0, 10_500).unwrap();
    j.on_click(click("b", 10_500 - L), 0, 1, 10_500).unwrap();
    assert_eq!(j.stats().out_of_order_clicks, 0);
    j.on_click(click("d", 10_000), 0, 2, 10_500).unwrap();
    assert_eq!(j.stats().out_of_order_clicks, 1);
}

#[test]
fn failed_write_restores_rows_in_order() {
    let mut j = joiner();
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    j.on_impression(imp("b", 0), 0, 1, 0).unwrap();
    j.close_all(100);
    let rows = j.take_ready(1);
    j.restore(rows);
    assert_eq!(j.ready().len(), 2);
    assert_eq!(j.ready()[0].event.impression_id, "a");
    assert_eq!(commit_of(&j, IMP, 0), 0);
}

#[test]
fn refused_events_name_the_problem() {
    let mut j = joiner();
    let mut no_row = imp("a", 0);
    no_row.features = None;
    assert_eq!(j.on_impression(no_row, 0, 0, 0), Err(Rejected::NoFeatureRow));
    let mut skewed = imp("b", 0);
    skewed.features.as_mut().unwrap().values.pop();
    assert_eq!(j.on_impression(skewed, 0, 1, 0), Err(Rejected::MisalignedFeatures { names: 2, values: 1 }));
    assert!(matches!(j.on_impression(imp("c", 10_000_000), 0, 2, 0), Err(Rejected::FutureServedAt(_))));
    let mut no_time = imp("d", 0);
    no_time.served_at = None;
    assert_eq!(j.on_impression(no_time, 0, 3, 0), Err(Rejected::NoServedAt));
    assert_eq!(
        j.on_click(ClickEvent { impression_id: "a".into(), ..Default::default() }, 0, 0, 0),
        Err(Rejected::NoClickedAt)
    );
    assert_eq!(j.pending_len(), 0);
}

#[test]
fn streaming_mode_writes_provisional_correction_and_final_rows() {
    let mut rules = JoinRules::window(W, L);
    rules.mode = Mode::Streaming;
    rules.provisional_weight = 0.25;
    let mut j = Joiner::new(rules, IMP, CLK);
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    j.on_impression(imp("b", 0), 0, 1, 0).unwrap();
    let provisional = j.take_ready(10);
    assert_eq!(provisional.len(), 2);
    assert!(provisional.iter().all(|r| r.kind == RowKind::Provisional && !r.label && r.weight == 0.25));
    j.mark_durable(&provisional);
    assert_eq!(commit_of(&j, IMP, 0), 0, "a provisional row releases nothing");
    j.on_click(click("a", 500), 0, 0, 500).unwrap();
    let correction = j.take_ready(10);
    assert_eq!(correction.len(), 1);
    assert_eq!((correction[0].kind, correction[0].label), (RowKind::Correction, true));
    caught_up(&mut j, 0);
    j.advance(W + L);
    let finals = j.take_ready(10);
    assert_eq!(
        finals.iter().map(|r| (r.kind, r.label)).collect::<Vec<_>>(),
        [(RowKind::Final, true), (RowKind::Final, false)]
    );
    j.mark_durable(&finals);
    assert_eq!(commit_of(&j, IMP, 0), 2);
    assert_eq!(commit_of(&j, CLK, 0), 1);
}

#[test]
fn streaming_rows_already_written_before_a_restart_are_not_repeated() {
    let mut rules = JoinRules::window(W, L);
    rules.mode = Mode::Streaming;
    let mut j = Joiner::new(rules, IMP, CLK);
    j.preload_written([written("a", RowKind::Provisional, false), written("a", RowKind::Correction, true)]);
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    j.on_click(click("a", 10), 0, 0, 10).unwrap();
    assert!(j.take_ready(10).is_empty());
    j.close_all(5000);
    let rows = j.take_ready(10);
    assert_eq!(rows.iter().map(|r| r.kind).collect::<Vec<_>>(), [RowKind::Final]);
}

#[test]
fn negative_downsampling_is_deterministic_and_recorded_on_every_row() {
    let mut rules = JoinRules::window(W, L);
    rules.negative_keep_rate = 0.25;
    let run = || {
        let mut j = Joiner::new(rules.clone(), IMP, CLK);
        for i in 0..4000 {
            let id = uuid::Uuid::from_u128(0x1234_5678_0000_0000_0000_0000_0000_0000 + i as u128).to_string();
            j.on_impression(imp(&id, 0), 0, i, 0).unwrap();
            if i % 10 == 0 {
                j.on_click(click(&id, 5), 0, i / 10, 5).unwrap();
            }
        }
        j.close_all(5000);
        let rows = j.take_ready(10_000);
        j.mark_durable(&rows);
        (rows, j.stats(), commit_of(&j, IMP, 0))
    };
    let (rows, stats, committed) = run();
    let positives = rows.iter().filter(|r| r.label).count();
    let negatives = rows.len() - positives;
    assert_eq!(positives, 400, "every positive is kept");
    let expected = 3600.0 * 0.25;
    assert!((negatives as f64 - expected).abs() < 4.0 * (3600.0f64 * 0.25 * 0.75).sqrt(), "{negatives} kept");
    assert_eq!(stats.downsampled as usize, 3600 - negatives);
    assert!(rows.iter().all(|r| r.keep_rate == 0.25));
    assert_eq!(committed, 4000, "dropped negatives release their offsets");
    let (again, _, _) = run();
    let ids = |rows: &[LabelledRow]| rows.iter().map(|r| r.event.impression_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&rows), ids(&again), "the same impressions are kept on a re-read");
}

#[test]
fn revoking_a_partition_forgets_exactly_its_state() {
    let mut j = joiner();
    j.on_impression(imp("a", 0), 0, 0, 0).unwrap();
    j.on_impression(imp("b", 0), 1, 0, 0).unwrap();
    j.on_click(click("ghost", 0), 1, 0, 0).unwrap();
    j.on_impression(imp("c", 0), 1, 1, 0).unwrap();
    j.close_all(0); // every row ready; none written
    j.on_impression(imp("d", 10), 1, 2, 10).unwrap();
    j.revoke(&[1]);
    assert_eq!(j.pending_len(), 0);
    assert_eq!(j.orphans_len(), 0);
    assert!(j.ready().iter().all(|r| r.partition == 0), "partition 1's unwritten rows are the next owner's");
    assert!(j.committable().iter().all(|((_, p), _)| *p == 0));
    // Partition 0 is untouched.
    assert_eq!(j.ready().len(), 1);
    assert_eq!(commit_of(&j, IMP, 0), 0);
}

#[test]
fn state_bytes_grow_with_pending_impressions_and_return_to_zero() {
    let mut j = joiner();
    for i in 0..100 {
        j.on_impression(imp(&format!("i{i}"), 0), 0, i, 0).unwrap();
    }
    let full = j.state_bytes();
    assert!(full > 100 * 50, "{full}");
    j.close_all(10);
    let rows = j.take_ready(1000);
    j.mark_durable(&rows);
    caught_up(&mut j, 0);
    j.advance(1_000_000); // forget the remembered ids too
    assert_eq!(j.state_bytes(), 0);
}

#[test]
fn feature_names_are_stored_once_per_list() {
    let mut j = joiner();
    for i in 0..10 {
        j.on_impression(imp(&format!("i{i}"), 0), 0, i, 0).unwrap();
    }
    j.close_all(10);
    let rows = j.take_ready(100);
    assert!(rows.windows(2).all(|w| Arc::ptr_eq(&w[0].names, &w[1].names)));
    assert!(rows.iter().all(|r| r.event.features.as_ref().unwrap().names.is_empty()));
}

#[test]
fn a_bid_is_a_row_only_once_billed_and_a_lost_bid_writes_nothing() {
    let mut j = joiner();
    j.on_impression(bid("won", 0), 0, 0, 0).unwrap();
    j.on_impression(bid("lost", 0), 0, 1, 0).unwrap();
    j.on_impression(bid("clicked", 0), 0, 2, 0).unwrap();
    j.on_click(notice("won", 200), 0, 0, 200).unwrap();
    // A click proves the ad was shown, notice or not.
    j.on_click(click("clicked", 300), 0, 1, 300).unwrap();
    assert_eq!(commit_of(&j, IMP, 0), 0);
    j.close_all(5_000);
    let rows = j.take_ready(10);
    let labels: Vec<(&str, bool)> = rows.iter().map(|r| (r.event.impression_id.as_str(), r.label)).collect();
    assert_eq!(labels, [("won", false), ("clicked", true)]);
    let stats = j.stats();
    assert_eq!((stats.billings_joined, stats.unbilled, stats.clicks_joined), (1, 1, 1));
    assert_eq!(commit_of(&j, IMP, 0), 0, "the won bid's impression stays in flight until its row is durable");
    assert_eq!(commit_of(&j, CLK, 0), 0, "and so does its notice");
    j.mark_durable(&rows);
    assert_eq!(commit_of(&j, IMP, 0), 3);
    assert_eq!(commit_of(&j, CLK, 0), 2);
}

#[test]
fn a_notice_read_before_its_bid_is_held_and_joined() {
    let mut j = joiner();
    j.on_click(notice("a", 100), 0, 0, 100).unwrap();
    j.on_click(click("a", 150), 0, 1, 150).unwrap();
    assert_eq!(j.orphans_len(), 2, "a click and a notice wait for the same impression");
    j.on_impression(bid("a", 0), 0, 0, 150).unwrap();
    assert_eq!(j.orphans_len(), 0);
    j.close_all(5_000);
    let rows = j.take_ready(10);
    assert_eq!(rows.len(), 1);
    assert!(rows[0].label);
    assert_eq!((j.stats().billings_joined, j.stats().clicks_joined), (1, 1));
    j.mark_durable(&rows);
    assert_eq!(commit_of(&j, CLK, 0), 2);
}

#[test]
fn late_duplicate_unexpected_and_unmatched_notices_are_counted_apart() {
    let mut j = joiner();
    j.on_impression(bid("late", 0), 0, 0, 0).unwrap();
    j.on_impression(bid("twice", 0), 0, 1, 0).unwrap();
    j.on_impression(imp("native", 0), 0, 2, 0).unwrap();
    j.on_click(notice("late", W + 1), 0, 0, W + 1).unwrap();
    j.on_click(notice("twice", 10), 0, 1, 10).unwrap();
    j.on_click(notice("twice", 20), 0, 2, 20).unwrap();
    j.on_click(notice("native", 30), 0, 3, 30).unwrap();
    j.on_click(notice("nobody", 40), 0, 4, 40).unwrap();
    caught_up(&mut j, 0);
    j.advance(10 * W);
    let rows = j.take_ready(10);
    let ids: Vec<&str> = rows.iter().map(|r| r.event.impression_id.as_str()).collect();
    assert_eq!(ids, ["twice", "native"], "the native impression was billed when served; the notice changes nothing");
    let s = j.stats();
    assert_eq!(s.late_billings, 1);
    assert_eq!(s.duplicates, 1);
    assert_eq!(s.billings_not_expected, 1);
    assert_eq!(s.unmatched_billings, 1);
    assert_eq!(s.unbilled, 1, "the late notice's bid closed unbilled");
    assert_eq!(s.unmatched_clicks, 0, "notices are not counted as clicks");
}

#[test]
fn a_notice_in_window_read_after_its_bid_closed_unbilled_is_counted_as_a_lost_row() {
    let mut j = joiner();
    j.on_impression(bid("a", 0), 0, 0, 0).unwrap();
    // Another click moves the watermark past the window (not so far that
    // the closed bid is forgotten).
    j.on_click(click("other", W + 2 * L), 0, 0, W + 2 * L).unwrap();
    j.advance(W + 2 * L);
    assert_eq!(j.stats().unbilled, 1);
    j.on_click(notice("a", 500), 0, 1, W + 2 * L).unwrap();
    assert_eq!(j.stats().billings_after_close, 1);
    assert!(j.take_ready(10).is_empty());
}

#[test]
fn streaming_mode_writes_a_bids_provisional_row_on_its_notice() {
    let mut rules = JoinRules::window(W, L);
    rules.mode = Mode::Streaming;
    let mut j = Joiner::new(rules, IMP, CLK);
    j.on_impression(bid("won", 0), 0, 0, 0).unwrap();
    j.on_impression(bid("lost", 0), 0, 1, 0).unwrap();
    j.on_impression(bid("clicked", 0), 0, 2, 0).unwrap();
    assert!(j.take_ready(10).is_empty(), "no provisional negative for a bid that may lose");
    j.on_click(notice("won", 100), 0, 0, 100).unwrap();
    j.on_click(click("clicked", 100), 0, 1, 100).unwrap();
    j.on_click(notice("clicked", 200), 0, 2, 200).unwrap();
    let early: Vec<(String, RowKind)> =
        j.take_ready(10).into_iter().map(|r| (r.event.impression_id.clone(), r.kind)).collect();
    assert_eq!(
        early,
        [("won".to_string(), RowKind::Provisional), ("clicked".to_string(), RowKind::Correction)],
        "a notice after the click adds no provisional negative"
    );
    j.close_all(5_000);
    let finals: Vec<(String, bool)> =
        j.take_ready(10).into_iter().map(|r| (r.event.impression_id.clone(), r.label)).collect();
    assert_eq!(finals, [("won".to_string(), false), ("clicked".to_string(), true)]);
}

#[test]
fn a_downsampled_billed_negative_releases_its_notice() {
    let mut rules = JoinRules::window(W, L);
    rules.negative_keep_rate = 1e-9;
    let mut j = Joiner::new(rules, IMP, CLK);
    j.on_impression(bid("a", 0), 0, 0, 0).unwrap();
    j.on_click(notice("a", 10), 0, 0, 10).unwrap();
    j.close_all(5_000);
    assert!(j.take_ready(10).is_empty());
    assert_eq!(j.stats().downsampled, 1);
    assert_eq!((commit_of(&j, IMP, 0), commit_of(&j, CLK, 0)), (1, 1));
}

#[test]
fn notices_after_the_window_closed_are_counted_by_what_the_impression_was() {
    let mut j = joiner();
    j.on_impression(imp("native", 0), 0, 0, 0).unwrap();
    j.on_impression(bid("billed", 0), 0, 1, 0).unwrap();
    j.on_impression(bid("clicked", 0), 0, 2, 0).unwrap();
    j.on_click(notice("billed", 10), 0, 0, 10).unwrap();
    j.on_click(click("clicked", 20), 0, 1, 20).unwrap();
    // The watermark passes the windows, not the time they are remembered.
    j.on_click(click("other", W + 2 * L), 0, 2, W + 2 * L).unwrap();
    j.advance(W + 2 * L);
    assert_eq!(j.take_ready(10).len(), 3);
    for (i, id) in ["native", "billed", "clicked"].into_iter().enumerate() {
        j.on_click(notice(id, 30), 0, 3 + i as i64, W + 2 * L).unwrap();
    }
    let s = j.stats();
    assert_eq!(s.billings_not_expected, 1, "the native impression was billed when served");
    assert_eq!(s.duplicates, 2, "the billed bid's repeat, and the clicked bid's row is written");
    assert_eq!((s.billings_after_close, s.late_billings), (0, 0));
}
