//! Pure assembly of the feature matrix from what each source returned. The
//! feature-service serves it; the gateway uses it with no sources (all
//! defaults) when the feature-service is unavailable, so both agree exactly.
//!
//! Ad values arrive dense, one entry per requested ad in request order:
//! batch rows as raw values in [`Plan::ad_batch_attributes`] slot order (the
//! in-process ad table holds them that way), real-time values as the packed
//! layout's array. Where each column reads from is resolved once per
//! registry ([`Plan`]), and values are written straight into the output
//! buffer: no per-cell string lookups, no per-ad maps.

use std::collections::HashMap;

use crate::{Entity, FeatureRegistry, FeatureSpec, Source, realtime};
use adserve_proto::v1::{FeatureMatrix, RequestContext};

/// A batch-tier ad row: raw stored values in [`Plan::ad_batch_attributes`]
/// order (`None`: the item lacks the attribute).
pub type AdRow = [Option<f32>];

/// Real-time values of one entity: the packed layout's values in
/// [`realtime::attributes`] order (all NaN when the stored value was not
/// the layout: served as defaults, counted invalid).
pub type RealtimeValues = [f32; realtime::ATTRIBUTES];

/// What the sources returned for one request; anything absent takes the
/// registry default.
#[derive(Debug, Default, Clone)]
pub struct SourceValues<'a> {
    /// Batch-tier user attributes (`attribute -> value`).
    pub user_batch: HashMap<String, f32>,
    /// Real-time user counters (`attribute -> value`).
    pub user_realtime: HashMap<String, f32>,
    /// Per requested ad, in request order: its batch row, if any. Empty
    /// (no batch values at all) or one entry per ad.
    pub ad_batch: Vec<Option<&'a AdRow>>,
    /// Per requested ad, in request order: its real-time values, if any.
    /// Empty or one entry per ad.
    pub ad_realtime: Vec<Option<RealtimeValues>>,
}

/// Where each stored ad column reads from, resolved once per registry
/// ([`FeatureRegistry::plan`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The distinct batch attributes of ad features, in slot order (first
    /// use in the registry): the layout of an [`AdRow`].
    pub ad_batch_attributes: Vec<String>,
    /// `(column, slot in AdRow)` of each ad batch feature.
    ad_batch: Vec<(usize, usize)>,
    /// `(column, index in RealtimeValues)` of each ad real-time feature.
    ad_realtime: Vec<(usize, usize)>,
}

impl Plan {
    /// Resolves `features` (already validated: every real-time attribute is
    /// in the packed layout).
    pub(crate) fn of(features: &[FeatureSpec]) -> Self {
        let mut plan = Self::default();
        for (c, f) in features.iter().enumerate() {
            match (f.entity, f.source) {
                (Entity::Ad, Source::Dynamodb) => {
                    let slot = match plan.ad_batch_attributes.iter().position(|a| *a == f.attribute) {
                        Some(slot) => slot,
                        None => {
                            plan.ad_batch_attributes.push(f.attribute.clone());
                            plan.ad_batch_attributes.len() - 1
                        }
                    };
                    plan.ad_batch.push((c, slot));
                }
                (Entity::Ad, Source::Redis) => {
                    if let Some(at) = realtime::attribute_index(&f.attribute) {
                        plan.ad_realtime.push((c, at));
                    }
                }
                _ => {}
            }
        }
        plan
    }

    /// A dense [`AdRow`] from `attribute -> value` (a DynamoDB item).
    pub fn ad_row(&self, values: &HashMap<String, f32>) -> Vec<Option<f32>> {
        self.ad_batch_attributes.iter().map(|a| values.get(a).copied()).collect()
    }
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

/// A stored value for `f`, served (through its transform), or its default;
/// counted as missing or invalid.
#[inline]
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
    let plan = registry.plan();
    let features = &registry.features;
    let mut out = vec![0f32; ad_ids.len() * cols];
    for (r, row) in out.chunks_exact_mut(cols.max(1)).enumerate().take(ad_ids.len()) {
        row.copy_from_slice(&template);
        let batch = values.ad_batch.get(r).copied().flatten();
        for &(c, slot) in &plan.ad_batch {
            let stored = batch.and_then(|b| b.get(slot).copied().flatten());
            row[c] = checked(&features[c], stored, &mut missing[c], &mut invalid[c]);
        }
        let realtime = values.ad_realtime.get(r).and_then(Option::as_ref);
        for &(c, at) in &plan.ad_realtime {
            row[c] = checked(&features[c], realtime.map(|v| v[at]), &mut missing[c], &mut invalid[c]);
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

    /// Ad 7's batch row (ctr_7d, quality_score), as the table holds it.
    fn row7(ctr: f32) -> Vec<Option<f32>> {
        crate::registry()
            .plan()
            .ad_row(&HashMap::from([("ctr_7d".to_string(), ctr), ("quality_score".to_string(), 0.9)]))
    }

    /// Ad 8's real-time values (impressions_1h = 12).
    fn realtime8() -> RealtimeValues {
        crate::realtime::Packed::of(&[("impressions_1h", 12.0)], 0).expect("layout").values
    }

    /// Values for ads [7, 8]: 7 has a batch row, 8 real-time counters.
    fn sample(row7: &AdRow) -> SourceValues<'_> {
        let mut v = SourceValues::default();
        v.user_batch.insert("ctr_30d".into(), 0.11);
        v.user_realtime.insert("impressions_1h".into(), 4.0);
        v.ad_batch = vec![Some(row7), None];
        v.ad_realtime = vec![None, Some(realtime8())];
        v
    }

    #[test]
    fn values_land_in_their_registry_columns() {
        let r = crate::registry();
        let row = row7(0.3);
        let m = assemble(r, &[7, 8], &ctx(false), &sample(&row)).matrix;
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
        let row = row7(0.3);
        let mut v = sample(&row);
        v.ad_batch.truncate(1);
        v.ad_realtime.truncate(1);
        let m = assemble(r, &[7], &ctx(true), &v).matrix;
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
        let row = row7(3.5);
        let mut v = sample(&row);
        v.user_batch.insert("ctr_30d".into(), f32::NAN);
        v.user_realtime.insert("impressions_1h".into(), 1e40_f64 as f32); // inf after the cast
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

    #[test]
    fn the_plan_maps_each_ad_column_to_its_slot_once() {
        let r = crate::registry();
        let plan = r.plan();
        // quality_score feeds two columns (raw and bucketized) from one slot.
        let slots = plan.ad_batch_attributes.iter().filter(|a| *a == "quality_score").count();
        assert_eq!(slots, 1);
        let row = row7(0.3);
        let m =
            assemble(r, &[7], &ctx(false), &SourceValues { ad_batch: vec![Some(&row)], ..Default::default() }).matrix;
        assert_eq!(value(&m, 0, "ad_quality_score"), 0.9);
        assert_eq!(value(&m, 0, "ad_quality_bucket"), 3.0);
        // A malformed packed value: every real-time column invalid for that ad.
        let v = SourceValues { ad_realtime: vec![Some([f32::NAN; realtime::ATTRIBUTES])], ..Default::default() };
        let a = assemble(r, &[7], &ctx(false), &v);
        assert_eq!(a.invalid[r.index_of("ad_impressions_1h").unwrap()], 1);
    }
}
