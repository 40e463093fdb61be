//! The declarative feature registry: the one definition of every feature the
//! ranker scores and the gateway logs (`features.toml`, embedded at build time
//! and also read by the Python trainer).
//!
//! The feature-service assembles columns in registry order; models declare
//! their feature order in their manifest and are checked against the registry
//! when loaded.

use std::{collections::HashSet, sync::OnceLock};

pub mod assemble;
pub mod prior;
pub mod realtime;
pub mod request;

pub use assemble::{AdRow, AdTypedRow, Assembled, Plan, RealtimeValues, SourceValues, assemble};

use serde::Deserialize;

/// The registry source, embedded so that every binary carries the same definition.
pub const REGISTRY_TOML: &str = include_str!("../features.toml");

/// Which entity a feature describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    /// The requesting user.
    User,
    /// The candidate ad.
    Ad,
    /// The request context (placement, device, ...).
    Context,
}

/// Where a feature's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Batch tier: DynamoDB item attribute.
    Dynamodb,
    /// Real-time tier: Redis counter.
    Redis,
    /// Derived from the request context.
    Request,
    /// A categorical cross of two categorical features ([`FeatureSpec::cross`]).
    Cross,
}

/// What a feature's values are, and so which part of the matrix carries
/// them.
///
/// ```toml
/// type = "dense"                                   # the default: one f32
/// type = "categorical"                             # one int64 bucket id
/// buckets = 1000                                   #   in 0..1000, 0 = missing
/// type = "embedding"                               # dim f32 values
/// dim = 16
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One f32 per row, in the dense matrix.
    #[default]
    Dense,
    /// A raw value (a string: request field, DynamoDB `S`) hashed into
    /// `buckets`: [`FeatureSpec::category_id`]. Bucket 0 means missing.
    Categorical,
    /// A fixed-size f32 vector (a DynamoDB attribute), `dim` long; refused
    /// whole (served as `default` in every element) when its length is
    /// wrong or an element fails `range`.
    Embedding,
}

/// Most buckets a categorical feature may declare (2^24: an embedding
/// table a trainer can hold).
pub const MAX_BUCKETS: u32 = 1 << 24;

/// Longest embedding a feature may declare.
pub const MAX_DIM: u32 = 1024;

/// The request fields a categorical feature may read.
pub const REQUEST_CATEGORICALS: [&str; 3] = ["placement", "device", "surface"];

/// What a cross hashes between its operands' raw values.
pub const CROSS_SEPARATOR: char = '\u{1f}';

/// FNV-1a, 64 bits: the hash of categorical values, in the trainer too
/// (`adserve_trainer.registry.fnv1a64`). Chosen for being defined in a
/// line and identical everywhere, not for speed or resistance to attack:
/// bucket ids only index embedding tables.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_parts(&[bytes])
}

/// [`fnv1a64`] of the concatenation of `parts`, without building it.
pub fn fnv1a64_parts(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.iter())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// One feature's definition.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Column name, unique across the registry.
    pub name: String,
    /// Entity the value belongs to.
    pub entity: Entity,
    /// Storage tier or request.
    pub source: Source,
    /// DynamoDB attribute, Redis key suffix or request context field.
    pub attribute: String,
    /// Served when no value exists or the source failed.
    pub default: f32,
    /// Never used or logged for COPPA requests. Every user feature is
    /// personal whatever the file says (a COPPA request names no user, so
    /// no user feature is read for it, online or offline); the file marks
    /// the rest (a cross of a personal feature).
    #[serde(default)]
    pub personal: bool,
    /// Request features: indicator value to compare the field against.
    #[serde(default)]
    pub equals: Option<String>,
    /// Stored features: the values a store may hold, `[min, max]` inclusive
    /// (any finite value without it), in the store's (raw) units. See
    /// [`FeatureSpec::accepts`].
    #[serde(default)]
    pub range: Option<[f32; 2]>,
    /// Stored features: applied to an accepted stored value before it is
    /// served (the default is already in served units). See [`Transform`].
    #[serde(default)]
    pub transform: Option<Transform>,
    /// Stored features: how old a value may be and still be right (the
    /// aggregator's freshness for real-time counters, the batch pipeline's
    /// schedule for batch features); `"1m"`, `"24h"`.
    #[serde(default, with = "humantime_serde")]
    pub freshness_sla: Option<std::time::Duration>,
    /// Who answers for the feature (a team).
    pub owner: String,
    /// What the feature means.
    pub description: String,
    /// What its values are (`type`; dense unless declared).
    #[serde(default, rename = "type")]
    pub kind: Kind,
    /// Categorical features: the hash space, bucket 0 included.
    #[serde(default)]
    pub buckets: Option<u32>,
    /// Embedding features: the vector's length.
    #[serde(default)]
    pub dim: Option<u32>,
    /// `source = "cross"`: the two categorical features (declared above it)
    /// whose raw values it hashes together.
    #[serde(default)]
    pub cross: Option<[String; 2]>,
}

