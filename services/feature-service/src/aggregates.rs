//! Streaming aggregates: the real-time tier's only writer.
//!
//! A consumer of the impressions and clicks topics (group
//! `aggregates.group_id`; in the feature-service process, or alone with
//! `mode = "aggregate"`) keeps, for every user and ad, impressions and clicks
//! over sliding 5-minute, 1-hour and 24-hour windows and a smoothed 24-hour
//! CTR, packed into one Redis string per entity (layout and script in
//! [`adserve_features::realtime`]).
//!
//! - **Event time.** An event counts in the buckets of its own time
//!   (`served_at`, `clicked_at`), not of when it was read. Windows are
//!   re-summed as time passes by a refresh schedule in Redis, so a count
//!   leaves its window without a new event.
//! - **Watermark.** Per partition, the newest event time read. An event more
//!   than `allowed_lateness` behind it is *late*: counted in
//!   `adserve_feature_aggregates_late_total` and still applied to the
//!   windows that hold it. An event older than every window (24 h) is
//!   *expired*: counted, not applied.
//! - **Exactly once in effect.** Offsets are committed only after Redis has
//!   the event; a redelivered event finds its dedup marker and changes
//!   nothing (marker, buckets, value and schedule change in one script).
//! - **Clicks** carry only their impression id. The impression's marker
//!   holds its user and ad; a click read before its impression waits (and
//!   the clicks partition commits no further than the oldest waiting click)
//!   until its impression is counted, or can no longer come
//!   ([`Loop::hopeless`]), and is then counted as unattributed.
//! - **Bids billed on notice** (OpenRTB, `billed_on_notice`) are not shown
//!   until the exchange's billing notice says so: the impression leaves its
//!   marker and counts nothing; its notice (on the clicks topic) counts it
//!   for its user and ad, in its user's frequency count, and charges a CPM
//!   winner's campaign the clearing price, on the notice's time. A notice is
//!   counted once per impression (its own marker), however often the
//!   exchange sends it; a bid never billed is never counted.
//! - **Bad input.** A message that does not decode goes to the dead-letter
//!   topic with the reason; the consumer goes on.
//! - **Redis down.** The consumer retries the event with backoff and commits
//!   nothing past it: the counters lag (see the freshness histogram), and
//!   nothing is lost.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use adserve_core::Lifecycle;
use adserve_events::{
    CLICKS_TOPIC, EventError, EventPublisher, IMPRESSIONS_TOPIC, KafkaConfig, decode_click, decode_impressions,
};
use adserve_features::{Entity, realtime};
use adserve_proto::v1::{ClickEvent, ImpressionEvent};
use fred::prelude::*;
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer as _},
};

use crate::config::AggregatesConfig;

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Counted in the windows that hold it.
    Counted,
    /// Already counted (a redelivery): nothing changed.
    Duplicate,
    /// Older than every window: not counted.
    Expired,
    /// A bid billed on notice: its marker is down, nothing is counted until
    /// its billing notice.
    Awaiting,
    /// A billing notice for an impression billed when served: ignored.
    NotExpected,
}

/// Who an impression was shown to and what a click on it is charged, as
/// its marker records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    /// The user (empty: COPPA or anonymous, no user counters).
    pub user_id: String,
    /// The ad.
    pub ad_id: i64,
    /// The ad's campaign (0: a marker written before markers carried it).
    pub campaign_id: i64,
    /// CPC price a click is charged; 0 for a CPM impression, and once the
    /// impression's click has been charged.
    pub price_cpc_micros: i64,
    /// When the impression was served (ms since the Unix epoch).
    pub served_ms: i64,
    /// A bid billed on notice: counted on its billing notice.
    pub on_notice: bool,
    /// Charged per impression (a CPM winner, or free): its billing notice
    /// charges the clearing price. A CPC winner is charged on its click.
    pub per_impression: bool,
    /// The marker layout it was read in (3 for new markers; 2 and 1 for
    /// markers an earlier version wrote): a charge rewrites the marker in
    /// the same layout, so the guard compares like with like.
    pub layout: u8,
}

impl Attribution {
    /// The marker value: `v3|ad|campaign|price|served_ms|flags|user` (the
    /// user last: it may hold `|`; flags: 1 on notice, 2 per impression).
    fn encode(&self) -> String {
        let (ad, campaign, price, served, user) =
            (self.ad_id, self.campaign_id, self.price_cpc_micros, self.served_ms, &self.user_id);
        match self.layout {
            1 => format!("{ad}|{user}"),
            2 => format!("v2|{ad}|{campaign}|{price}|{served}|{user}"),
            _ => {
                let flags = u8::from(self.on_notice) | (u8::from(self.per_impression) << 1);
                format!("v3|{ad}|{campaign}|{price}|{served}|{flags}|{user}")
            }
        }
    }

