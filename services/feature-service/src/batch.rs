//! The batch tier: user and ad features materialised in DynamoDB.

use std::collections::{BTreeMap, HashMap};

use adserve_features::{Entity, FeatureRegistry, Source};
use aws_sdk_dynamodb::{
    Client,
    config::{BehaviorVersion, Credentials, Region, timeout::TimeoutConfig},
    error::DisplayErrorContext,
    types::{
        AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, KeysAndAttributes, PutRequest,
        ScalarAttributeType, WriteRequest,
    },
};
use aws_smithy_http_client::{Builder as HttpClientBuilder, tls};

use crate::config::{CredentialSource, DynamoConfig};

/// The AWS SDK's default credential chain (environment, profile, web identity
/// token as EKS IRSA provides it, ECS, IMDS), built on first use: building it
/// is async (it reads profile files), and the store is built synchronously.
/// The chain caches and refreshes what it resolves; the SDK caches it too.
#[derive(Debug)]
struct DefaultChain {
    region: Region,
    http: aws_sdk_dynamodb::config::SharedHttpClient,
    chain: tokio::sync::OnceCell<aws_config::default_provider::credentials::DefaultCredentialsChain>,
}

impl aws_credential_types::provider::ProvideCredentials for DefaultChain {
    fn provide_credentials<'a>(&'a self) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(async move {
            let chain = self
                .chain
                .get_or_init(|| async {
                    let config = aws_config::provider_config::ProviderConfig::without_region()
                        .with_region(Some(self.region.clone()))
                        .with_http_client(self.http.clone());
                    aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                        .region(self.region.clone())
                        .configure(config)
                        .build()
                        .await
                })
                .await;
            chain.provide_credentials().await
        })
    }
}

/// Partition key of the user table.
pub const USER_KEY: &str = "user_id";
/// Partition key of the ad table.
pub const AD_KEY: &str = "ad_id";
/// Key of the ad table's version item, bumped by every ad write.
pub const AD_VERSION_ID: &str = "__version__";
/// Its numeric attribute.
const AD_VERSION_ATTR: &str = "version";
/// DynamoDB's BatchGetItem limit.
const BATCH_GET_LIMIT: usize = 100;
/// DynamoDB's BatchWriteItem limit.
pub const BATCH_WRITE_LIMIT: usize = 25;
/// The item attribute holding when its values became true (epoch ms),
/// written by the backfill ([`crate::backfill`]).
pub const AS_OF_ATTR: &str = "as_of";

/// One item to write: the entity's id and its attributes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchRow {
    /// `user_id`, or `ad_id` as a decimal string.
    pub id: String,
    /// Numeric attribute values (dense features), stored as N; an attribute
    /// left out is absent from the item.
    pub values: HashMap<String, f32>,
    /// Raw categorical values, stored as S.
    pub text: HashMap<String, String>,
    /// Embeddings, stored as L of N.
    pub vectors: HashMap<String, Vec<f32>>,
    /// When the values became true (epoch ms), stored as [`AS_OF_ATTR`].
    pub as_of_ms: Option<i64>,
}

/// A DynamoDB failure, with the SDK's full context.
#[derive(Debug, thiserror::Error)]
#[error("dynamodb {op}: {message}")]
pub struct BatchError {
    /// Operation that failed.
    pub op: &'static str,
    /// SDK error with context.
    pub message: String,
}

fn err<E: std::error::Error>(op: &'static str) -> impl Fn(E) -> BatchError {
    move |e| BatchError { op, message: DisplayErrorContext(&e).to_string() }
}

/// One entity's batch values as read, and when they became true.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchItem {
    /// The registry's numeric attributes the item holds (NaN: present but
    /// not a finite number, served as the default and counted invalid).
    pub values: HashMap<String, f32>,
    /// Its categorical attributes (S), raw: hashed at assembly.
    pub text: HashMap<String, String>,
    /// Its embedding attributes (L of N), as stored: checked at assembly
    /// (an element that is not a number is NaN, a value of another type an
    /// empty vector, so either is refused whole and counted invalid).
    pub vectors: HashMap<String, Vec<f32>>,
    /// Its [`AS_OF_ATTR`] (epoch ms), when it has one: the feature-service
    /// holds it against the registry's `freshness_sla`.
    pub as_of_ms: Option<i64>,
}

