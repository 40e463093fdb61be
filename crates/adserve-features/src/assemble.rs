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

/// Builds the `ad_ids.len() x registry` matrix in registry column order.
/// For COPPA requests personal features always hold their defaults, whatever
/// the sources returned.
pub fn assemble(
    registry: &FeatureRegistry,
    ad_ids: &[i64],
    ctx: &RequestContext,
    values: &SourceValues,
) -> FeatureMatrix {
    let cols = registry.features.len();
    // Row-invariant columns (user and context) are computed once.
    let template: Vec<f32> = registry
        .features
        .iter()
        .map(|f| {
            if f.personal && ctx.coppa {
                return f.default;
            }
            match (f.entity, f.source) {
                (Entity::User, Source::Dynamodb) => values.user_batch.get(&f.attribute).copied().unwrap_or(f.default),
                (Entity::User, Source::Redis) => values.user_realtime.get(&f.attribute).copied().unwrap_or(f.default),
                (Entity::Context, _) => {
                    let field = match f.attribute.as_str() {
                        "device" => &ctx.device,
                        "placement" => &ctx.placement,
                        "surface" => &ctx.surface,
                        _ => return f.default,
                    };
                    if Some(field) == f.equals.as_ref() { 1.0 } else { 0.0 }
                }
                _ => f.default,
            }
        })
        .collect();
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
            if let Some(v) = source.and_then(|m| m.get(&f.attribute)) {
                out[start + c] = *v;
            }
        }
    }
    FeatureMatrix {
        feature_names: registry.names().into_iter().map(String::from).collect(),
        num_rows: ad_ids.len() as u32,
        values: out,
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
        let m = assemble(r, &[7, 8], &ctx(false), &sample());
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
        let m = assemble(r, &[99], &ctx(false), &SourceValues::default());
        for (i, f) in r.features.iter().enumerate() {
            if f.entity != Entity::Context {
                assert_eq!(m.values[i], f.default, "{}", f.name);
            }
        }
    }

    #[test]
    fn coppa_requests_never_use_personal_features() {
        let r = crate::registry();
        let m = assemble(r, &[7], &ctx(true), &sample());
        for (i, f) in r.features.iter().enumerate() {
            if f.personal {
                assert_eq!(m.values[i], f.default, "{}", f.name);
            }
        }
        assert_eq!(value(&m, 0, "ad_ctr_7d"), 0.3, "ad features are still used");
    }
}