    fn decode(value: &str) -> Option<Self> {
        for (prefix, numbers) in [("v3|", 5), ("v2|", 4)] {
            let Some(rest) = value.strip_prefix(prefix) else { continue };
            let mut parts = rest.splitn(numbers + 1, '|');
            let mut number = || parts.next()?.parse::<i64>().ok();
            let (ad_id, campaign_id, price_cpc_micros, served_ms) = (number()?, number()?, number()?, number()?);
            // v2 markers were written before bids were billed on notice.
            let flags = if numbers == 5 { number()? } else { 0 };
            let user_id = parts.next()?.to_string();
            return Some(Self {
                user_id,
                ad_id,
                campaign_id,
                price_cpc_micros,
                served_ms,
                on_notice: flags & 1 != 0,
                per_impression: flags & 2 != 0,
                layout: if numbers == 5 { 3 } else { 2 },
            });
        }
        // Written before markers carried the charge (`ad|user`): counted,
        // never charged.
        let (ad, user) = value.split_once('|')?;
        Some(Self {
            user_id: user.to_string(),
            ad_id: ad.parse().ok()?,
            campaign_id: 0,
            price_cpc_micros: 0,
            served_ms: 0,
            on_notice: false,
            per_impression: false,
            layout: 1,
        })
    }

    /// The entities an event on this impression counts for: its ad, and its
    /// user unless anonymous.
    fn entities(&self) -> Vec<(Entity, String)> {
        let mut entities = vec![(Entity::Ad, self.ad_id.to_string())];
        if !self.user_id.is_empty() {
            entities.push((Entity::User, self.user_id.clone()));
        }
        entities
    }

    /// The marker once its click has been charged.
    fn charged(&self) -> Self {
        Self { price_cpc_micros: 0, ..self.clone() }
    }
}

/// A bid's shown marker (`realtime::billing_marker`) once its notice has
/// counted it and charged its clearing price (markers written before clicks
/// could count a bid hold this too).
const SHOWN_AND_BILLED: &str = "1";
/// A bid's shown marker once a click has counted it: its notice still
/// charges the clearing price, and then marks it [`SHOWN_AND_BILLED`].
const SHOWN_BY_CLICK: &str = "c";

/// One run of the apply script.
struct Call<'a> {
    /// Dedup marker key, its value and TTL (key `""`: none).
    marker: (&'a str, &'a str, Duration),
    /// Bucket fields to add 1 to, per entity.
    fields: &'a [String],
    entities: &'a [(Entity, String)],
    /// Guard key, the value it must hold and the value it then gets.
    guard: Option<(String, String, String)>,
    increments: Vec<adserve_counters::Increment>,
}

/// Applies events to the real-time tier (one script call each).
#[derive(Clone)]
pub struct Aggregator {
    client: Client,
    sha: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    prefix: String,
    value_ttl: Duration,
    attribution_ttl: Duration,
    /// A click is charged when `clicked_at <= served_at + window` (the label
    /// window: what the joiner labels a click is what is paid for).
    charge_window_ms: i64,
    /// Tail of every script call: prior CTR, prior weight.
    tail: Vec<String>,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch of a protobuf timestamp.
fn seconds(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds)
}

