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

pub use assemble::{Assembled, SourceValues, assemble};

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
    /// Never used or logged for COPPA requests.
    #[serde(default)]
    pub personal: bool,
    /// Request features: indicator value to compare the field against.
    #[serde(default)]
    pub equals: Option<String>,
    /// Stored features: the values a store may hold, `[min, max]` inclusive
    /// (any finite value without it). See [`FeatureSpec::accepts`].
    #[serde(default)]
    pub range: Option<[f32; 2]>,
    /// What the feature means.
    pub description: String,
}

impl FeatureSpec {
    /// Whether a value read from a store may be served: finite, and inside
    /// `range` when one is declared. Anything else is served as the default
    /// and counted, so one corrupt stored value never reaches the ranker
    /// (which refuses a matrix holding NaN or infinity as a whole).
    pub fn accepts(&self, value: f32) -> bool {
        value.is_finite() && self.range.is_none_or(|[lo, hi]| lo <= value && value <= hi)
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
    /// Features in column order.
    #[serde(rename = "feature")]
    pub features: Vec<FeatureSpec>,
}

/// Why a registry document is invalid.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegistryError {
    /// Not valid TOML or not the registry's shape.
    #[error("feature registry: {0}")]
    Parse(String),
    /// Valid shape, inconsistent content.
    #[error("feature registry: feature {name:?}: {why}")]
    Invalid {
        /// The offending feature.
        name: String,
        /// What is wrong.
        why: String,
    },
}

impl FeatureRegistry {
    /// Parses and validates a registry document.
    pub fn parse(toml_text: &str) -> Result<Self, RegistryError> {
        let registry: Self = toml::from_str(toml_text).map_err(|e| RegistryError::Parse(e.to_string()))?;
        registry.validate()?;
        Ok(registry)
    }

    fn validate(&self) -> Result<(), RegistryError> {
        let mut seen = HashSet::new();
        for f in &self.features {
            let invalid = |why: &str| RegistryError::Invalid { name: f.name.clone(), why: why.to_string() };
            if f.name.is_empty() || !f.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                return Err(invalid("name must be non-empty snake_case"));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(invalid("name is defined twice"));
            }
            if !f.default.is_finite() {
                return Err(invalid("default must be finite"));
            }
            if let Some([lo, hi]) = f.range {
                if f.source == Source::Request {
                    return Err(invalid("`range` is for stored features; request features are 0 or 1"));
                }
                if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                    return Err(invalid("`range` must be [min, max] with finite min <= max"));
                }
                if !f.accepts(f.default) {
                    return Err(invalid("default lies outside `range`"));
                }
            }
            match (f.entity, f.source) {
                (Entity::Context, Source::Request) if f.equals.is_none() => {
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
            if f.entity == Entity::Ad && f.personal {
                return Err(invalid("ad features cannot be personal"));
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

    /// Feature names in column order.
    pub fn names(&self) -> Vec<&str> {
        self.features.iter().map(|f| f.name.as_str()).collect()
    }

    /// Default values in column order.
    pub fn defaults(&self) -> Vec<f32> {
        self.features.iter().map(|f| f.default).collect()
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
    fn personal_features_are_all_user_features() {
        for f in &registry().features {
            if f.personal {
                assert_eq!(f.entity, Entity::User, "{}", f.name);
            }
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
        let f = "name=\"x\"\nentity=\"ad\"\nsource=\"redis\"\nattribute=\"clicks_1h\"\ndefault=0.0\ndescription=\"\"\n";
        let text = format!("{}[[feature]]\n{f}", doc(f));
        let err = FeatureRegistry::parse(&text).unwrap_err();
        assert!(err.to_string().contains("defined twice"), "{err}");
    }

    #[test]
    fn request_feature_without_equals_is_rejected() {
        let f =
            "name=\"c\"\nentity=\"context\"\nsource=\"request\"\nattribute=\"device\"\ndefault=0.0\ndescription=\"\"\n";
        let err = FeatureRegistry::parse(&doc(f)).unwrap_err();
        assert!(err.to_string().contains("equals"), "{err}");
    }

    #[test]
    fn device_indicators_must_name_a_known_device() {
        let f = "name=\"c\"\nentity=\"context\"\nsource=\"request\"\nattribute=\"device\"\nequals=\"toaster\"\n\
                 default=0.0\ndescription=\"\"\n";
        let err = FeatureRegistry::parse(&doc(f)).unwrap_err();
        assert!(err.to_string().contains("[request].devices"), "{err}");
    }

    #[test]
    fn ranges_are_checked_at_load_and_bound_what_is_served() {
        let f = |range: &str, default: &str| {
            format!(
                "name=\"x\"\nentity=\"ad\"\nsource=\"redis\"\nattribute=\"clicks_1h\"\ndefault={default}\n\
                 range={range}\ndescription=\"\"\n"
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
        let f = "name=\"x\"\nentity=\"ad\"\nsource=\"redis\"\nattribute=\"views_1h\"\ndefault=0.0\ndescription=\"\"\n";
        let err = FeatureRegistry::parse(&doc(f)).unwrap_err();
        assert!(err.to_string().contains("not one the aggregator keeps"), "{err}");
        assert!(err.to_string().contains("impressions_5m"), "the message lists what is kept: {err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let f = "name=\"x\"\nentity=\"ad\"\nsource=\"redis\"\nattribute=\"clicks_1h\"\ndefault=0.0\ndescription=\"\"\ncolour=1\n";
        assert!(matches!(FeatureRegistry::parse(&doc(f)), Err(RegistryError::Parse(_))));
    }
}
