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

/// A batch-tier ad's typed values: raw categorical values in
/// [`Plan::ad_text_attributes`] order and embeddings in
/// [`Plan::ad_vector_attributes`] order (`None`: the item lacks it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdTypedRow {
    /// Raw categorical values (hashed at assembly, so crosses see them).
    pub text: Vec<Option<String>>,
    /// Embeddings, as stored (checked at assembly).
    pub vectors: Vec<Option<Vec<f32>>>,
}

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
    /// Batch-tier user categorical values (`attribute -> raw value`).
    pub user_text: HashMap<String, String>,
    /// Batch-tier user embeddings (`attribute -> vector`).
    pub user_vectors: HashMap<String, Vec<f32>>,
    /// Per requested ad, in request order: its typed batch values, if any.
    /// Empty or one entry per ad.
    pub ad_typed: Vec<Option<&'a AdTypedRow>>,
}

/// Where a categorical column's raw value comes from.
#[derive(Debug, Clone, PartialEq)]
enum Categorical {
    /// A request field: 0 placement, 1 device, 2 surface.
    Request(usize),
    /// A user batch attribute.
    User(String),
    /// A slot of [`AdTypedRow::text`].
    Ad(usize),
    /// A cross of two categorical columns (their indices).
    Cross(usize, usize),
    /// Nothing (a context categorical of another source; refused at parse).
    None,
}

/// Where an embedding column comes from.
#[derive(Debug, Clone, PartialEq)]
enum Embedding {
    /// A user batch attribute.
    User(String),
    /// A slot of [`AdTypedRow::vectors`].
    Ad(usize),
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
    /// The distinct batch attributes of ad categorical features, in slot
    /// order: the layout of [`AdTypedRow::text`].
    pub ad_text_attributes: Vec<String>,
    /// The distinct batch attributes of ad embeddings: the layout of
    /// [`AdTypedRow::vectors`].
    pub ad_vector_attributes: Vec<String>,
    /// Per categorical column, its raw value's source.
    categorical: Vec<Categorical>,
    /// Per embedding column, its source.
    embeddings: Vec<Embedding>,
}

/// The slot of `attribute` in `slots`, added at the end the first time.
fn slot_of(slots: &mut Vec<String>, attribute: &str) -> usize {
    match slots.iter().position(|a| a == attribute) {
        Some(slot) => slot,
        None => {
            slots.push(attribute.to_string());
            slots.len() - 1
        }
    }
}

