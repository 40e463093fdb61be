//! The last-resort pCTR when no model can score: a prior per ad, read from
//! one feature column (its historical CTR). One definition, used by the
//! ranker (when its models fail) and by the gateway (when the ranker is
//! unreachable).

use adserve_proto::v1::FeatureMatrix;

/// `model_version` reported for prior scores.
pub const PRIOR_MODEL_VERSION: &str = "fallback-prior";

/// The registry feature the prior reads by default.
pub const DEFAULT_PRIOR_FEATURE: &str = "ad_ctr_7d";

/// The prior when the column is missing or unusable for a row.
pub const PRIOR_WHEN_MISSING: f32 = 0.01;

/// One prior pCTR per row: the `feature` column, clamped to
/// [`adserve_auction`'s floor, 1]; [`PRIOR_WHEN_MISSING`] where the column is
/// absent or the row short, the floor where the value is not finite.
pub fn prior_pctr(matrix: &FeatureMatrix, feature: &str, floor: f32) -> Vec<f32> {
    let col = matrix.feature_names.iter().position(|n| n == feature);
    (0..matrix.num_rows as usize)
        .map(|r| {
            let v = col.and_then(|c| matrix.row(r).map(|row| row[c])).unwrap_or(PRIOR_WHEN_MISSING);
            if v.is_finite() { v.clamp(floor, 1.0) } else { floor }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prior_is_the_column_clamped_or_a_default() {
        let m = FeatureMatrix {
            feature_names: vec!["x".into(), "ad_ctr_7d".into()],
            num_rows: 4,
            values: vec![0.0, 0.03, 0.0, 2.0, 0.0, f32::NAN, 0.0, 0.0],
            ..Default::default()
        };
        assert_eq!(prior_pctr(&m, "ad_ctr_7d", 1e-7), vec![0.03, 1.0, 1e-7, 1e-7]);
        assert_eq!(prior_pctr(&m, "absent", 1e-7), vec![PRIOR_WHEN_MISSING; 4]);
    }
}