/// What a stored feature's value goes through before it is served. The
/// feature-service applies it at serving time and the Python trainer's
/// offline retrieval (`adserve_trainer.offline`) applies the same function
/// to the same raw values, bit for bit: both compute in f64 and round once
/// to f32 (the identity test holds them to it).
///
/// ```toml
/// transform = "log1p"                        # ln(1 + x); needs range min > -1
/// transform = { clip = [0.0, 100.0] }        # min(max(x, lo), hi)
/// transform = { bucketize = [1.0, 10.0] }    # boundaries <= x: 0, 1 or 2
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Transform {
    /// `ln(1 + x)`.
    Log1p,
    /// `x` clamped to `[lo, hi]`.
    Clip([f32; 2]),
    /// The number of boundaries `<= x` (so `x` below the first is 0), as
    /// f32; boundaries strictly increasing.
    Bucketize(Vec<f32>),
}

impl Transform {
    /// The served value of an accepted raw value.
    pub fn apply(&self, raw: f32) -> f32 {
        match self {
            Self::Log1p => f64::from(raw).ln_1p() as f32,
            Self::Clip([lo, hi]) => raw.clamp(*lo, *hi),
            Self::Bucketize(bounds) => bounds.partition_point(|b| *b <= raw) as f32,
        }
    }

    /// Checks the transform's parameters against the feature's raw `range`
    /// and served `default`.
    fn validate(&self, range: Option<[f32; 2]>, default: f32) -> Result<(), String> {
        match self {
            Self::Log1p => {
                let Some([lo, hi]) = range else {
                    return Err("`log1p` needs a `range` (its min above -1)".into());
                };
                if lo <= -1.0 {
                    return Err("`log1p` needs `range` min above -1".into());
                }
                if !(self.apply(lo) <= default && default <= self.apply(hi)) {
                    return Err("default is not between log1p(range min) and log1p(range max)".into());
                }
            }
            Self::Clip([lo, hi]) => {
                if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                    return Err("`clip` must be [lo, hi] with finite lo <= hi".into());
                }
                if !(*lo <= default && default <= *hi) {
                    return Err("default lies outside `clip`".into());
                }
            }
            Self::Bucketize(bounds) => {
                if bounds.is_empty() || !bounds.iter().all(|b| b.is_finite()) {
                    return Err("`bucketize` needs at least one finite boundary".into());
                }
                if !bounds.windows(2).all(|w| w[0] < w[1]) {
                    return Err("`bucketize` boundaries must be strictly increasing".into());
                }
                if default.fract() != 0.0 || !(0.0..=bounds.len() as f32).contains(&default) {
                    return Err(format!("default must be a bucket index, 0..={}", bounds.len()));
                }
            }
        }
        Ok(())
    }
}

impl FeatureSpec {
    /// Whether a value read from a store may be served: finite, and inside
    /// `range` when one is declared. Anything else is served as the default
    /// and counted, so one corrupt stored value never reaches the ranker
    /// (which refuses a matrix holding NaN or infinity as a whole).
    pub fn accepts(&self, value: f32) -> bool {
        value.is_finite() && self.range.is_none_or(|[lo, hi]| lo <= value && value <= hi)
    }

    /// The served value of a stored value the spec [`accepts`](Self::accepts):
    /// the value through the feature's [`Transform`], if it has one.
    pub fn serve(&self, raw: f32) -> f32 {
        self.transform.as_ref().map_or(raw, |t| t.apply(raw))
    }

    /// A categorical feature's bucket of a raw value: `1 + fnv1a64(raw) %
    /// (buckets - 1)`, and 0 (missing) for no value or an empty one.
    pub fn category_id(&self, raw: Option<&str>) -> i64 {
        match raw {
            None | Some("") => 0,
            Some(v) => self.bucket(fnv1a64(v.as_bytes())),
        }
    }

    /// `1 + hash % (buckets - 1)`.
    fn bucket(&self, hash: u64) -> i64 {
        let buckets = u64::from(self.buckets.unwrap_or(2).max(2));
        (1 + hash % (buckets - 1)) as i64
    }

