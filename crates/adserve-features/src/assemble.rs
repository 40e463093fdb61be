//! Pure assembly of the feature matrix from what each source returned. The
//! feature-service serves it; the gateway uses it with no sources (all
//! defaults) when the feature-service is unavailable, so both agree exactly.

use std::collections::HashMap;

use crate::{Entity, FeatureRegistry, FeatureSpec, Source};
use adserve_proto::v1::{FeatureMatrix, RequestContext};

/// What the sources returned for one request; anything absent takes the
/// registry default.
#[derive(Debug, Default, Clone)]
pub struct SourceValues {
    /// Batch-tier user attributes (`attribute -> value`).
    pub user_batch: HashMap<String, f32>,
    /// Batch-tier ad attributes by ad id.
    pub ad_batch: HashMap<i64, HashMap<String, f32>>,
    /// Real-time user counters (`attribute -> value`).
    pub user_realtime: HashMap<String, f32>,
    /// Real-time ad counters by ad id.
    pub ad_realtime: HashMap<i64, HashMap<String, f32>>,
}

/// The matrix and, per registry column, how many cells took the default.
#[derive(Debug, Clone, PartialEq)]
pub struct Assembled {
    /// `ad_ids.len() x registry`, in registry column order.
    pub matrix: FeatureMatrix,
    /// Per column: cells whose source had no value (unknown entity, missing
    /// attribute, failed source).
    pub missing: Vec<u32>,
    /// Per column: cells whose stored value was refused by
    /// [`crate::FeatureSpec::accepts`] (not finite, or outside the declared
    /// range) and replaced by the default.
    pub invalid: Vec<u32>,
}

/// A stored value for `f`, or its default; counted as missing or invalid.
fn checked(f: &FeatureSpec, value: Option<f32>, missing: &mut u32, invalid: &mut u32) -> f32 {
    match value {
        Some(v) if f.accepts(v) => f.serve(v),
        Some(_) => {
            *invalid += 1;
            f.default
        }
        None => {
            *missing += 1;
            f.default
        }
    }
}