impl Plan {
    /// Resolves the dense, categorical and embedding columns (already
    /// validated: every real-time attribute is in the packed layout, every
    /// cross operand is a categorical column above it).
    pub(crate) fn of(features: &[FeatureSpec], categorical: &[FeatureSpec], embeddings: &[FeatureSpec]) -> Self {
        let mut plan = Self::default();
        for f in categorical {
            let source = match (f.entity, f.source) {
                (_, Source::Request) => match f.attribute.as_str() {
                    "placement" => Categorical::Request(0),
                    "device" => Categorical::Request(1),
                    "surface" => Categorical::Request(2),
                    _ => Categorical::None,
                },
                (_, Source::Cross) => {
                    let index = |op: &str| categorical.iter().position(|c| c.name == op);
                    match f.cross.as_ref().map(|[a, b]| (index(a), index(b))) {
                        Some((Some(a), Some(b))) => Categorical::Cross(a, b),
                        _ => Categorical::None,
                    }
                }
                (Entity::User, Source::Dynamodb) => Categorical::User(f.attribute.clone()),
                (Entity::Ad, Source::Dynamodb) => Categorical::Ad(slot_of(&mut plan.ad_text_attributes, &f.attribute)),
                _ => Categorical::None,
            };
            plan.categorical.push(source);
        }
        for f in embeddings {
            plan.embeddings.push(match f.entity {
                Entity::Ad => Embedding::Ad(slot_of(&mut plan.ad_vector_attributes, &f.attribute)),
                _ => Embedding::User(f.attribute.clone()),
            });
        }
        for (c, f) in features.iter().enumerate() {
            match (f.entity, f.source) {
                (Entity::Ad, Source::Dynamodb) => {
                    let slot = slot_of(&mut plan.ad_batch_attributes, &f.attribute);
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

    /// An [`AdTypedRow`] from a DynamoDB item's text and vector attributes.
    pub fn ad_typed_row(&self, text: &HashMap<String, String>, vectors: &HashMap<String, Vec<f32>>) -> AdTypedRow {
        AdTypedRow {
            text: self.ad_text_attributes.iter().map(|a| text.get(a).cloned()).collect(),
            vectors: self.ad_vector_attributes.iter().map(|a| vectors.get(a).cloned()).collect(),
        }
    }

    /// Whether the registry has typed ad features (the ad table then keeps
    /// typed rows).
    pub fn has_typed_ad_features(&self) -> bool {
        !self.ad_text_attributes.is_empty() || !self.ad_vector_attributes.is_empty()
    }
}

/// The matrix and, per registry column, how many cells took the default.
#[derive(Debug, Clone, PartialEq)]
pub struct Assembled {
    /// `ad_ids.len() x registry`, in registry column order.
    pub matrix: FeatureMatrix,
    /// Per column (dense, then categorical, then embedding columns): cells
    /// whose source had no value (unknown entity, missing attribute, failed
    /// source).
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
    let typed = assemble_typed(registry, ad_ids.len(), ctx, values);
    missing.extend(typed.missing);
    invalid.extend(typed.invalid);
    Assembled {
        matrix: FeatureMatrix {
            feature_names: registry.names().into_iter().map(String::from).collect(),
            num_rows: rows,
            values: out,
            categorical_names: registry.categorical.iter().map(|f| f.name.clone()).collect(),
            categorical_ids: typed.ids,
            embedding_names: registry.embeddings.iter().map(|f| f.name.clone()).collect(),
            embedding_dims: registry.embeddings.iter().map(|f| f.dim.unwrap_or(0)).collect(),
            embedding_values: typed.vectors,
        },
        missing,
        invalid,
    }
}

/// The categorical and embedding blocks and their counts (categorical
/// columns, then embedding columns).
struct Typed {
    ids: Vec<i64>,
    vectors: Vec<f32>,
    missing: Vec<u32>,
    invalid: Vec<u32>,
}

/// A raw categorical value, empty treated as absent.
fn present(v: Option<&str>) -> Option<&str> {
    v.filter(|s| !s.is_empty())
}

fn assemble_typed(registry: &FeatureRegistry, rows: usize, ctx: &RequestContext, values: &SourceValues) -> Typed {
    let plan = registry.plan();
    let (cats, embs) = (&registry.categorical, &registry.embeddings);
    let mut missing = vec![0u32; cats.len() + embs.len()];
    let mut invalid = vec![0u32; cats.len() + embs.len()];
    let blank = |f: &FeatureSpec| f.personal && ctx.coppa;
    // Row-invariant raw values (request, user), counted once per row.
    let mut template: Vec<Option<&str>> = vec![None; cats.len()];
    for (k, (f, source)) in cats.iter().zip(&plan.categorical).enumerate() {
        if blank(f) {
            continue;
        }
        let raw = match source {
            Categorical::Request(0) => present(Some(&ctx.placement)),
            Categorical::Request(1) => present(Some(&ctx.device)),
            Categorical::Request(_) => present(Some(&ctx.surface)),
            Categorical::User(a) => present(values.user_text.get(a).map(String::as_str)),
            Categorical::Ad(_) | Categorical::Cross(..) | Categorical::None => continue,
        };
        if raw.is_none() {
            missing[k] = rows as u32;
        }
        template[k] = raw;
    }
    // Columns that differ per row: ad values, and crosses of them. The rest
    // is hashed once.
    let varies: Vec<bool> = plan
        .categorical
        .iter()
        .map(|source| match source {
            Categorical::Ad(_) => true,
            Categorical::Cross(a, b) => {
                matches!(plan.categorical[*a], Categorical::Ad(_)) || matches!(plan.categorical[*b], Categorical::Ad(_))
            }
            _ => false,
        })
        .collect();
    let id_of = |k: usize, raw: &[Option<&str>]| -> i64 {
        let f = &cats[k];
        match &plan.categorical[k] {
            _ if blank(f) => 0,
            Categorical::Cross(a, b) => f.cross_id(raw[*a], raw[*b]),
            _ => f.category_id(raw[k]),
        }
    };
    let template_ids: Vec<i64> = (0..cats.len()).map(|k| if varies[k] { 0 } else { id_of(k, &template) }).collect();
    let mut ids = Vec::with_capacity(rows * cats.len());
    let mut raw = template.clone();
    for r in 0..rows {
        let at = ids.len();
        ids.extend_from_slice(&template_ids);
        if !varies.iter().any(|v| *v) {
            continue;
        }
        raw.copy_from_slice(&template);
        let typed = values.ad_typed.get(r).copied().flatten();
        for (k, source) in plan.categorical.iter().enumerate() {
            if let Categorical::Ad(slot) = source {
                let v = present(typed.and_then(|t| t.text.get(*slot)).and_then(|v| v.as_deref()));
                if v.is_none() {
                    missing[k] += 1;
                }
                raw[k] = v;
            }
        }
        for k in (0..cats.len()).filter(|k| varies[*k]) {
            ids[at + k] = id_of(k, &raw);
        }
    }
    // Embeddings: the user's once, each ad's per row; a refused vector is
    // the default in every element.
    let width: usize = embs.iter().map(|f| f.dim.unwrap_or(0) as usize).sum();
    let mut vectors = Vec::with_capacity(rows * width);
    let mut user: Vec<Option<&[f32]>> = vec![None; embs.len()];
    for (k, (f, source)) in embs.iter().zip(&plan.embeddings).enumerate() {
        if let Embedding::User(a) = source
            && !blank(f)
        {
            let c = cats.len() + k;
            match values.user_vectors.get(a) {
                Some(v) if f.accepts_embedding(v) => user[k] = Some(v.as_slice()),
                Some(_) => invalid[c] = rows as u32,
                None => missing[c] = rows as u32,
            }
        }
    }
    for r in 0..rows {
        let typed = values.ad_typed.get(r).copied().flatten();
        for (k, (f, source)) in embs.iter().zip(&plan.embeddings).enumerate() {
            let c = cats.len() + k;
            let v = match source {
                Embedding::User(_) => user[k],
                Embedding::Ad(slot) => match typed.and_then(|t| t.vectors.get(*slot)).and_then(Option::as_deref) {
                    Some(v) if f.accepts_embedding(v) => Some(v),
                    Some(_) => {
                        invalid[c] += 1;
                        None
                    }
                    None => {
                        missing[c] += 1;
                        None
                    }
                },
            };
            match v {
                Some(v) => vectors.extend_from_slice(v),
                None => vectors.extend(std::iter::repeat_n(f.default, f.dim.unwrap_or(0) as usize)),
            }
        }
    }
    Typed { ids, vectors, missing, invalid }
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

    /// A registry with every typed kind: context, user and ad categoricals,
    /// a cross, and user and ad embeddings.
    fn typed_registry() -> FeatureRegistry {
        let entry = |body: &str| format!("[[feature]]\n{body}description=\"\"\nowner=\"t\"\n");
        let doc = [
            "[tables]\nuser=\"u\"\nad=\"a\"\n[redis]\nkey_prefix=\"rt\"\n[request]\ndevices=[\"mobile\"]\n\
             [label]\nwindow_seconds=60\n"
                .to_string(),
            entry(
                "name=\"ad_x\"\nentity=\"ad\"\nsource=\"dynamodb\"\nattribute=\"x\"\ndefault=0.0\nrange=[0.0, 1.0]\n",
            ),
            entry(
                "name=\"ctx_placement\"\nentity=\"context\"\nsource=\"request\"\nattribute=\"placement\"\n\
                 type=\"categorical\"\nbuckets=64\ndefault=0.0\n",
            ),
            entry(
                "name=\"user_country\"\nentity=\"user\"\nsource=\"dynamodb\"\nattribute=\"country\"\n\
                 type=\"categorical\"\nbuckets=300\ndefault=0.0\npersonal=true\n",
            ),
            entry(
                "name=\"ad_category\"\nentity=\"ad\"\nsource=\"dynamodb\"\nattribute=\"category\"\n\
                 type=\"categorical\"\nbuckets=1000\ndefault=0.0\n",
            ),
            entry(
                "name=\"placement_x_category\"\nentity=\"ad\"\nsource=\"cross\"\nattribute=\"-\"\n\
                 type=\"categorical\"\ncross=[\"ctx_placement\", \"ad_category\"]\nbuckets=4096\ndefault=0.0\n",
            ),
            entry(
                "name=\"user_vec\"\nentity=\"user\"\nsource=\"dynamodb\"\nattribute=\"vec\"\ntype=\"embedding\"\n\
                 dim=2\ndefault=0.0\nrange=[-1.0, 1.0]\npersonal=true\n",
            ),
            entry(
                "name=\"ad_vec\"\nentity=\"ad\"\nsource=\"dynamodb\"\nattribute=\"vec\"\ntype=\"embedding\"\n\
                 dim=3\ndefault=0.5\nrange=[-1.0, 1.0]\n",
            ),
        ]
        .concat();
        FeatureRegistry::parse(&doc).expect("valid")
    }

    #[test]
    fn typed_columns_travel_as_ids_and_vectors_in_their_own_blocks() {
        let r = typed_registry();
        let plan = r.plan();
        assert_eq!(plan.ad_text_attributes, ["category"]);
        assert_eq!(plan.ad_vector_attributes, ["vec"]);
        let full = plan.ad_typed_row(
            &HashMap::from([("category".to_string(), "travel".to_string())]),
            &HashMap::from([("vec".to_string(), vec![0.1, -0.2, 0.3])]),
        );
        let bad = AdTypedRow { text: vec![None], vectors: vec![Some(vec![0.1, 2.0, 0.3])] };
        let mut v = SourceValues { ad_typed: vec![Some(&full), Some(&bad), None], ..Default::default() };
        v.user_text.insert("country".into(), "NL".into());
        v.user_vectors.insert("vec".into(), vec![0.25, -0.75]);
        let a = assemble(&r, &[1, 2, 3], &ctx(false), &v);
        let m = &a.matrix;
        m.check_shape().expect("consistent blocks");
        assert_eq!(m.categorical_names, ["ctx_placement", "user_country", "ad_category", "placement_x_category"]);
        assert_eq!(
            (m.embedding_names.clone(), m.embedding_dims.clone()),
            (vec!["user_vec".into(), "ad_vec".into()], vec![2, 3])
        );
        let (placement, country, category, cross) =
            (&r.categorical[0], &r.categorical[1], &r.categorical[2], &r.categorical[3]);
        let id = |f: &FeatureSpec, v: &str| f.category_id(Some(v));
        let crossed = cross.cross_id(Some("feed_top"), Some("travel"));
        assert_eq!(
            m.categorical_row(0).unwrap(),
            [id(placement, "feed_top"), id(country, "NL"), id(category, "travel"), crossed]
        );
        assert_eq!(
            m.categorical_row(1).unwrap(),
            [id(placement, "feed_top"), id(country, "NL"), 0, 0],
            "no category: no cross"
        );
        assert_eq!(m.categorical_row(2).unwrap(), [id(placement, "feed_top"), id(country, "NL"), 0, 0]);
        assert_eq!(m.embedding_row(0).unwrap(), [0.25, -0.75, 0.1, -0.2, 0.3]);
        assert_eq!(m.embedding_row(1).unwrap(), [0.25, -0.75, 0.5, 0.5, 0.5], "out of range: the default, whole");
        assert_eq!(m.embedding_row(2).unwrap(), [0.25, -0.75, 0.5, 0.5, 0.5]);
        // Counts: dense column, then categorical, then embedding columns.
        assert_eq!(a.missing, [3, 0, 0, 2, 0, 0, 1]);
        assert_eq!(a.invalid, [0, 0, 0, 0, 0, 0, 1]);

        // COPPA: personal columns (and crosses of them) hold 0 / the default,
        // uncounted; the rest is served.
        let a = assemble(&r, &[1], &ctx(true), &SourceValues { ad_typed: vec![Some(&full)], ..v.clone() });
        assert_eq!(
            a.matrix.categorical_row(0).unwrap(),
            [id(placement, "feed_top"), 0, id(category, "travel"), crossed]
        );
        assert_eq!(a.matrix.embedding_row(0).unwrap(), [0.0, 0.0, 0.1, -0.2, 0.3]);
        assert_eq!(a.missing[1..], [0, 0, 0, 0, 0, 0]);
        // The embedded registry's request categoricals are served with no
        // source at all (the gateway's fallback matrix); its batch-tier ones
        // (ad topic, user top interest, their cross) are then missing, 0.
        let plain = assemble(crate::registry(), &[1, 2], &ctx(false), &SourceValues::default()).matrix;
        plain.check_shape().expect("consistent blocks");
        assert_eq!(
            plain.categorical_row(1).unwrap(),
            [96, 3, 80, 591, 0, 0, 0],
            "feed_top, desktop, home: the trainer's ids"
        );
        assert!(plain.embedding_values.is_empty());
    }

    #[test]
    fn coppa_blanks_the_user_by_ad_topic_cross_and_still_serves_the_ads_topic() {
        let r = crate::registry();
        let row = r.plan().ad_typed_row(&HashMap::from([("topic".to_string(), "travel".to_string())]), &HashMap::new());
        let mut v = SourceValues { ad_typed: vec![Some(&row)], ..Default::default() };
        v.user_text.insert("top_interest".into(), "games".into());
        let k = |name: &str| r.categorical.iter().position(|f| f.name == name).expect(name);
        let three = |a: &Assembled| {
            let ids = a.matrix.categorical_row(0).unwrap();
            (ids[k("ad_topic_id")], ids[k("user_top_interest_id")], ids[k("user_interest_x_ad_topic")])
        };
        // The trainer's pinned ids (the_registrys_categoricals_hash_to_the_pinned_ids).
        assert_eq!(three(&assemble(r, &[1], &ctx(false), &v)), (32, 49, 493));
        let coppa = assemble(r, &[1], &ctx(true), &v);
        assert_eq!(three(&coppa), (32, 0, 0));
        let dense = r.features.len();
        assert_eq!(coppa.missing[dense + k("user_top_interest_id")], 0, "blanked, not missing");
        assert_eq!(coppa.missing[dense + k("user_interest_x_ad_topic")], 0);
    }
}
