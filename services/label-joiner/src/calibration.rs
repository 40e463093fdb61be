//! Calibration as the labels arrive: for each model version, the clicks its
//! impressions got against the clicks its pCTRs predicted. The auction
//! multiplies pCTR by money, so a model whose predictions drift from what
//! users do mis-prices every slot; these counters let an alert
//! (`AdserveCalibrationDrift` in the Helm chart) catch it within hours
//! instead of at the next offline evaluation.
//!
//! Only final rows scored by a model count (a label is final once its window
//! has closed): a row the fallback chain scored (the fallback model, which
//! may carry the production model's version, or a prior) says nothing about
//! the model's calibration. Rows from gateways that predate the event's
//! `score_level` (unspecified) count as the model's, as they did before.
//! Negatives the joiner dropped by downsampling count through the ones it
//! kept: each kept negative stands for `1 / keep_rate` impressions.

use std::collections::BTreeMap;

use adserve_proto::v1::ScoreLevel;

use crate::{LabelledRow, RowKind};

/// One model version's share of a batch of rows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Impressions the rows stand for (kept negatives scaled up).
    pub impressions: f64,
    /// Clicked impressions.
    pub clicks: u64,
    /// Clicks predicted: the sum of pCTR over the impressions they stand for.
    pub expected_clicks: f64,
}

/// The tallies of `rows` by model version.
pub fn tally(rows: &[LabelledRow]) -> BTreeMap<&str, Tally> {
    let mut out: BTreeMap<&str, Tally> = BTreeMap::new();
    let by_model =
        |r: &&LabelledRow| matches!(ScoreLevel::of(r.event.score_level), ScoreLevel::Model | ScoreLevel::Unspecified);
    for r in rows.iter().filter(|r| r.kind == RowKind::Final).filter(by_model) {
        let stands_for = if r.label || r.keep_rate <= 0.0 { 1.0 } else { 1.0 / f64::from(r.keep_rate) };
        let t = out.entry(r.event.model_version.as_str()).or_default();
        t.impressions += stands_for;
        t.clicks += u64::from(r.label);
        t.expected_clicks += f64::from(r.event.pctr) * stands_for;
    }
    out
}

/// Adds `rows` to the calibration counters:
/// `adserve_label_joiner_calibration_{impressions,clicks,expected_clicks_micros}_total{model_version}`
/// (the float sums in whole units and micro units, rounded per batch).
pub fn record(rows: &[LabelledRow]) {
    for (version, t) in tally(rows) {
        let version = version.to_string();
        metrics::counter!("adserve_label_joiner_calibration_impressions_total", "model_version" => version.clone())
            .increment(t.impressions.round() as u64);
        metrics::counter!("adserve_label_joiner_calibration_clicks_total", "model_version" => version.clone())
            .increment(t.clicks);
        metrics::counter!("adserve_label_joiner_calibration_expected_clicks_micros_total", "model_version" => version)
            .increment((t.expected_clicks * 1e6).round() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adserve_proto::v1::ImpressionEvent;

    fn row(version: &str, pctr: f32, label: bool, kind: RowKind, keep_rate: f32) -> LabelledRow {
        let event = ImpressionEvent { model_version: version.into(), pctr, ..Default::default() };
        LabelledRow::test_row(event, kind, label, keep_rate)
    }

    #[test]
    fn kept_negatives_stand_for_the_dropped_ones_and_only_final_rows_count() {
        let rows = vec![
            row("m1", 0.1, true, RowKind::Final, 0.5),
            // One kept negative of every two: it stands for two impressions.
            row("m1", 0.1, false, RowKind::Final, 0.5),
            row("m1", 0.9, false, RowKind::Provisional, 1.0),
            row("m1", 0.9, true, RowKind::Correction, 1.0),
            row("m2", 0.2, false, RowKind::Final, 1.0),
        ];
        let t = tally(&rows);
        assert_eq!(t.len(), 2);
        let m1 = t["m1"];
        assert_eq!((m1.impressions, m1.clicks), (3.0, 1));
        assert!((m1.expected_clicks - 0.3).abs() < 1e-6, "{m1:?}");
        assert_eq!((t["m2"].impressions, t["m2"].clicks), (1.0, 0));
    }

    #[test]
    fn rows_the_fallback_chain_scored_do_not_count_toward_the_models_calibration() {
        let at = |level: ScoreLevel, pctr: f32, label: bool| {
            let mut r = row("m1", pctr, label, RowKind::Final, 1.0);
            r.event.score_level = level as i32;
            r
        };
        let rows = vec![
            at(ScoreLevel::Model, 0.1, false),
            // A gateway from before the field: the model's, as before.
            at(ScoreLevel::Unspecified, 0.1, true),
            // The fallback model under the production version, and a prior.
            at(ScoreLevel::FallbackModel, 0.9, true),
            at(ScoreLevel::Prior, 0.5, true),
        ];
        let t = tally(&rows);
        assert_eq!((t["m1"].impressions, t["m1"].clicks), (2.0, 1), "{t:?}");
        assert!((t["m1"].expected_clicks - 0.2).abs() < 1e-6, "{t:?}");
    }
}