/// Milliseconds since the Unix epoch of a protobuf timestamp.
fn millis(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn unix_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Aggregator {
    /// An aggregator writing keys under `prefix` (the registry's
    /// `[redis].key_prefix`) over `client`.
    pub fn new(client: Client, prefix: &str, config: &AggregatesConfig) -> Self {
        let tail = vec![realtime::PRIOR_CTR.to_string(), realtime::PRIOR_WEIGHT.to_string()];
        Self {
            client,
            sha: Default::default(),
            prefix: prefix.to_string(),
            value_ttl: config.value_ttl,
            attribution_ttl: config.attribution_ttl,
            charge_window_ms: adserve_features::registry().label.window().as_millis() as i64,
            tail,
        }
    }

    /// Runs the apply script (loading it first, and again after a Redis
    /// restart forgot it).
    async fn script(&self, keys: Vec<String>, args: Vec<String>) -> Result<i64, Error> {
        for _ in 0..2 {
            let cached = self.sha.lock().map_or(None, |s| s.clone());
            let sha = match cached {
                Some(sha) => sha,
                None => {
                    let sha: String = self.client.script_load(realtime::APPLY_SCRIPT).await?;
                    if let Ok(mut s) = self.sha.lock() {
                        *s = Some(sha.clone());
                    }
                    sha
                }
            };
            match self.client.evalsha::<i64, _, _, _>(sha, keys.clone(), args.clone()).await {
                Err(e) if e.details().starts_with("NOSCRIPT") => {
                    if let Ok(mut s) = self.sha.lock() {
                        *s = None;
                    }
                }
                result => return result,
            }
        }
        Err(Error::new(ErrorKind::Unknown, "apply script not loaded after two tries"))
    }

    /// Adds 1 to `counter` (index into [`realtime::COUNTERS`]) at `event_s`
    /// for each entity, and applies the call's increments, guarded by its
    /// marker, as of `now_s`: the script's answer ([`Aggregator::run`]), or
    /// None when the event is older than every window (nothing is applied).
    async fn apply(&self, counter: usize, event_s: i64, call: Call<'_>, now_s: i64) -> Result<Option<i64>, Error> {
        let fields = realtime::bucket_fields(counter, event_s.min(now_s), now_s);
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.run(Call { fields: &fields, ..call }, now_s).await?))
    }

    /// Runs the script; its answer (0 duplicate, 1 counted, 2 counted and
    /// increments applied).
    async fn run(&self, call: Call<'_>, now_s: i64) -> Result<i64, Error> {
        let (marker, marker_value, marker_ttl) = call.marker;
        let (guard, expected, replacement) = call.guard.unwrap_or_default();
        let mut keys = vec![marker.to_string(), realtime::refresh_key(&self.prefix), guard];
        for (entity, id) in call.entities {
            keys.push(realtime::buckets_key(&self.prefix, *entity, id));
            keys.push(realtime::value_key(&self.prefix, *entity, id));
        }
        let mut args = vec![
            now_s.to_string(),
            self.value_ttl.as_secs().max(1).to_string(),
            marker_value.to_string(),
            marker_ttl.as_secs().max(1).to_string(),
            call.fields.len().to_string(),
            call.entities.len().to_string(),
            expected,
            replacement,
        ];
        args.extend(call.fields.iter().cloned());
        args.extend(call.entities.iter().map(|(e, id)| realtime::member(*e, id)));
        args.extend(self.tail.iter().cloned());
        for inc in call.increments {
            keys.push(inc.key);
            args.extend([inc.field, inc.amount.to_string(), adserve_counters::DAY_KEY_TTL_SECONDS.to_string()]);
        }
        self.script(keys, args).await
    }

    /// Counts an impression for its user (unless COPPA or anonymous) and
    /// its ad, adds it to the user's frequency count of its campaign and a
    /// CPM winner's price to its campaign's spend (on the day it was
    /// served), and leaves its marker for dedup and for its clicks. A bid
    /// billed on notice only leaves its marker ([`Aggregator::billing`]
    /// counts it).
    pub async fn impression(&self, e: &ImpressionEvent, now_s: i64) -> Result<Applied, Error> {
        let user = if e.coppa { String::new() } else { e.user_id.clone() };
        let served_ms = millis(e.served_at.as_ref());
        let attribution = Attribution {
            user_id: user.clone(),
            ad_id: e.ad_id,
            campaign_id: e.campaign_id,
            price_cpc_micros: e.price_cpc_micros.max(0),
            served_ms,
            on_notice: e.billed_on_notice,
            per_impression: e.price_cpc_micros <= 0,
            layout: 3,
        };
        let marker = realtime::impression_marker(&self.prefix, &e.impression_id);
        let event_s = seconds(e.served_at.as_ref());
        let day = adserve_counters::day_of(event_s.max(0) as u64);
        let (entities, increments) = if e.billed_on_notice {
            (Vec::new(), Vec::new())
        } else {
            (attribution.entities(), adserve_counters::on_impression(day, &user, e.campaign_id, e.price_cpm_micros))
        };
        Ok(
            match self.count_impression((&marker, &attribution.encode()), &entities, increments, event_s, now_s).await?
            {
                Applied::Counted if e.billed_on_notice => Applied::Awaiting,
                applied => applied,
            },
        )
    }

    /// Counts a bid's billing notice as its impression: for the user and ad
    /// it is attributed to, in the user's frequency count of its campaign,
    /// and, for a bid charged per impression, the clearing price to its
    /// campaign's spend, all on the notice's time. Once per impression (its
    /// shown marker), whatever its `click_id`: an exchange may send a
    /// notice twice. If a click came first it has counted the impression
    /// ([`Aggregator::click`]); the notice then only charges, once. A notice
    /// for an impression billed when served changes nothing.
    pub async fn billing(&self, n: &ClickEvent, to: &Attribution, now_s: i64) -> Result<Applied, Error> {
        if !to.on_notice {
            return Ok(Applied::NotExpected);
        }
        let event_s = seconds(n.clicked_at.as_ref());
        let day = adserve_counters::day_of(event_s.max(0) as u64);
        let charge = if to.per_impression { n.price_cpm_micros.max(0) } else { 0 };
        let increments = adserve_counters::on_impression(day, &to.user_id, to.campaign_id, charge);
        let marker = realtime::billing_marker(&self.prefix, &n.impression_id);
        let applied =
            self.count_impression((&marker, SHOWN_AND_BILLED), &to.entities(), increments, event_s, now_s).await?;
        let spend = adserve_counters::on_impression(day, "", to.campaign_id, charge);
        if applied != Applied::Duplicate || spend.is_empty() {
            return Ok(applied);
        }
        // Shown already: charge the price once, if a click (not a notice) counted it.
        let guard = (marker, SHOWN_BY_CLICK.to_string(), SHOWN_AND_BILLED.to_string());
        let call = Call {
            marker: ("", "", Duration::from_secs(1)),
            fields: &[],
            entities: &[],
            guard: Some(guard),
            increments: spend,
        };
        Ok(if self.run(call, now_s).await? == 2 { Applied::Counted } else { Applied::Duplicate })
    }

    /// Counts a bid billed on notice as shown on its click, which proves it
    /// (the exchange's notice may come later, or never): for its user and
    /// ad, and in the user's frequency count, on the click's time, once per
    /// impression (the shown marker it shares with the notice). The clearing
    /// price stays for the notice to charge.
    async fn shown_by_click(&self, c: &ClickEvent, to: &Attribution, now_s: i64) -> Result<Applied, Error> {
        let event_s = seconds(c.clicked_at.as_ref());
        let day = adserve_counters::day_of(event_s.max(0) as u64);
        let increments = adserve_counters::on_impression(day, &to.user_id, to.campaign_id, 0);
        let marker = realtime::billing_marker(&self.prefix, &c.impression_id);
        self.count_impression((&marker, SHOWN_BY_CLICK), &to.entities(), increments, event_s, now_s).await
    }

    /// Counts one impression at `event_s` for `entities` with `increments`,
    /// once per `marker` (key, value).
    async fn count_impression(
        &self,
        (marker, value): (&str, &str),
        entities: &[(Entity, String)],
        increments: Vec<adserve_counters::Increment>,
        event_s: i64,
        now_s: i64,
    ) -> Result<Applied, Error> {
        let call =
            Call { marker: (marker, value, self.attribution_ttl), fields: &[], entities, guard: None, increments };
        Ok(match self.apply(0, event_s, call, now_s).await? {
            None => Applied::Expired,
            Some(0) => Applied::Duplicate,
            Some(_) => Applied::Counted,
        })
    }

    /// Who each impression was shown to (None: not counted yet, or its
    /// marker expired), in one MGET.
    pub async fn attributions(&self, impression_ids: &[&str]) -> Result<Vec<Option<Attribution>>, Error> {
        if impression_ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = impression_ids.iter().map(|id| realtime::impression_marker(&self.prefix, id)).collect();
        let values: Vec<Option<String>> = self.client.mget(keys).await?;
        Ok(values.into_iter().map(|v| v.as_deref().and_then(Attribution::decode)).collect())
    }

    /// Counts a click for the user and ad it is attributed to, and charges
    /// a CPC impression's price to its campaign's spend (on the day of the
    /// click) when this is the first click on it within the label window:
    /// the charge clears the price in the impression's marker, so a second
    /// click, or a redelivered one, pays nothing. Returns what was counted
    /// and whether it was charged.
    ///
    /// A click inside the label window on a bid billed on notice first
    /// counts its impression, if its notice has not: the label-joiner makes
    /// such a bid a training row on its click, so the counters must see the
    /// impression too, or the real-time CTR would count a click without it.
    pub async fn click(&self, c: &ClickEvent, to: &Attribution, now_s: i64) -> Result<(Applied, bool), Error> {
        let in_window = millis(c.clicked_at.as_ref()) <= to.served_ms.saturating_add(self.charge_window_ms);
        if to.on_notice && in_window {
            self.shown_by_click(c, to, now_s).await?;
        }
        let event_s = seconds(c.clicked_at.as_ref());
        // A click without an id is deduplicated on its impression and time.
        let id = if c.click_id.is_empty() {
            format!(
                "{}@{}",
                c.impression_id,
                c.clicked_at.as_ref().map_or(0, |t| t.seconds * 1_000_000_000 + i64::from(t.nanos))
            )
        } else {
            c.click_id.clone()
        };
        let marker = realtime::click_marker(&self.prefix, &id);
        let entities = to.entities();
        let chargeable = to.price_cpc_micros > 0 && to.campaign_id > 0 && in_window;
        let (guard, increments) = if chargeable {
            let day = adserve_counters::day_of(event_s.max(0) as u64);
            let guard =
                (realtime::impression_marker(&self.prefix, &c.impression_id), to.encode(), to.charged().encode());
            (Some(guard), adserve_counters::on_charged_click(day, to.campaign_id, to.price_cpc_micros))
        } else {
            (None, Vec::new())
        };
        let call =
            Call { marker: (&marker, "1", self.attribution_ttl), fields: &[], entities: &entities, guard, increments };
        Ok(match self.apply(1, event_s, call, now_s).await? {
            None => (Applied::Expired, false),
            Some(0) => (Applied::Duplicate, false),
            Some(2) => (Applied::Counted, chargeable),
            Some(_) => (Applied::Counted, false),
        })
    }

    /// Reports how far each partition has been applied: `(topic/partition,
    /// unix ms)` into [`realtime::progress_key`], which the feature-service
    /// holds against the registry's `freshness_sla`.
    pub async fn report_progress(&self, entries: Vec<(String, i64)>) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let key = realtime::progress_key(&self.prefix);
        let values: Vec<(String, String)> = entries.into_iter().map(|(k, v)| (k, v.to_string())).collect();
        let _: i64 = self.client.hset(&key, values).await?;
        let _: bool = self.client.expire(&key, PROGRESS_TTL.as_secs() as i64, None).await?;
        Ok(())
    }

    /// Applies a click or a billing notice (what the clicks topic carries)
    /// to the impression it is attributed to: what was counted, and whether
    /// a click was charged.
    pub async fn outcome(&self, c: &ClickEvent, to: &Attribution, now_s: i64) -> Result<(Applied, bool), Error> {
        if c.billing_notice { Ok((self.billing(c, to, now_s).await?, false)) } else { self.click(c, to, now_s).await }
    }

    /// Re-sums up to `limit` entities whose windows moved by `now_s`;
    /// returns how many. Safe to run from several processes at once.
    pub async fn refresh_due(&self, now_s: i64, limit: usize) -> Result<usize, Error> {
        let due: Vec<String> = self
            .client
            .zrangebyscore(realtime::refresh_key(&self.prefix), "-inf", now_s as f64, false, Some((0, limit as i64)))
            .await?;
        // Concurrent scripts on the one connection, as for events.
        let resums = due.iter().map(|member| async move {
            match realtime::parse_member(member) {
                Some((entity, id)) => {
                    let entities = [(entity, id.to_string())];
                    let call = Call {
                        marker: ("", "", Duration::from_secs(1)),
                        fields: &[],
                        entities: &entities,
                        guard: None,
                        increments: Vec::new(),
                    };
                    self.run(call, now_s).await?;
                    Ok::<usize, Error>(1)
                }
                None => {
                    let _: i64 = self.client.zrem(realtime::refresh_key(&self.prefix), member.as_str()).await?;
                    Ok(0)
                }
            }
        });
        let done: Vec<usize> = futures::future::try_join_all(resums).await?;
        Ok(done.into_iter().sum())
    }
}