/// What [`BatchStore::ads`] found.
#[derive(Debug, Default)]
pub struct AdLookup {
    /// The item of each ad that was found.
    pub items: HashMap<i64, BatchItem>,
    /// Ads whose chunk failed (absent from `items` whatever they hold).
    pub failed: usize,
    /// The first chunk's failure, when any failed.
    pub error: Option<BatchError>,
}

impl AdLookup {
    /// `Err` only when every chunk failed, for callers that treat the
    /// lookup as one call.
    pub fn into_result(self, asked: usize) -> Result<Self, BatchError> {
        match self.error {
            Some(e) if self.failed >= asked => Err(e),
            _ => Ok(self),
        }
    }
}

/// Reads (and, for seeding, writes) batch features.
#[derive(Debug, Clone)]
pub struct BatchStore {
    client: Client,
    user_table: String,
    ad_table: String,
    user_attrs: Wanted,
    ad_attrs: Wanted,
}

/// How a batch attribute is stored, from the registry's features on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Column {
    /// A dense feature's number (N).
    Number,
    /// A categorical feature's raw value (S).
    Text,
    /// An embedding of this many numbers (L of N).
    Vector(u32),
}

/// The batch attributes of `entity`'s features and how each is stored,
/// sorted by name: the one definition the store reads items by and the
/// backfill checks files against. Two features may read one attribute; the
/// first kind declared for it wins (dense, then categorical, then embedding).
pub(crate) fn stored_attributes(registry: &FeatureRegistry, entity: Entity) -> BTreeMap<String, Column> {
    let mut out = BTreeMap::new();
    let stored = |f: &&adserve_features::FeatureSpec| f.entity == entity && f.source == Source::Dynamodb;
    for f in registry.features.iter().filter(stored) {
        out.entry(f.attribute.clone()).or_insert(Column::Number);
    }
    for f in registry.categorical.iter().filter(stored) {
        out.entry(f.attribute.clone()).or_insert(Column::Text);
    }
    for f in registry.embeddings.iter().filter(stored) {
        out.entry(f.attribute.clone()).or_insert(Column::Vector(f.dim.unwrap_or(0)));
    }
    out
}

/// The attributes an entity's items are read for, by how they are stored.
#[derive(Debug, Clone, Default)]
struct Wanted {
    /// Dense features' (N).
    numbers: Vec<String>,
    /// Categorical features' (S).
    text: Vec<String>,
    /// Embeddings' (L of N).
    vectors: Vec<String>,
}

impl Wanted {
    /// What the registry's batch-tier features of `entity` read.
    fn of(registry: &FeatureRegistry, entity: Entity) -> Self {
        let mut wanted = Self::default();
        for (attribute, column) in stored_attributes(registry, entity) {
            match column {
                Column::Number => wanted.numbers.push(attribute),
                Column::Text => wanted.text.push(attribute),
                Column::Vector(_) => wanted.vectors.push(attribute),
            }
        }
        wanted
    }
}