    /// A cross's bucket of its operands' raw values (0 when either is
    /// missing): the bucket of `a U+001F b`.
    pub fn cross_id(&self, a: Option<&str>, b: Option<&str>) -> i64 {
        match (a, b) {
            (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => {
                let mut sep = [0u8; 4];
                let sep = CROSS_SEPARATOR.encode_utf8(&mut sep).as_bytes();
                self.bucket(fnv1a64_parts(&[a.as_bytes(), sep, b.as_bytes()]))
            }
            _ => 0,
        }
    }

    /// Whether a stored embedding may be served: `dim` long, every element
    /// [`accepts`](Self::accepts)ed.
    pub fn accepts_embedding(&self, values: &[f32]) -> bool {
        self.dim.is_some_and(|d| values.len() == d as usize) && values.iter().all(|v| self.accepts(*v))
    }

    /// Checks the type's keys; `earlier`: the features declared above it.
    fn validate_kind(&self, earlier: &[FeatureSpec]) -> Result<(), String> {
        if self.kind != Kind::Categorical && (self.buckets.is_some() || self.cross.is_some()) {
            return Err("`buckets` and `cross` are for categorical features".into());
        }
        if self.kind != Kind::Embedding && self.dim.is_some() {
            return Err("`dim` is for embedding features".into());
        }
        if self.source == Source::Cross && self.kind != Kind::Categorical {
            return Err("a cross is a categorical feature".into());
        }
        if self.kind == Kind::Dense {
            return Ok(());
        }
        if self.transform.is_some() || self.equals.is_some() {
            return Err("`transform` and `equals` are for dense features".into());
        }
        if self.kind == Kind::Embedding {
            if !self.dim.is_some_and(|d| (1..=MAX_DIM).contains(&d)) {
                return Err(format!("embedding features need `dim` in 1..={MAX_DIM}"));
            }
            if self.source != Source::Dynamodb {
                return Err("embeddings are stored features (source = \"dynamodb\")".into());
            }
            return Ok(());
        }
        if !self.buckets.is_some_and(|b| (2..=MAX_BUCKETS).contains(&b)) {
            return Err(format!("categorical features need `buckets` in 2..={MAX_BUCKETS}"));
        }
        if self.default != 0.0 {
            return Err("a categorical default must be 0 (bucket 0 is missing)".into());
        }
        if self.range.is_some() {
            return Err("`range` is for numeric features".into());
        }
        match (self.source, &self.cross) {
            (Source::Cross, Some([a, b])) if a != b => {
                let mut entities = Vec::new();
                for op in [a, b] {
                    let Some(f) = earlier.iter().find(|f| &f.name == op) else {
                        return Err(format!(
                            "`cross` operand {op:?} must be a categorical, non-cross feature defined above it"
                        ));
                    };
                    if f.kind != Kind::Categorical || f.source == Source::Cross {
                        return Err(format!(
                            "`cross` operand {op:?} must be a categorical, non-cross feature defined above it"
                        ));
                    }
                    if f.personal && !self.personal {
                        return Err("a cross of a personal feature is personal".into());
                    }
                    entities.push(f.entity);
                }
                let want = if entities.contains(&Entity::Ad) {
                    Entity::Ad
                } else if entities.contains(&Entity::User) {
                    Entity::User
                } else {
                    Entity::Context
                };
                if self.entity != want {
                    return Err(format!(
                        "a cross of these features has entity {:?}",
                        format!("{want:?}").to_lowercase()
                    ));
                }
                Ok(())
            }
            (Source::Cross, _) => Err("`cross` must name two different categorical features".into()),
            (_, Some(_)) => Err("`cross` needs source = \"cross\"".into()),
            (Source::Request, None) if !REQUEST_CATEGORICALS.contains(&self.attribute.as_str()) => {
                Err(format!("request categoricals read one of {}", REQUEST_CATEGORICALS.join(", ")))
            }
            (Source::Request | Source::Dynamodb, None) => Ok(()),
            _ => Err("categorical features come from the request, DynamoDB or a cross".into()),
        }
    }
}

/// DynamoDB table names of the batch tier.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tables {
    /// User features, partition key `user_id` (S).
    pub user: String,
    /// Ad features, partition key `ad_id` (S).
    pub ad: String,
}

/// Redis layout of the real-time tier.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisLayout {
    /// Every key of the real-time tier starts with it (see [`realtime`]).
    pub key_prefix: String,
}

/// The request contract's closed sets.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// Every accepted `context.device`.
    pub devices: Vec<String>,
}

/// What a training label means.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    /// A click counts when it arrives within this many seconds of its impression.
    pub window_seconds: u64,
}

impl LabelSpec {
    /// The label window.
    pub fn window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.window_seconds)
    }
}

/// The parsed, validated registry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeatureRegistry {
    /// Batch-tier tables.
    pub tables: Tables,
    /// Real-time-tier key layout.
    pub redis: RedisLayout,
    /// Closed sets of the request contract.
    pub request: RequestSpec,
    /// The label definition.
    pub label: LabelSpec,
    /// Dense features, in the dense matrix's column order (after parsing;
    /// the document's `[[feature]]` entries of every type are read into it
    /// first).
    #[serde(rename = "feature")]
    pub features: Vec<FeatureSpec>,
    /// Categorical features, in their column order.
    #[serde(skip)]
    pub categorical: Vec<FeatureSpec>,
    /// Embedding features, in their column order.
    #[serde(skip)]
    pub embeddings: Vec<FeatureSpec>,
    /// Where each stored ad column reads from, resolved at parse.
    #[serde(skip)]
    plan: Plan,
}