/// Why the consumer loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The consumer failed.
    #[error("kafka consumer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The consumer could not be made.
    #[error("{0}")]
    Events(#[from] EventError),
    /// A refused message could not be dead-lettered.
    #[error("dead-letter topic unavailable: {0}")]
    DeadLetter(EventError),
}

/// Counts a click that charged its impression's campaign.
fn observe_charge(click: &ClickEvent, charged: bool) {
    if charged {
        tracing::debug!(impression_id = %click.impression_id, "click charged");
        metrics::counter!("adserve_feature_aggregates_clicks_charged_total").increment(1);
    }
}

/// Counts a click whose impression was never counted.
fn count_unattributed(click: &ClickEvent) {
    tracing::debug!(impression_id = %click.impression_id, "click never matched a counted impression");
    metrics::counter!("adserve_feature_aggregates_events_total", "topic" => CLICKS_TOPIC, "outcome" => "unattributed")
        .increment(1);
}

/// How long the progress hash outlives its last report (an entry of a
/// partition nobody owns any more ages, as it should, until then).
const PROGRESS_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Most messages applied in one batch.
const BATCH: usize = 256;

/// One message of the two topics, owned.
struct Read {
    topic: &'static str,
    partition: i32,
    offset: i64,
    key: Vec<u8>,
    payload: Vec<u8>,
    /// Its `adserve-payload` header (an impression batch).
    payload_type: Option<String>,
}