impl BatchStore {
    /// A client for `config` with the registry's tables. Makes no request.
    pub fn new(config: &DynamoConfig, registry: &FeatureRegistry) -> Self {
        let http = HttpClientBuilder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let deadline = config.timeout;
        let region = Region::new(config.region.clone());
        let mut builder = aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http.clone())
            .region(region.clone())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(deadline)
                    .operation_attempt_timeout(deadline)
                    .operation_timeout(deadline * 2)
                    .build(),
            );
        builder = match config.credentials {
            CredentialSource::Static => builder.credentials_provider(Credentials::new(
                config.access_key_id.clone(),
                config.secret_access_key.clone(),
                None,
                None,
                "adserve-config",
            )),
            CredentialSource::DefaultChain => {
                builder.credentials_provider(DefaultChain { region, http, chain: tokio::sync::OnceCell::new() })
            }
        };
        if !config.endpoint.is_empty() {
            builder = builder.endpoint_url(config.endpoint.clone());
        }
        Self {
            client: Client::from_conf(builder.build()),
            user_table: registry.tables.user.clone(),
            ad_table: registry.tables.ad.clone(),
            user_attrs: Wanted::of(registry, Entity::User),
            ad_attrs: Wanted::of(registry, Entity::Ad),
        }
    }

    /// Batch attributes of one user; empty when the user is unknown.
    pub async fn user(&self, user_id: &str) -> Result<BatchItem, BatchError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.user_table)
            .key(USER_KEY, AttributeValue::S(user_id.to_string()))
            .send()
            .await
            .map_err(err("GetItem"))?;
        Ok(out.item().map(|item| item_of(item, &self.user_attrs)).unwrap_or_default())
    }

    /// Batch attributes of each known ad; unknown ads are absent. The ids go
    /// out in BatchGetItem chunks of 100, in parallel; a chunk that fails
    /// costs only its own ads (they are absent, and [`AdLookup::failed`]
    /// says how many), never the chunks that answered.
    pub async fn ads(&self, ad_ids: &[i64]) -> AdLookup {
        let chunks =
            ad_ids.chunks(BATCH_GET_LIMIT).map(|chunk| async move { (chunk.len(), self.ads_chunk(chunk).await) });
        let mut lookup = AdLookup { items: HashMap::with_capacity(ad_ids.len()), ..Default::default() };
        for (n, part) in futures::future::join_all(chunks).await {
            match part {
                Ok(items) => lookup.items.extend(items),
                Err(e) => {
                    lookup.failed += n;
                    lookup.error.get_or_insert(e);
                }
            }
        }
        lookup
    }

    async fn ads_chunk(&self, ad_ids: &[i64]) -> Result<HashMap<i64, BatchItem>, BatchError> {
        let mut unique: Vec<i64> = ad_ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let keys =
            unique.iter().map(|id| HashMap::from([(AD_KEY.to_string(), AttributeValue::S(id.to_string()))])).collect();
        let mut request = HashMap::from([(
            self.ad_table.clone(),
            KeysAndAttributes::builder().set_keys(Some(keys)).build().map_err(err("BatchGetItem"))?,
        )]);
        let mut out = HashMap::new();
        // Unprocessed keys (throttling) are retried after a jittered,
        // growing pause, a bounded number of times; the caller's deadline
        // bounds it too.
        let mut backoff = unprocessed_backoff();
        loop {
            let resp = self
                .client
                .batch_get_item()
                .set_request_items(Some(request))
                .send()
                .await
                .map_err(err("BatchGetItem"))?;
            for item in resp.responses().and_then(|r| r.get(&self.ad_table)).into_iter().flatten() {
                if let Some(id) = item.get(AD_KEY).and_then(|v| v.as_s().ok()).and_then(|s| s.parse().ok()) {
                    out.insert(id, item_of(item, &self.ad_attrs));
                }
            }
            match resp.unprocessed_keys() {
                Some(u) if !u.is_empty() => {
                    request = u.clone();
                    retry_after(&mut backoff, "BatchGetItem").await?;
                }
                _ => return Ok(out),
            }
        }
    }

    /// Creates both tables if they do not exist (idempotent).
    pub async fn ensure_tables(&self) -> Result<(), BatchError> {
        for (table, key) in [(&self.user_table, USER_KEY), (&self.ad_table, AD_KEY)] {
            let result = self
                .client
                .create_table()
                .table_name(table)
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(key)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .map_err(err("CreateTable"))?,
                )
                .key_schema(
                    KeySchemaElement::builder()
                        .attribute_name(key)
                        .key_type(KeyType::Hash)
                        .build()
                        .map_err(err("CreateTable"))?,
                )
                .billing_mode(BillingMode::PayPerRequest)
                .send()
                .await;
            if let Err(e) = result {
                let exists = e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception());
                if !exists {
                    return Err(err("CreateTable")(e));
                }
            }
        }
        Ok(())
    }

    /// Writes user feature rows (`user_id -> attribute -> value`).
    pub async fn put_users(&self, rows: &[(String, HashMap<String, f32>)]) -> Result<(), BatchError> {
        let rows: Vec<BatchRow> =
            rows.iter().map(|(id, m)| BatchRow { id: id.clone(), values: m.clone(), ..Default::default() }).collect();
        self.put_rows(Entity::User, &rows).await
    }

    /// Writes ad feature rows (`ad_id -> attribute -> value`), then bumps the
    /// table's version item, so every feature-service reloads its in-process
    /// copy ([`crate::AdTable`]). Writers that bypass this must bump it too
    /// ([`BatchStore::bump_ad_version`]) or wait for `ad_table.max_age`.
    pub async fn put_ads(&self, rows: &[(i64, HashMap<String, f32>)]) -> Result<(), BatchError> {
        let rows: Vec<BatchRow> = rows
            .iter()
            .map(|(id, m)| BatchRow { id: id.to_string(), values: m.clone(), ..Default::default() })
            .collect();
        self.put_ad_rows(&rows).await
    }

    /// Writes whole ad items (typed attributes too), then bumps the table's
    /// version item, as [`BatchStore::put_ads`] does.
    pub async fn put_ad_rows(&self, rows: &[BatchRow]) -> Result<(), BatchError> {
        self.put_rows(Entity::Ad, rows).await?;
        self.bump_ad_version().await
    }

    /// Adds one to the ad table's version item (`ad_id = "__version__"`).
    pub async fn bump_ad_version(&self) -> Result<(), BatchError> {
        self.client
            .update_item()
            .table_name(&self.ad_table)
            .key(AD_KEY, AttributeValue::S(AD_VERSION_ID.into()))
            .update_expression("ADD #v :one")
            .expression_attribute_names("#v", AD_VERSION_ATTR)
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .send()
            .await
            .map_err(err("UpdateItem"))?;
        Ok(())
    }

    /// The ad table's version item (0 when it does not exist yet).
    pub async fn ad_version(&self) -> Result<i64, BatchError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.ad_table)
            .key(AD_KEY, AttributeValue::S(AD_VERSION_ID.into()))
            .consistent_read(true)
            .send()
            .await
            .map_err(err("GetItem"))?;
        Ok(out
            .item()
            .and_then(|i| i.get(AD_VERSION_ATTR))
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    /// Every ad row of the table (a full Scan, page by page; the version
    /// item and rows whose id is not a number are skipped).
    pub async fn scan_ads(&self) -> Result<HashMap<i64, BatchItem>, BatchError> {
        let mut out = HashMap::new();
        let mut start = None;
        loop {
            let resp = self
                .client
                .scan()
                .table_name(&self.ad_table)
                // Consistent: the copy is labelled with the version read
                // before it, so it must hold every write before that bump.
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(err("Scan"))?;
            for item in resp.items() {
                if let Some(id) = item.get(AD_KEY).and_then(|v| v.as_s().ok()).and_then(|s| s.parse::<i64>().ok()) {
                    out.insert(id, item_of(item, &self.ad_attrs));
                }
            }
            match resp.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }

    /// Writes whole items (a put replaces the entity's item) in
    /// BatchWriteItem chunks, one after another, retrying unprocessed items
    /// with backoff. An ad writer must bump the version item afterwards
    /// ([`BatchStore::bump_ad_version`]). A value is written as the f32's
    /// shortest decimal, so it reads back as the same f32.
    pub async fn put_rows(&self, entity: Entity, rows: &[BatchRow]) -> Result<(), BatchError> {
        let (table, key) = match entity {
            Entity::User => (&self.user_table, USER_KEY),
            Entity::Ad => (&self.ad_table, AD_KEY),
            Entity::Context => {
                return Err(BatchError { op: "BatchWriteItem", message: "context features are not stored".into() });
            }
        };
        for chunk in rows.chunks(BATCH_WRITE_LIMIT) {
            let writes = chunk
                .iter()
                .map(|row| {
                    let mut item: HashMap<String, AttributeValue> =
                        row.values.iter().map(|(k, v)| (k.clone(), AttributeValue::N(v.to_string()))).collect();
                    item.extend(row.text.iter().map(|(k, v)| (k.clone(), AttributeValue::S(v.clone()))));
                    item.extend(row.vectors.iter().map(|(k, v)| {
                        (k.clone(), AttributeValue::L(v.iter().map(|x| AttributeValue::N(x.to_string())).collect()))
                    }));
                    item.insert(key.to_string(), AttributeValue::S(row.id.clone()));
                    if let Some(ms) = row.as_of_ms {
                        item.insert(AS_OF_ATTR.to_string(), AttributeValue::N(ms.to_string()));
                    }
                    let put = PutRequest::builder().set_item(Some(item)).build().map_err(err("BatchWriteItem"))?;
                    Ok(WriteRequest::builder().put_request(put).build())
                })
                .collect::<Result<Vec<_>, BatchError>>()?;
            let mut pending = HashMap::from([(table.to_string(), writes)]);
            let mut backoff = unprocessed_backoff();
            loop {
                let resp = self
                    .client
                    .batch_write_item()
                    .set_request_items(Some(pending))
                    .send()
                    .await
                    .map_err(err("BatchWriteItem"))?;
                match resp.unprocessed_items() {
                    Some(u) if !u.is_empty() => {
                        pending = u.clone();
                        retry_after(&mut backoff, "BatchWriteItem").await?;
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

/// Retries of a batch call's unprocessed keys: a pause of 10 ms doubling to
/// 500 ms, plus up to as much again in random jitter (AWS's advice for
/// throttled batches; so one pause is at most 1 s), at most 8 times.
pub const UNPROCESSED_RETRIES: usize = 8;

fn unprocessed_backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(10))
        .with_max_delay(std::time::Duration::from_millis(500))
        .with_max_times(UNPROCESSED_RETRIES)
        .with_jitter()
        .build()
}

/// Sleeps the next backoff step, or fails once the retries are spent.
async fn retry_after(backoff: &mut backon::ExponentialBackoff, op: &'static str) -> Result<(), BatchError> {
    match backoff.next() {
        Some(pause) => {
            metrics::counter!("adserve_feature_dynamodb_unprocessed_retries_total", "op" => op).increment(1);
            tokio::time::sleep(pause).await;
            Ok(())
        }
        None => Err(BatchError {
            op,
            message: format!("keys still unprocessed after {UNPROCESSED_RETRIES} retries (throttled)"),
        }),
    }
}

/// The registry's attributes of an item, and its [`AS_OF_ATTR`].
fn item_of(item: &HashMap<String, AttributeValue>, wanted: &Wanted) -> BatchItem {
    let as_of_ms = item.get(AS_OF_ATTR).and_then(|v| v.as_n().ok()).and_then(|n| n.parse::<i64>().ok());
    // A categorical value of another type than S is not a category: absent.
    let text = wanted.text.iter().filter_map(|a| Some((a.clone(), item.get(a)?.as_s().ok()?.clone()))).collect();
    let vectors = wanted
        .vectors
        .iter()
        .filter_map(|a| {
            let v = match item.get(a)? {
                AttributeValue::L(list) => {
                    list.iter().map(|x| x.as_n().ok().and_then(|n| n.parse::<f32>().ok()).unwrap_or(f32::NAN)).collect()
                }
                _ => Vec::new(),
            };
            Some((a.clone(), v))
        })
        .collect();
    BatchItem { values: numbers(item, &wanted.numbers), text, vectors, as_of_ms }
}

/// The wanted attributes an item holds. One that is present but not a
/// finite number (another type, an unparsable or overflowing N) comes back
/// as NaN, so assembly serves the default and counts it as invalid rather
/// than as missing.
fn numbers(item: &HashMap<String, AttributeValue>, wanted: &[String]) -> HashMap<String, f32> {
    wanted
        .iter()
        .filter_map(|a| {
            let v = item.get(a)?;
            let n = v.as_n().ok().and_then(|n| n.parse::<f32>().ok()).unwrap_or(f32::NAN);
            Some((a.clone(), n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error() -> BatchError {
        BatchError { op: "BatchGetItem", message: "throttled".into() }
    }

    #[test]
    fn a_lookup_fails_as_a_whole_only_when_every_chunk_failed() {
        let partial = AdLookup { items: HashMap::from([(1, BatchItem::default())]), failed: 100, error: Some(error()) };
        let kept = partial.into_result(150).expect("some chunks answered");
        assert_eq!((kept.items.len(), kept.failed), (1, 100));
        let all = AdLookup { failed: 150, error: Some(error()), ..Default::default() };
        assert_eq!(all.into_result(150).unwrap_err().message, "throttled");
        assert!(AdLookup::default().into_result(3).is_ok());
    }

    #[test]
    fn a_stored_attribute_that_is_not_a_finite_number_reads_as_nan_not_absent() {
        let wanted = ["a", "b", "c", "d"].map(String::from);
        let item = HashMap::from([
            ("a".to_string(), AttributeValue::N("0.25".into())),
            ("b".to_string(), AttributeValue::N("1e60".into())),
            ("c".to_string(), AttributeValue::S("high".into())),
        ]);
        let got = numbers(&item, &wanted);
        assert_eq!(got["a"], 0.25);
        assert!(got["b"].is_infinite() || got["b"].is_nan(), "{}", got["b"]);
        assert!(got["c"].is_nan());
        assert!(!got.contains_key("d"), "absent stays absent (missing, not invalid)");
    }

    #[test]
    fn categorical_values_are_strings_and_embeddings_lists_of_numbers() {
        let wanted = Wanted {
            numbers: vec!["n".into()],
            text: vec!["cat".into(), "cat_n".into(), "cat_absent".into()],
            vectors: vec!["vec".into(), "vec_bad".into(), "vec_scalar".into(), "vec_absent".into()],
        };
        let list = |xs: &[&str]| AttributeValue::L(xs.iter().map(|x| AttributeValue::N((*x).into())).collect());
        let item = HashMap::from([
            ("n".to_string(), AttributeValue::N("2".into())),
            ("cat".to_string(), AttributeValue::S("sports".into())),
            ("cat_n".to_string(), AttributeValue::N("7".into())),
            ("vec".to_string(), list(&["0.5", "-1", "3e-2"])),
            ("vec_bad".to_string(), list(&["0.5", "high"])),
            ("vec_scalar".to_string(), AttributeValue::N("0.5".into())),
            (AS_OF_ATTR.to_string(), AttributeValue::N("1700000000000".into())),
        ]);
        let got = item_of(&item, &wanted);
        assert_eq!(got.values, HashMap::from([("n".to_string(), 2.0)]));
        assert_eq!(got.text, HashMap::from([("cat".to_string(), "sports".to_string())]), "only S is a category");
        assert_eq!(got.vectors["vec"], [0.5, -1.0, 0.03]);
        assert!(got.vectors["vec_bad"][1].is_nan(), "an element that is not a number is refused at assembly");
        assert!(got.vectors["vec_scalar"].is_empty(), "another type: present but refused (wrong length)");
        assert!(!got.vectors.contains_key("vec_absent"));
        assert_eq!(got.as_of_ms, Some(1_700_000_000_000));
    }
}