/// Why a registry document is invalid.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegistryError {
    /// Not valid TOML or not the registry's shape.
    #[error("feature registry: {0}")]
    Parse(String),
    /// Valid shape, inconsistent content.
    #[error("feature registry, line {line}: feature {name:?}: {why}")]
    Invalid {
        /// The offending feature.
        name: String,
        /// What is wrong.
        why: String,
        /// 1-based line of the feature's `name = ...` in the document (its
        /// second definition for a duplicate; 0 when it cannot be found).
        line: usize,
    },
}

impl FeatureRegistry {
    /// Parses and validates a registry document.
    pub fn parse(toml_text: &str) -> Result<Self, RegistryError> {
        let mut registry: Self = toml::from_str(toml_text).map_err(|e| RegistryError::Parse(e.to_string()))?;
        for f in &mut registry.features {
            f.personal |= f.entity == Entity::User;
        }
        registry.validate().map_err(|e| match e {
            RegistryError::Invalid { name, why, .. } => {
                let line = name_line(toml_text, &name, why.contains("defined twice"));
                RegistryError::Invalid { name, why, line }
            }
            other => other,
        })?;
        for f in std::mem::take(&mut registry.features) {
            match f.kind {
                Kind::Dense => registry.features.push(f),
                Kind::Categorical => registry.categorical.push(f),
                Kind::Embedding => registry.embeddings.push(f),
            }
        }
        if registry.features.is_empty() {
            return Err(RegistryError::Parse("no dense [[feature]] defined".into()));
        }
        registry.plan = Plan::of(&registry.features, &registry.categorical, &registry.embeddings);
        Ok(registry)
    }

    fn validate(&self) -> Result<(), RegistryError> {
        let mut seen = HashSet::new();
        for (i, f) in self.features.iter().enumerate() {
            let invalid = |why: &str| RegistryError::Invalid { name: f.name.clone(), why: why.to_string(), line: 0 };
            if f.name.is_empty() || !f.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                return Err(invalid("name must be non-empty snake_case"));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(invalid("name is defined twice"));
            }
            if !f.default.is_finite() {
                return Err(invalid("default must be finite"));
            }
            if f.owner.trim().is_empty() {
                return Err(invalid("`owner` must name who answers for the feature"));
            }
            f.validate_kind(&self.features[..i]).map_err(|why| invalid(&why))?;
            let computed = matches!(f.source, Source::Request | Source::Cross);
            if computed && (f.transform.is_some() || f.freshness_sla.is_some()) {
                return Err(invalid("`transform` and `freshness_sla` are for stored features"));
            }
            if let Some([lo, hi]) = f.range {
                if computed {
                    return Err(invalid("`range` is for stored features; request features are 0 or 1"));
                }
                if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                    return Err(invalid("`range` must be [min, max] with finite min <= max"));
                }
                // With a transform the default is in served units, checked below.
                if f.transform.is_none() && !f.accepts(f.default) {
                    return Err(invalid("default lies outside `range`"));
                }
            }
            if let Some(t) = &f.transform {
                t.validate(f.range, f.default).map_err(|why| invalid(&why))?;
            }
            match (f.entity, f.source) {
                (_, Source::Cross) => {}
                (Entity::Context, Source::Request) if f.kind == Kind::Dense && f.equals.is_none() => {
                    return Err(invalid("request features need `equals`"));
                }
                (Entity::Context, Source::Request) => {}
                (Entity::Context, _) | (_, Source::Request) => {
                    return Err(invalid("context features, and only they, come from the request"));
                }
                _ if f.equals.is_some() => return Err(invalid("`equals` is only for request features")),
                _ => {}
            }
            if f.source == Source::Redis && !realtime::attributes().contains(&f.attribute) {
                return Err(invalid(&format!(
                    "real-time attribute {:?} is not one the aggregator keeps: {}",
                    f.attribute,
                    realtime::attributes().join(", ")
                )));
            }
            if f.entity == Entity::Ad && f.personal && f.source != Source::Cross {
                return Err(invalid("ad features cannot be personal (only a cross may be)"));
            }
            if f.attribute == "device"
                && let Some(value) = &f.equals
                && !self.request.devices.contains(value)
            {
                return Err(invalid("`equals` names a device missing from [request].devices"));
            }
        }
        if self.request.devices.is_empty() || self.request.devices.iter().any(String::is_empty) {
            return Err(RegistryError::Parse("[request].devices: at least one non-empty device".into()));
        }
        if self.label.window_seconds == 0 || self.label.window_seconds > 7 * 24 * 3600 {
            return Err(RegistryError::Parse("[label].window_seconds: must be in 1..=604800 (7 days)".into()));
        }
        if self.features.is_empty() {
            return Err(RegistryError::Parse("no [[feature]] defined".into()));
        }
        Ok(())
    }

    /// Where each stored ad column reads from (resolved once, at parse).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Feature names in column order.
    pub fn names(&self) -> Vec<&str> {
        self.features.iter().map(|f| f.name.as_str()).collect()
    }

    /// Default values in column order.
    pub fn defaults(&self) -> Vec<f32> {
        self.features.iter().map(|f| f.default).collect()
    }

    /// A matrix of `rows` rows over the registry's dense and categorical
    /// features (not its embeddings), in registry order as the
    /// feature-service serves them: dense values near their defaults, varied
    /// per row, and every categorical id varied per row within its buckets.
    /// For benchmarks and contract tests.
    pub fn sample_matrix(&self, rows: usize) -> adserve_proto::v1::FeatureMatrix {
        let mut values = Vec::with_capacity(rows * self.features.len());
        for r in 0..rows {
            values.extend(self.features.iter().enumerate().map(|(c, f)| f.default + ((r * 7 + c) % 13) as f32 * 0.01));
        }
        let categorical_ids = (0..rows)
            .flat_map(|r| {
                self.categorical
                    .iter()
                    .enumerate()
                    .map(move |(c, f)| ((r * 31 + c * 7) % f.buckets.unwrap_or(1) as usize) as i64)
            })
            .collect();
        adserve_proto::v1::FeatureMatrix {
            feature_names: self.features.iter().map(|f| f.name.clone()).collect(),
            num_rows: rows as u32,
            values,
            categorical_names: self.categorical.iter().map(|f| f.name.clone()).collect(),
            categorical_ids,
            ..Default::default()
        }
    }

    /// Column index of `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.features.iter().position(|f| f.name == name)
    }

    /// `(column, spec)` for features of one entity and source.
    pub fn select(&self, entity: Entity, source: Source) -> impl Iterator<Item = (usize, &FeatureSpec)> {
        self.features.iter().enumerate().filter(move |(_, f)| f.entity == entity && f.source == source)
    }

    /// Redis key holding every real-time counter of `entity` `id`, packed
    /// (see [`realtime`]).
    pub fn realtime_key(&self, entity: Entity, id: &str) -> String {
        realtime::value_key(&self.redis.key_prefix, entity, id)
    }
}