impl Read {
    fn of<M: rdkafka::Message>(m: &M) -> Option<Self> {
        Some(Self {
            topic: topic_of(m.topic())?,
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().unwrap_or_default().to_vec(),
            payload: m.payload().unwrap_or_default().to_vec(),
            payload_type: adserve_events::payload_type(m.headers()).map(str::to_owned),
        })
    }
}

/// A click read before its impression was counted.
#[derive(Debug)]
struct Waiting {
    partition: i32,
    offset: i64,
    click: ClickEvent,
    since: Instant,
}

/// The consumer loop's state.
struct Loop<'a> {
    config: &'a AggregatesConfig,
    aggregator: &'a Aggregator,
    publisher: &'a EventPublisher,
    lifecycle: &'a Lifecycle,
    /// Newest event time read per (topic, partition), unix milliseconds.
    watermarks: HashMap<(&'static str, i32), i64>,
    /// Next offset to commit per (topic, partition), waiting clicks aside.
    next: HashMap<(&'static str, i32), i64>,
    waiting: VecDeque<Waiting>,
}

fn topic_of(name: &str) -> Option<&'static str> {
    [IMPRESSIONS_TOPIC, CLICKS_TOPIC].into_iter().find(|t| *t == name)
}

impl Loop<'_> {
    /// Retries a Redis call until it succeeds or the process stops (None).
    async fn patiently<T, F, Fut>(&self, what: &'static str, mut call: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let mut delay = Duration::from_millis(50);
        loop {
            match call().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    metrics::counter!("adserve_feature_aggregates_redis_errors_total", "op" => what).increment(1);
                    tracing::warn!(error = %e, op = what, retry_in_ms = delay.as_millis() as u64, "redis write failed; retrying (nothing is committed past it)");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.lifecycle.shutdown.wait() => return None,
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    fn observe(&mut self, topic: &'static str, partition: i32, event_ms: i64, outcome: Applied) {
        let newest = self.watermarks.entry((topic, partition)).or_insert(event_ms);
        if event_ms < *newest - self.config.allowed_lateness.as_millis() as i64 {
            metrics::counter!("adserve_feature_aggregates_late_total", "topic" => topic).increment(1);
        }
        *newest = (*newest).max(event_ms);
        let outcome = match outcome {
            Applied::Counted => {
                // Event time to visible in Redis (the script has returned).
                metrics::histogram!("adserve_feature_aggregates_freshness_seconds", "topic" => topic)
                    .record((unix_now_ms() - event_ms).max(0) as f64 / 1000.0);
                "counted"
            }
            Applied::Duplicate => "duplicate",
            Applied::Expired => "expired",
            Applied::Awaiting => "awaiting_notice",
            Applied::NotExpected => "notice_not_expected",
        };
        metrics::counter!("adserve_feature_aggregates_events_total", "topic" => topic, "outcome" => outcome)
            .increment(1);
    }

    /// Applies a batch of messages; false when the process is stopping (the
    /// batch is then not marked done, and is read again after a restart).
    ///
    /// The batch's scripts run concurrently on the one connection (fred
    /// pipelines them): per event they are atomic and idempotent, and counts
    /// commute, so their order does not matter. Impressions go first, so a
    /// click in the same batch finds its impression's marker.
    async fn handle_batch(&mut self, batch: Vec<Read>) -> Result<bool, RunError> {
        let now_s = unix_now();
        let mut impressions = Vec::new();
        let mut clicks = Vec::new();
        for r in &batch {
            let decoded = if r.topic == IMPRESSIONS_TOPIC {
                decode_impressions(&r.payload, r.payload_type.as_deref()).map(Event::Impressions)
            } else {
                decode_click(&r.payload).map(Event::Click)
            };
            match decoded {
                Err(reason) => {
                    let source = format!("{}/{}/{}", r.topic, r.partition, r.offset);
                    tracing::warn!(%source, %reason, "refused message; dead-lettering");
                    let refused = adserve_events::Refused {
                        source: &source,
                        key: &r.key,
                        payload: &r.payload,
                        payload_type: r.payload_type.as_deref(),
                        reason: &reason.to_string(),
                    };
                    self.publisher.dead_letter_patiently(&refused).await.map_err(RunError::DeadLetter)?;
                    metrics::counter!("adserve_feature_aggregates_events_total", "topic" => r.topic, "outcome" => "dead_lettered")
                        .increment(1);
                }
                // Every impression of a multi-slot answer counts, each once.
                Ok(Event::Impressions(es)) => impressions.extend(es.into_iter().map(|e| (r.partition, e))),
                Ok(Event::Click(c)) => clicks.push((r.partition, r.offset, c)),
            }
        }
        let aggregator = self.aggregator;
        let this = &*self;
        let applied = futures::future::join_all(
            impressions.iter().map(|(_, e)| this.patiently("impression", move || aggregator.impression(e, now_s))),
        )
        .await;
        for ((partition, e), applied) in impressions.iter().zip(applied) {
            let Some(applied) = applied else { return Ok(false) };
            self.observe(IMPRESSIONS_TOPIC, *partition, millis(e.served_at.as_ref()), applied);
        }
        if !clicks.is_empty() {
            let ids: Vec<&str> = clicks.iter().map(|(_, _, c)| c.impression_id.as_str()).collect();
            let Some(found) = self.patiently("attribution", || aggregator.attributions(&ids)).await else {
                return Ok(false);
            };
            let this = &*self;
            let applied = futures::future::join_all(clicks.iter().zip(&found).map(|((_, _, c), to)| async move {
                match to {
                    Some(to) => this.patiently("click", || aggregator.outcome(c, to, now_s)).await.map(Some),
                    None => Some(None),
                }
            }))
            .await;
            for ((partition, offset, click), applied) in clicks.into_iter().zip(applied) {
                match applied {
                    None => return Ok(false),
                    Some(Some((applied, charged))) => {
                        self.observe(CLICKS_TOPIC, partition, millis(click.clicked_at.as_ref()), applied);
                        observe_charge(&click, charged);
                    }
                    Some(None) => {
                        if self.waiting.len() >= self.config.max_waiting_clicks {
                            self.give_up_oldest();
                        }
                        self.waiting.push_back(Waiting { partition, offset, click, since: Instant::now() });
                    }
                }
            }
        }
        for r in &batch {
            self.next.insert((r.topic, r.partition), r.offset + 1);
        }
        Ok(true)
    }

    fn give_up_oldest(&mut self) {
        if let Some(w) = self.waiting.pop_front() {
            count_unattributed(&w.click);
        }
    }

    /// Whether a waiting click's impression can no longer come: the
    /// impressions of its partition (co-partitioned by impression id) have
    /// been read past its time plus the allowed lateness, or they are read
    /// to their end and the click has waited `click_wait`. Wall time alone
    /// is not enough: while the consumer works through a backlog its clicks
    /// run ahead of their impressions by as long as the backlog takes.
    fn hopeless(&self, w: &Waiting, caught_up: &std::collections::HashSet<i32>) -> bool {
        let newest = self.watermarks.get(&(IMPRESSIONS_TOPIC, w.partition)).copied();
        let clicked = millis(w.click.clicked_at.as_ref());
        newest.is_some_and(|t| t > clicked + self.config.allowed_lateness.as_millis() as i64)
            || (w.since.elapsed() >= self.config.click_wait && caught_up.contains(&w.partition))
    }

    /// Counts waiting clicks whose impression has been counted since, and
    /// gives up on those whose impression can no longer come ([`Loop::hopeless`];
    /// `caught_up`: impressions partitions read to their end). False when
    /// stopping.
    async fn retry_waiting(&mut self, caught_up: &std::collections::HashSet<i32>) -> bool {
        if self.waiting.is_empty() {
            return true;
        }
        let aggregator = self.aggregator;
        let mut still = VecDeque::with_capacity(self.waiting.len());
        let waiting: Vec<Waiting> = self.waiting.drain(..).collect();
        for chunk in waiting.chunks(500) {
            let ids: Vec<&str> = chunk.iter().map(|w| w.click.impression_id.as_str()).collect();
            let Some(found) = self.patiently("attribution", || aggregator.attributions(&ids)).await else {
                return false;
            };
            for (w, to) in chunk.iter().zip(found) {
                let now_s = unix_now();
                match to {
                    Some(to) => {
                        let Some((applied, charged)) =
                            self.patiently("click", || aggregator.outcome(&w.click, &to, now_s)).await
                        else {
                            return false;
                        };
                        self.observe(CLICKS_TOPIC, w.partition, millis(w.click.clicked_at.as_ref()), applied);
                        observe_charge(&w.click, charged);
                    }
                    None if self.hopeless(w, caught_up) => count_unattributed(&w.click),
                    None => still.push_back(Waiting {
                        partition: w.partition,
                        offset: w.offset,
                        click: w.click.clone(),
                        since: w.since,
                    }),
                }
            }
        }
        self.waiting = still;
        metrics::gauge!("adserve_feature_aggregates_waiting_clicks").set(self.waiting.len() as f64);
        true
    }

    /// The impressions partitions this consumer has read to their end (as of
    /// its last fetch).
    fn impressions_caught_up<C: rdkafka::consumer::ConsumerContext>(
        &self,
        consumer: &rdkafka::consumer::StreamConsumer<C>,
    ) -> std::collections::HashSet<i32> {
        let Ok(assigned) = consumer.assignment() else { return Default::default() };
        assigned
            .elements()
            .iter()
            .filter(|e| e.topic() == IMPRESSIONS_TOPIC && self.read_to_end(consumer, IMPRESSIONS_TOPIC, e.partition()))
            .map(|e| e.partition())
            .collect()
    }

    /// Whether this consumer has read `topic`/`partition` to its end, as of
    /// its last fetch.
    fn read_to_end<C: rdkafka::consumer::ConsumerContext>(
        &self,
        consumer: &rdkafka::consumer::StreamConsumer<C>,
        topic: &'static str,
        partition: i32,
    ) -> bool {
        adserve_events::cached_watermarks(consumer.client(), topic, partition)
            .is_some_and(|(low, high)| high <= self.next.get(&(topic, partition)).copied().unwrap_or(low))
    }

    /// Per partition this consumer owns, the event time it has applied
    /// through: the wall clock when it has read the partition to its end,
    /// else the newest event time applied from it (a partition is left out
    /// only while neither is known).
    ///
    /// A partition nothing has been read from since this consumer got it
    /// (restarted on a quiet partition whose committed offset is its end)
    /// must still report, or the entry its previous owner left would freeze
    /// and the tier would read as stale until an event came: its committed
    /// offset is asked once (a short broker call) and taken as its next
    /// offset.
    fn progress<C: rdkafka::consumer::ConsumerContext>(
        &mut self,
        consumer: &rdkafka::consumer::StreamConsumer<C>,
    ) -> Vec<(String, i64)> {
        let Ok(assigned) = consumer.assignment() else { return Vec::new() };
        let mut unknown = TopicPartitionList::new();
        for e in assigned.elements() {
            if let Some(topic) = topic_of(e.topic())
                && !self.next.contains_key(&(topic, e.partition()))
            {
                unknown.add_partition(topic, e.partition());
            }
        }
        if unknown.count() > 0 {
            match consumer.committed_offsets(unknown, Duration::from_millis(500)) {
                Ok(committed) => {
                    for e in committed.elements() {
                        if let (Some(topic), Offset::Offset(o)) = (topic_of(e.topic()), e.offset()) {
                            self.next.entry((topic, e.partition())).or_insert(o);
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "committed offsets unknown; progress of unread partitions waits"),
            }
        }
        let now = unix_now_ms();
        assigned
            .elements()
            .iter()
            .filter_map(|e| {
                let topic = topic_of(e.topic())?;
                let p = e.partition();
                let at = if self.read_to_end(consumer, topic, p) {
                    Some(now)
                } else {
                    self.watermarks.get(&(topic, p)).copied()
                };
                Some((format!("{topic}/{p}"), at?))
            })
            .collect()
    }

    /// Commits what Redis has: each partition's next offset, but never past
    /// a click still waiting for its impression.
    fn commit<C: rdkafka::consumer::ConsumerContext>(&self, consumer: &rdkafka::consumer::StreamConsumer<C>) {
        let Ok(assigned) = consumer.assignment() else { return };
        let mut tpl = TopicPartitionList::new();
        for e in assigned.elements() {
            let Some(topic) = topic_of(e.topic()) else { continue };
            let Some(mut next) = self.next.get(&(topic, e.partition())).copied() else { continue };
            if topic == CLICKS_TOPIC
                && let Some(oldest) =
                    self.waiting.iter().filter(|w| w.partition == e.partition()).map(|w| w.offset).min()
            {
                next = next.min(oldest);
            }
            let _ = tpl.add_partition_offset(topic, e.partition(), Offset::Offset(next));
        }
        if tpl.count() > 0
            && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
        {
            tracing::warn!(error = %e, "offset commit failed; events since the last commit will be re-read (and deduplicated)");
        }
    }

    async fn run(&mut self) -> Result<(), RunError> {
        let consumer = self.config.kafka.consumer(&self.config.group_id)?;
        consumer.subscribe(&[IMPRESSIONS_TOPIC, CLICKS_TOPIC])?;
        tracing::info!(group = %self.config.group_id, "streaming aggregates: consuming impressions and clicks");
        let mut commit = tokio::time::interval(self.config.commit_interval);
        let mut refresh = tokio::time::interval(self.config.refresh_interval);
        commit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.lifecycle.shutdown.wait() => {
                    self.commit(&consumer);
                    return Ok(());
                }
                _ = commit.tick() => {
                    let caught_up = self.impressions_caught_up(&consumer);
                    if !self.retry_waiting(&caught_up).await {
                        return Ok(());
                    }
                    self.commit(&consumer);
                    if let Err(e) = self.aggregator.report_progress(self.progress(&consumer)).await {
                        tracing::debug!(error = %e, "reporting progress failed; next tick retries");
                    }
                }
                _ = refresh.tick() => {
                    match self.aggregator.refresh_due(unix_now(), self.config.refresh_batch).await {
                        Ok(n) => metrics::counter!("adserve_feature_aggregates_refreshed_total").increment(n as u64),
                        Err(e) => {
                            metrics::counter!("adserve_feature_aggregates_redis_errors_total", "op" => "refresh").increment(1);
                            tracing::warn!(error = %e, "refreshing moved windows failed; next tick retries");
                        }
                    }
                }
                message = consumer.recv() => {
                    // What is already fetched goes in one batch.
                    let mut batch = Vec::with_capacity(BATCH);
                    batch.extend(Read::of(&message?));
                    while batch.len() < BATCH {
                        match futures::FutureExt::now_or_never(consumer.recv()) {
                            Some(m) => batch.extend(Read::of(&m?)),
                            None => break,
                        }
                    }
                    if !batch.is_empty() && !self.handle_batch(batch).await? {
                        return Ok(());
                    }
                }
            }
        }
    }
}

enum Event {
    /// One impression, or every impression of one multi-slot answer.
    Impressions(Vec<ImpressionEvent>),
    Click(ClickEvent),
}

/// Runs the consumer until shutdown, starting it over with backoff after a
/// Kafka failure. `report_readiness`: the consumer's health is the
/// process's readiness (a process that only aggregates); otherwise it is
/// only logged and counted (serving does not depend on it).
pub async fn supervise(
    config: &AggregatesConfig,
    kafka: &KafkaConfig,
    aggregator: Aggregator,
    publisher: EventPublisher,
    lifecycle: &Lifecycle,
    report_readiness: bool,
) {
    const DEPENDENCY: &str = "kafka consumer (aggregates)";
    let mut backoff = kafka.recovery_backoff();
    loop {
        let started = Instant::now();
        let mut state = Loop {
            config,
            aggregator: &aggregator,
            publisher: &publisher,
            lifecycle,
            watermarks: HashMap::new(),
            next: HashMap::new(),
            waiting: VecDeque::new(),
        };
        if report_readiness {
            lifecycle.readiness.set(DEPENDENCY, None);
        }
        let e = match state.run().await {
            Ok(()) => return,
            Err(e) => e,
        };
        if started.elapsed() >= Duration::from_secs(30) {
            backoff = kafka.recovery_backoff();
        }
        let delay = backoff.next().unwrap_or(kafka.recovery_backoff_max);
        tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "aggregates loop failed; starting it over");
        metrics::counter!("adserve_feature_aggregates_restarts_total").increment(1);
        if report_readiness {
            lifecycle.readiness.set(DEPENDENCY, Some(e.to_string()));
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = lifecycle.shutdown.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributions_round_trip_with_and_without_a_user() {
        let a = Attribution {
            user_id: "u|1".into(),
            ad_id: 7,
            campaign_id: 3,
            price_cpc_micros: 150_000,
            served_ms: 17,
            on_notice: false,
            per_impression: false,
            layout: 3,
        };
        let b = Attribution {
            user_id: String::new(),
            ad_id: -3,
            campaign_id: 4,
            price_cpc_micros: 0,
            served_ms: 0,
            on_notice: true,
            per_impression: true,
            layout: 3,
        };
        for a in [a.clone(), b] {
            assert_eq!(Attribution::decode(&a.encode()), Some(a));
        }
        // Markers written before bids were billed on notice: read, and
        // rewritten (charged) in their own layout, so the charge's guard
        // matches what is stored.
        let v2 = "v2|7|3|150000|17|u|1";
        let old = Attribution::decode(v2).expect("a v2 marker");
        assert_eq!(old, Attribution { on_notice: false, per_impression: false, layout: 2, ..a.clone() });
        assert_eq!(old.encode(), v2);
        assert_eq!(old.charged().encode(), "v2|7|3|0|17|u|1");
        assert_eq!(a.charged().price_cpc_micros, 0);
        assert_ne!(a.charged().encode(), a.encode(), "the guard sees the charge");
        // Markers written before they carried the charge: counted, never charged.
        assert_eq!(
            Attribution::decode("7|u|1"),
            Some(Attribution {
                user_id: "u|1".into(),
                ad_id: 7,
                campaign_id: 0,
                price_cpc_micros: 0,
                served_ms: 0,
                on_notice: false,
                per_impression: false,
                layout: 1,
            })
        );
        assert_eq!(Attribution::decode("garbage"), None);
        assert_eq!(Attribution::decode("x|u"), None);
        assert_eq!(Attribution::decode("v2|7|3|x|17|u"), None);
        assert_eq!(Attribution::decode("v2|7|3|1"), None);
    }
}