/// Builds the `ad_ids.len() x registry` matrix in registry column order.
/// For COPPA requests personal features always hold their defaults, whatever
/// the sources returned (not counted as missing: nothing was looked up).
/// Every stored value is checked against its spec first.
pub fn assemble(registry: &FeatureRegistry, ad_ids: &[i64], ctx: &RequestContext, values: &SourceValues) -> Assembled {
    let cols = registry.features.len();
    let mut missing = vec![0u32; cols];
    let mut invalid = vec![0u32; cols];
    let rows = ad_ids.len() as u32;
    // Row-invariant columns (user and context) are computed once, and count
    // once per row.
    let mut template = Vec::with_capacity(cols);
    for (c, f) in registry.features.iter().enumerate() {
        if f.personal && ctx.coppa {
            template.push(f.default);
            continue;
        }
        let (mut m, mut i) = (0, 0);
        let v = match (f.entity, f.source) {
            (Entity::User, Source::Dynamodb) => {
                checked(f, values.user_batch.get(&f.attribute).copied(), &mut m, &mut i)
            }
            (Entity::User, Source::Redis) => {
                checked(f, values.user_realtime.get(&f.attribute).copied(), &mut m, &mut i)
            }
            (Entity::Context, _) => {
                let field = match f.attribute.as_str() {
                    "device" => Some(&ctx.device),
                    "placement" => Some(&ctx.placement),
                    "surface" => Some(&ctx.surface),
                    _ => None,
                };
                match field {
                    Some(field) if Some(field) == f.equals.as_ref() => 1.0,
                    Some(_) => 0.0,
                    None => f.default,
                }
            }
            _ => f.default,
        };
        missing[c] = m * rows;
        invalid[c] = i * rows;
        template.push(v);
    }
    let ad_cols: Vec<(usize, &FeatureSpec)> =
        registry.features.iter().enumerate().filter(|(_, f)| f.entity == Entity::Ad).collect();
    let mut out = Vec::with_capacity(ad_ids.len() * cols);
    for ad_id in ad_ids {
        let start = out.len();
        out.extend_from_slice(&template);
        let batch = values.ad_batch.get(ad_id);
        let realtime = values.ad_realtime.get(ad_id);
        for &(c, f) in &ad_cols {
            let source = if f.source == Source::Redis { realtime } else { batch };
            let stored = source.and_then(|m| m.get(&f.attribute)).copied();
            out[start + c] = checked(f, stored, &mut missing[c], &mut invalid[c]);
        }
    }
    Assembled {
        matrix: FeatureMatrix {
            feature_names: registry.names().into_iter().map(String::from).collect(),
            num_rows: rows,
            values: out,
        },
        missing,
        invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(coppa: bool) -> RequestContext {
        RequestContext { placement: "feed_top".into(), device: "desktop".into(), surface: "home".into(), coppa }
    }

    fn value(m: &FeatureMatrix, row: usize, name: &str) -> f32 {
        let c = m.feature_names.iter().position(|n| n == name).expect(name);
        m.row(row).expect("row")[c]
    }

    fn sample() -> SourceValues {
        let mut v = SourceValues::default();
        v.user_batch.insert("ctr_30d".into(), 0.11);
        v.user_realtime.insert("impressions_1h".into(), 4.0);
        v.ad_batch.insert(7, HashMap::from([("ctr_7d".to_string(), 0.3), ("quality_score".to_string(), 0.9)]));
        v.ad_realtime.insert(8, HashMap::from([("impressions_1h".to_string(), 12.0)]));
        v
    }

    #[test]
    fn values_land_in_their_registry_columns() {
        let r = crate::registry();
        let m = assemble(r, &[7, 8], &ctx(false), &sample()).matrix;
        assert_eq!(m.num_rows, 2);
        assert_eq!(m.values.len(), 2 * r.features.len());
        assert_eq!(value(&m, 0, "user_ctr_30d"), 0.11);
        assert_eq!(value(&m, 1, "user_impressions_1h"), 4.0);
        assert_eq!(value(&m, 0, "ad_ctr_7d"), 0.3);
        assert_eq!(value(&m, 1, "ad_impressions_1h"), 12.0);
        assert_eq!(value(&m, 0, "ctx_placement_feed_top"), 1.0);
        assert_eq!(value(&m, 0, "ctx_device_mobile"), 0.0);
    }

    #[test]
    fn unknown_entities_get_registry_defaults() {
        let r = crate::registry();
        let m = assemble(r, &[99], &ctx(false), &SourceValues::default()).matrix;
        for (i, f) in r.features.iter().enumerate() {
            if f.entity != Entity::Context {
                assert_eq!(m.values[i], f.default, "{}", f.name);
            }
        }
    }

    #[test]
    fn coppa_requests_never_use_personal_features() {
        let r = crate::registry();
        let m = assemble(r, &[7], &ctx(true), &sample()).matrix;
        for (i, f) in r.features.iter().enumerate() {
            if f.personal {
                assert_eq!(m.values[i], f.default, "{}", f.name);
            }
        }
        assert_eq!(value(&m, 0, "ad_ctr_7d"), 0.3, "ad features are still used");
    }

    #[test]
    fn stored_values_that_are_not_finite_or_out_of_range_are_served_as_defaults_and_counted() {
        let r = crate::registry();
        let mut v = sample();
        v.user_batch.insert("ctr_30d".into(), f32::NAN);
        v.user_realtime.insert("impressions_1h".into(), 1e40_f64 as f32); // inf after the cast
        v.ad_batch.insert(7, HashMap::from([("ctr_7d".to_string(), 3.5), ("quality_score".to_string(), 0.9)]));
        let a = assemble(r, &[7, 8], &ctx(false), &v);
        let col = |name: &str| r.index_of(name).expect(name);
        let default = |name: &str| r.features[col(name)].default;
        assert!(a.matrix.values.iter().all(|x| x.is_finite()), "nothing non-finite reaches the ranker");
        assert_eq!(value(&a.matrix, 0, "user_ctr_30d"), default("user_ctr_30d"));
        assert_eq!(value(&a.matrix, 1, "user_impressions_1h"), default("user_impressions_1h"));
        assert_eq!(value(&a.matrix, 0, "ad_ctr_7d"), default("ad_ctr_7d"));
        assert_eq!(value(&a.matrix, 0, "ad_quality_score"), 0.9, "the row's valid values are kept");
        // User columns count once per row; ad 7's ctr is invalid, ad 8 has no batch row.
        assert_eq!(a.invalid[col("user_ctr_30d")], 2);
        assert_eq!(a.invalid[col("user_impressions_1h")], 2);
        assert_eq!(a.invalid[col("ad_ctr_7d")], 1);
        assert_eq!(a.missing[col("ad_ctr_7d")], 1);
        assert_eq!(a.missing[col("ad_quality_score")], 1);
        assert_eq!(a.invalid[col("ad_quality_score")], 0);
        assert_eq!(a.missing[col("ctx_device_mobile")] + a.invalid[col("ctx_device_mobile")], 0);
    }
}