/// The 1-based line defining feature `name` (`name = "..."`): the first,
/// or the second when `second` (a duplicate); 0 when not found.
fn name_line(text: &str, name: &str, second: bool) -> usize {
    let quoted = format!("\"{name}\"");
    let mut hits = text.lines().enumerate().filter(|(_, l)| {
        let l = l.trim_start();
        l.strip_prefix("name").is_some_and(|rest| {
            rest.trim_start()
                .strip_prefix('=')
                .is_some_and(|v| v.trim().split('#').next().unwrap_or("").trim() == quoted)
        })
    });
    let hit = if second { hits.nth(1) } else { hits.next() };
    hit.map_or(0, |(i, _)| i + 1)
}

/// The registry compiled into this binary.
pub fn registry() -> &'static FeatureRegistry {
    static REGISTRY: OnceLock<FeatureRegistry> = OnceLock::new();
    // The embedded document is checked by `embedded_registry_is_valid` below,
    // so this cannot fail in a tested build.
    REGISTRY.get_or_init(|| FeatureRegistry::parse(REGISTRY_TOML).expect("embedded features.toml is valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_registry_is_valid() {
        let r = FeatureRegistry::parse(REGISTRY_TOML).expect("valid");
        assert!(r.features.len() >= 6);
        assert_eq!(r.index_of("user_ctr_30d"), Some(0));
        assert_eq!(r.names().len(), r.defaults().len());
    }

    #[test]
    fn a_personal_stored_ad_feature_is_refused() {
        let f = "name=\"x\"\nentity=\"ad\"\nsource=\"redis\"\nattribute=\"clicks_1h\"\ndefault=0.0\npersonal=true\n\
                 description=\"\"\nowner=\"t\"\n";
        let err = FeatureRegistry::parse(&doc(f)).unwrap_err().to_string();
        assert!(err.contains("ad features cannot be personal"), "{err}");
    }

    #[test]
    fn every_user_feature_is_personal_whatever_the_file_says() {
        // A COPPA request names no user: the service reads no user feature
        // for it, so the offline path must blank every one too.
        let f = "name=\"u\"\nentity=\"user\"\nsource=\"redis\"\nattribute=\"clicks_1h\"\ndefault=0.0\n\
                 description=\"\"\nowner=\"t\"\n";
        let r = FeatureRegistry::parse(&doc(f)).expect("valid");
        assert!(r.features[0].personal);
        let r = registry();
        let all: Vec<&FeatureSpec> = r.features.iter().chain(&r.categorical).chain(&r.embeddings).collect();
        for f in &all {
            // A cross is personal when an operand is (the user x ad-topic cross).
            let want = match &f.cross {
                Some(ops) => ops.iter().any(|op| all.iter().any(|g| &g.name == op && g.personal)),
                None => f.entity == Entity::User,
            };
            assert_eq!(f.personal, want, "{}", f.name);
        }
    }

    #[test]
    fn redis_keys_follow_the_layout() {
        let r = registry();
        assert_eq!(r.realtime_key(Entity::Ad, "42"), "rt:{a}:42");
        assert_eq!(r.realtime_key(Entity::User, "u-1"), "rt:{u:u-1}");
    }

    fn doc(feature: &str) -> String {
        format!(
            "[tables]\nuser=\"u\"\nad=\"a\"\n[redis]\nkey_prefix=\"rt\"\n[request]\ndevices=[\"mobile\"]\n\
             [label]\nwindow_seconds=60\n[[feature]]\n{feature}"
        )
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let f = "name=\"x\"\nentity=\"ad\"\nsource=\"redis\"\nattribute=\"clicks_1h\"\ndefault=0.0\ndescription=\"\"\nowner=\"t\"\n";
        let text = format!("{}[[feature]]\n{f}", doc(f));
        let err = FeatureRegistry::parse(&text).unwrap_err();
        assert!(err.to_string().contains("defined twice"), "{err}");
        // The line of the second definition.
        let second = text.lines().enumerate().filter(|(_, l)| l.starts_with("name=\"x\"")).nth(1).unwrap().0 + 1;
        assert!(err.to_string().contains(&format!("line {second}:")), "{err}");
    }

    #[test]
    fn request_feature_without_equals_is_rejected() {
        let f = "name=\"c\"\nentity=\"context\"\nsource=\"request\"\nattribute=\"device\"\ndefault=0.0\ndescription=\"\"\nowner=\"t\"\n";
        let err = FeatureRegistry::parse(&doc(f)).unwrap_err();
        assert!(err.to_string().contains("equals"), "{err}");
    }

    #[test]
    fn device_indicators_must_name_a_known_device() {
        let f = "name=\"c\"\nentity=\"context\"\nsource=\"request\"\nattribute=\"device\"\nequals=\"toaster\"\n\
                 default=0.0\ndescription=\"\"\nowner=\"t\"\n";
        let err = FeatureRegistry::parse(&doc(f)).unwrap_err();
        assert!(err.to_string().contains("[request].devices"), "{err}");
    }

    #[test]
    fn ranges_are_checked_at_load_and_bound_what_is_served() {
        let f = |range: &str, default: &str| {
            format!(
                "name=\"x\"\nentity=\"ad\"\nsource=\"redis\"\nattribute=\"clicks_1h\"\ndefault={default}\n\
                 range={range}\ndescription=\"\"\nowner=\"t\"\n"
            )
        };
        let ok = FeatureRegistry::parse(&doc(&f("[0.0, 1.0]", "0.5"))).expect("valid");
        let spec = &ok.features[0];
        assert!(spec.accepts(0.0) && spec.accepts(1.0) && spec.accepts(0.25));
        assert!(!spec.accepts(1.5) && !spec.accepts(-0.1) && !spec.accepts(f32::NAN) && !spec.accepts(f32::INFINITY));
        for (range, default, why) in [
            ("[1.0, 0.0]", "0.5", "min <= max"),
            ("[0.0, 1.0]", "2.0", "outside `range`"),
            ("[0.0, inf]", "0.5", "finite"),
        ] {
            let err = FeatureRegistry::parse(&doc(&f(range, default))).unwrap_err();
            assert!(err.to_string().contains(why), "{range} {default}: {err}");
        }
        // Without a range, any finite value is served.
        let spec = registry().features.iter().find(|f| f.source == Source::Request).expect("a request feature");
        assert!(spec.range.is_none() && !spec.accepts(f32::NAN) && spec.accepts(1e30));
    }

    #[test]
    fn every_stored_feature_declares_a_range() {
        for f in &registry().features {
            assert_eq!(f.range.is_some(), f.source != Source::Request, "{}", f.name);
        }
    }

    #[test]
    fn real_time_features_must_name_an_aggregated_counter() {
        let f = "name=\"x\"\nentity=\"ad\"\nsource=\"redis\"\nattribute=\"views_1h\"\ndefault=0.0\ndescription=\"\"\nowner=\"t\"\n";
        let err = FeatureRegistry::parse(&doc(f)).unwrap_err();
        assert!(err.to_string().contains("not one the aggregator keeps"), "{err}");
        assert!(err.to_string().contains("impressions_5m"), "the message lists what is kept: {err}");
    }

    fn stored(extra: &str) -> String {
        format!(
            "name=\"x\"\nentity=\"user\"\nsource=\"dynamodb\"\nattribute=\"a\"\ndescription=\"\"\nowner=\"t\"\n{extra}\n"
        )
    }

    #[test]
    fn transforms_map_accepted_raw_values_to_served_ones() {
        let log = FeatureRegistry::parse(&doc(&stored("default=0.0\nrange=[0.0, 1e6]\ntransform=\"log1p\""))).unwrap();
        let f = &log.features[0];
        assert_eq!(f.transform, Some(Transform::Log1p));
        assert_eq!(f.serve(0.0), 0.0);
        assert!((f.serve(std::f32::consts::E - 1.0) - 1.0).abs() < 1e-6);
        // f64 then one rounding: what Python's float32(math.log1p(float(x))) gives.
        assert_eq!(f.serve(3.0), (4.0f64).ln() as f32);
        let clip =
            FeatureRegistry::parse(&doc(&stored("default=1.0\nrange=[-5.0, 5.0]\ntransform={ clip = [0.0, 2.0] }")))
                .unwrap();
        assert_eq!([-1.0, 0.5, 3.0].map(|v| clip.features[0].serve(v)), [0.0, 0.5, 2.0]);
        let b = FeatureRegistry::parse(&doc(&stored(
            "default=1.0\nrange=[0.0, 1.0]\ntransform={ bucketize = [0.25, 0.5] }",
        )))
        .unwrap();
        // A value on a boundary belongs to the bucket above it.
        assert_eq!([0.0, 0.25, 0.3, 0.5, 1.0].map(|v| b.features[0].serve(v)), [0.0, 1.0, 1.0, 2.0, 2.0]);
        // No transform: served as stored.
        assert_eq!(registry().features[0].serve(0.125), 0.125);
    }

    #[test]
    fn bad_transforms_and_metadata_are_refused_with_the_reason() {
        for (extra, why) in [
            ("default=0.0\ntransform=\"log1p\"", "needs a `range`"),
            ("default=0.0\nrange=[-2.0, 1.0]\ntransform=\"log1p\"", "min above -1"),
            ("default=9.0\nrange=[0.0, 1.0]\ntransform=\"log1p\"", "between log1p"),
            ("default=0.0\nrange=[0.0, 1.0]\ntransform={ clip = [1.0, 0.0] }", "lo <= hi"),
            ("default=5.0\nrange=[0.0, 9.0]\ntransform={ clip = [0.0, 1.0] }", "outside `clip`"),
            ("default=0.0\nrange=[0.0, 1.0]\ntransform={ bucketize = [] }", "at least one"),
            ("default=0.0\nrange=[0.0, 1.0]\ntransform={ bucketize = [0.5, 0.5] }", "strictly increasing"),
            ("default=0.5\nrange=[0.0, 1.0]\ntransform={ bucketize = [0.5] }", "bucket index"),
            ("default=3.0\nrange=[0.0, 1.0]\ntransform={ bucketize = [0.5] }", "bucket index"),
        ] {
            let err = FeatureRegistry::parse(&doc(&stored(extra))).unwrap_err();
            assert!(err.to_string().contains(why), "{extra}: {err}");
        }
        for extra in ["default=0.0\ntransform=\"sqrt\"", "default=0.0\nfreshness_sla=\"soon\""] {
            assert!(matches!(FeatureRegistry::parse(&doc(&stored(extra))), Err(RegistryError::Parse(_))), "{extra}");
        }
        let no_owner = stored("default=0.0").replace("owner=\"t\"", "owner=\" \"");
        assert!(FeatureRegistry::parse(&doc(&no_owner)).unwrap_err().to_string().contains("`owner`"));
        let request = "name=\"c\"\nentity=\"context\"\nsource=\"request\"\nattribute=\"device\"\nequals=\"mobile\"\n\
                       default=0.0\ndescription=\"\"\nowner=\"t\"\nfreshness_sla=\"1m\"\n";
        assert!(FeatureRegistry::parse(&doc(request)).unwrap_err().to_string().contains("stored features"));
        let sla = FeatureRegistry::parse(&doc(&stored("default=0.0\nfreshness_sla=\"24h\""))).unwrap();
        assert_eq!(sla.features[0].freshness_sla, Some(std::time::Duration::from_secs(86_400)));
    }

    const PLACEMENT: &str = "name=\"ctx_placement\"\nentity=\"context\"\nsource=\"request\"\nattribute=\"placement\"\n\
        type=\"categorical\"\nbuckets=64\ndefault=0.0\ndescription=\"\"\nowner=\"t\"\n";
    const CATEGORY: &str = "name=\"ad_category\"\nentity=\"ad\"\nsource=\"dynamodb\"\nattribute=\"category\"\n\
        type=\"categorical\"\nbuckets=1000\ndefault=0.0\ndescription=\"\"\nowner=\"t\"\n";
    const CROSS: &str = "name=\"placement_x_category\"\nentity=\"ad\"\nsource=\"cross\"\nattribute=\"-\"\n\
        type=\"categorical\"\ncross=[\"ctx_placement\", \"ad_category\"]\nbuckets=4096\ndefault=0.0\n\
        description=\"\"\nowner=\"t\"\n";
    const EMBEDDING: &str = "name=\"ad_embedding\"\nentity=\"ad\"\nsource=\"dynamodb\"\nattribute=\"embedding\"\n\
        type=\"embedding\"\ndim=4\ndefault=0.0\nrange=[-10.0, 10.0]\ndescription=\"\"\nowner=\"t\"\n";
    const DENSE: &str = "name=\"dense_one\"\nentity=\"ad\"\nsource=\"dynamodb\"\nattribute=\"x\"\ndefault=0.0\n\
        range=[0.0, 1.0]\ndescription=\"\"\nowner=\"t\"\n";

    fn typed(entries: &[&str]) -> Result<FeatureRegistry, RegistryError> {
        let rest: Vec<String> = entries.iter().map(|e| format!("[[feature]]\n{e}")).collect();
        FeatureRegistry::parse(&format!("{}{}", doc(DENSE), rest.join("")))
    }

    #[test]
    fn fnv1a64_is_the_published_function() {
        // The FNV test vectors (draft-eastlake-fnv); the trainer tests the same ones.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn typed_columns_are_kept_apart_in_registry_order() {
        let r = typed(&[PLACEMENT, CATEGORY, CROSS, EMBEDDING]).expect("valid");
        assert_eq!(r.names(), ["dense_one"]);
        let names = |fs: &[FeatureSpec]| fs.iter().map(|f| f.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&r.categorical), ["ctx_placement", "ad_category", "placement_x_category"]);
        assert_eq!(names(&r.embeddings), ["ad_embedding"]);
        let (placement, category, cross) = (&r.categorical[0], &r.categorical[1], &r.categorical[2]);
        assert_eq!((placement.category_id(None), placement.category_id(Some(""))), (0, 0));
        assert_eq!(placement.category_id(Some("feed_top")), (1 + fnv1a64(b"feed_top") % 63) as i64);
        assert!((1..1000).contains(&category.category_id(Some("travel"))));
        assert_eq!(
            cross.cross_id(Some("feed_top"), Some("travel")),
            (1 + fnv1a64(b"feed_top\x1ftravel") % 4095) as i64
        );
        assert_eq!(cross.cross_id(Some("feed_top"), None), 0);
        let e = &r.embeddings[0];
        assert!(e.accepts_embedding(&[0.5, -1.0, 2.0, 0.25]));
        assert!(!e.accepts_embedding(&[1.0, 2.0]));
        assert!(!e.accepts_embedding(&[0.0, 0.0, 0.0, f32::NAN]));
        assert!(!e.accepts_embedding(&[0.0, 0.0, 0.0, 11.0]));
    }

    #[test]
    fn the_registrys_categoricals_hash_to_the_pinned_ids() {
        // The same numbers are pinned in the trainer's tests
        // (training/tests/test_typed_features.py).
        let by = |name: &str| registry().categorical.iter().find(|f| f.name == name).expect(name);
        assert_eq!(by("ctx_placement_id").category_id(Some("feed_top")), 96);
        assert_eq!(by("ctx_device_id").category_id(Some("mobile")), 4);
        assert_eq!(by("ctx_surface_id").category_id(Some("home")), 80);
        assert_eq!(by("ctx_placement_x_device").cross_id(Some("feed_top"), Some("mobile")), 914);
        assert_eq!(by("ad_topic_id").category_id(Some("travel")), 32);
        assert_eq!(by("user_top_interest_id").category_id(Some("games")), 49);
        assert_eq!(by("user_interest_x_ad_topic").cross_id(Some("games"), Some("travel")), 493);
    }

    #[test]
    fn typed_mistakes_are_refused_with_the_reason() {
        let cross_self = CROSS.replace("[\"ctx_placement\", \"ad_category\"]", "[\"ad_category\", \"ad_category\"]");
        let cases: Vec<(Vec<String>, &str)> = vec![
            (vec![PLACEMENT.replace("buckets=64", "buckets=1")], "buckets"),
            (vec![PLACEMENT.replace("buckets=64\n", "")], "buckets"),
            (vec![PLACEMENT.replace("default=0.0", "default=3.0")], "must be 0"),
            (vec![PLACEMENT.replace("attribute=\"placement\"", "attribute=\"user_agent\"")], "request categoricals"),
            (vec![EMBEDDING.replace("dim=4", "dim=0")], "dim"),
            (vec![EMBEDDING.replace("source=\"dynamodb\"", "source=\"redis\"")], "stored features"),
            (
                vec![PLACEMENT.into(), CATEGORY.into(), CROSS.replace("entity=\"ad\"", "entity=\"context\"")],
                "has entity \"ad\"",
            ),
            (vec![PLACEMENT.into(), CROSS.replace("\"ad_category\"]", "\"missing\"]")], "defined above"),
            (vec![CATEGORY.into(), PLACEMENT.into(), cross_self], "two different"),
            (vec![PLACEMENT.replace("buckets=64", "buckets=64\ndim=3")], "`dim` is for embedding"),
        ];
        for (entries, why) in cases {
            let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
            let err = typed(&entries).unwrap_err();
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        let unknown = PLACEMENT.replace("type=\"categorical\"", "type=\"sparse\"");
        assert!(matches!(typed(&[&unknown]), Err(RegistryError::Parse(_))));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let f = "name=\"x\"\nentity=\"ad\"\nsource=\"redis\"\nattribute=\"clicks_1h\"\ndefault=0.0\ndescription=\"\"\nowner=\"t\"\ncolour=1\n";
        assert!(matches!(FeatureRegistry::parse(&doc(f)), Err(RegistryError::Parse(_))));
    }
}
