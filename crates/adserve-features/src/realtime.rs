//! The real-time tier's layout in Redis: the one definition shared by the
//! feature-service's reader (one MGET per request) and its stream aggregator
//! (the only writer, outside seeding and tests).
//!
//! Each entity (user, ad) has **one** string key holding every counter of
//! that entity, so one MGET serves a user and 1000 ads. The value is a fixed
//! binary layout ([`Packed`], 33 bytes): layout version 1, the seven
//! [`attributes`] as little-endian f32 in that order, and the unix second
//! they were summed at as a little-endian u32. Fixed offsets mean the reader
//! parses nothing: it copies the f32 at each wanted attribute's offset. A
//! value of another length or version is served as the features' defaults
//! and counted invalid. (A text layout, `name=value;...`, was 140 bytes per
//! entity: at 1000 ads the MGET moved 140 kB and the reader parsed 8000
//! floats; see docs/benchmarks.md.)
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{prefix}:{u:<user>}` | string | the user's packed counters |
//! | `{prefix}:{a}:<ad>` | string | the ad's packed counters |
//! | `<value key>:b` | hash | the per-minute and per-hour buckets the value is summed from |
//! | `{prefix}:refresh` | sorted set | entity -> the time one of its windows next changes |
//! | `{prefix}:seen:i:<impression>` | string | the impression's ad, campaign, CPC price (0 once charged), time and user (dedup, click attribution, the charge) |
//! | `{prefix}:seen:c:<click>` | string | dedup marker of a counted click |
//! | `{prefix}:seen:b:<impression>` | string | dedup marker of a bid's counted billing notice |
//! | `{prefix}:aggregates:progress` | hash | `topic/partition` -> event time (ms) applied through |
//!
//! The hash tags (`{u:<user>}`, `{a}`) keep an entity's value and buckets in
//! one Redis Cluster slot, and every ad value in one slot, so the reader's
//! MGET of all candidate ads never crosses slots.

use crate::Entity;

/// The sliding windows every counter is kept over: `(suffix, seconds)`.
/// 5 m and 1 h are summed from 1-minute buckets, 24 h from 1-hour buckets;
/// a window is "the current bucket and the ones before it that fit".
pub const WINDOWS: [(&str, u64); 3] = [("5m", 300), ("1h", 3600), ("24h", 86_400)];

/// The counted events.
pub const COUNTERS: [&str; 2] = ["impressions", "clicks"];

/// Name of the smoothed click-through rate over 24 h:
/// `(clicks_24h + PRIOR_CTR * PRIOR_WEIGHT) / (impressions_24h + PRIOR_WEIGHT)`.
pub const SMOOTHED_CTR: &str = "ctr_24h_smoothed";
/// Prior of [`SMOOTHED_CTR`].
pub const PRIOR_CTR: f64 = 0.02;
/// Weight of the prior, in impressions.
pub const PRIOR_WEIGHT: f64 = 100.0;

/// Every attribute a packed value holds, in layout order: `impressions_5m,
/// impressions_1h, impressions_24h, clicks_5m, ..., ctr_24h_smoothed`.
/// Registry features with `source = "redis"` must name one. Append only: a
/// new attribute goes at the end with a new [`LAYOUT_VERSION`].
pub fn attributes() -> Vec<String> {
    let mut names: Vec<String> =
        COUNTERS.iter().flat_map(|c| WINDOWS.iter().map(move |(w, _)| format!("{c}_{w}"))).collect();
    names.push(SMOOTHED_CTR.to_string());
    names
}

/// Whether `entity` has real-time counters (users and ads do).
pub fn has_counters(entity: Entity) -> bool {
    matches!(entity, Entity::User | Entity::Ad)
}

/// The key of an entity's packed counters.
pub fn value_key(prefix: &str, entity: Entity, id: &str) -> String {
    match entity {
        Entity::User => format!("{prefix}:{{u:{id}}}"),
        Entity::Ad => format!("{prefix}:{{a}}:{id}"),
        Entity::Context => format!("{prefix}:{{c}}:{id}"),
    }
}

/// The key of the buckets an entity's value is summed from.
pub fn buckets_key(prefix: &str, entity: Entity, id: &str) -> String {
    format!("{}:b", value_key(prefix, entity, id))
}

/// The member naming an entity in the refresh schedule.
pub fn member(entity: Entity, id: &str) -> String {
    match entity {
        Entity::User => format!("u:{id}"),
        Entity::Ad => format!("a:{id}"),
        Entity::Context => format!("c:{id}"),
    }
}

/// The inverse of [`member`].
pub fn parse_member(member: &str) -> Option<(Entity, &str)> {
    let (kind, id) = member.split_once(':')?;
    let entity = match kind {
        "u" => Entity::User,
        "a" => Entity::Ad,
        _ => return None,
    };
    (!id.is_empty()).then_some((entity, id))
}

/// The refresh schedule: entity -> when one of its windows next changes.
pub fn refresh_key(prefix: &str) -> String {
    format!("{prefix}:refresh")
}

/// The dedup (and attribution) marker of an impression.
pub fn impression_marker(prefix: &str, impression_id: &str) -> String {
    format!("{prefix}:seen:i:{impression_id}")
}

/// The dedup marker of a click.
pub fn click_marker(prefix: &str, click_id: &str) -> String {
    format!("{prefix}:seen:c:{click_id}")
}

/// The shown marker of a bid billed on notice: set by the first of its
/// billing notice (whatever the notice's id) and its first click in the
/// label window, which counts the impression once; its value says whether
/// the notice has charged the clearing price yet.
pub fn billing_marker(prefix: &str, impression_id: &str) -> String {
    format!("{prefix}:seen:b:{impression_id}")
}

/// The aggregators' progress: a hash of `topic/partition` -> the event
/// time (unix ms) the partition's owner has applied through (the wall clock
/// while it has read the partition to its end). Its oldest entry is how far
/// behind the event logs the real-time tier may be.
pub fn progress_key(prefix: &str) -> String {
    format!("{prefix}:aggregates:progress")
}

/// Version byte of the packed layout.
pub const LAYOUT_VERSION: u8 = 1;

/// Attributes in a packed value.
pub const ATTRIBUTES: usize = COUNTERS.len() * WINDOWS.len() + 1;

/// Bytes of a packed value: version, the attributes as f32, `as_of` as u32.
pub const PACKED_LEN: usize = 1 + 4 * ATTRIBUTES + 4;

/// One entity's counters, as stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Packed {
    /// In [`attributes`] order.
    pub values: [f32; ATTRIBUTES],
    /// Unix second the sums were computed at (0: unknown, e.g. seeded).
    pub as_of: u32,
}

impl Packed {
    /// Reads a stored value; None when it is not this layout (wrong length
    /// or version): its features are then served as defaults and counted.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != PACKED_LEN || bytes[0] != LAYOUT_VERSION {
            return None;
        }
        let word = |i: usize| -> [u8; 4] {
            let at = 1 + 4 * i;
            [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]
        };
        let mut values = [0f32; ATTRIBUTES];
        for (i, v) in values.iter_mut().enumerate() {
            *v = f32::from_le_bytes(word(i));
        }
        Some(Self { values, as_of: u32::from_le_bytes(word(ATTRIBUTES)) })
    }

    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PACKED_LEN);
        out.push(LAYOUT_VERSION);
        for v in self.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.as_of.to_le_bytes());
        out
    }

    /// A value with the named attributes set and the others 0 (seeding and
    /// tests); None when a name is not an attribute.
    pub fn of<S: AsRef<str>>(pairs: &[(S, f64)], as_of: u32) -> Option<Self> {
        let mut values = [0f32; ATTRIBUTES];
        for (name, value) in pairs {
            values[attribute_index(name.as_ref())?] = *value as f32;
        }
        Some(Self { values, as_of })
    }
}

/// Position of an attribute in the layout.
pub fn attribute_index(name: &str) -> Option<usize> {
    attributes().iter().position(|a| a == name)
}

/// The bucket fields one event adds 1 to, for `counter` (an index into
/// [`COUNTERS`]) at `event_s`, as seen at `now_s` (both unix seconds): the
/// minute bucket while it is inside the longest minute-resolution window
/// (1 h), the hour bucket while inside 24 h. Empty when the event is too old
/// for every window (or `counter` unknown).
pub fn bucket_fields(counter: usize, event_s: i64, now_s: i64) -> Vec<String> {
    let Some(kind) = COUNTERS.get(counter).and_then(|c| c.chars().next()) else { return Vec::new() };
    let mut fields = Vec::with_capacity(2);
    let (minute, hour) = (event_s.div_euclid(60), event_s.div_euclid(3600));
    if now_s.div_euclid(60) - minute < 60 {
        fields.push(format!("{kind}:m:{minute}"));
    }
    if now_s.div_euclid(3600) - hour < 24 {
        fields.push(format!("{kind}:h:{hour}"));
    }
    fields
}

/// The script that applies one event (or, with no fields, only re-sums an
/// entity whose windows moved) atomically:
///
/// - `KEYS[1]`: dedup marker (`""`: none), `KEYS[2]`: refresh schedule,
///   `KEYS[3]`: guard of the increments (`""`: none), then per entity its
///   buckets hash and its value key, then one key per increment.
/// - `ARGV`: now (unix s), value TTL (s), marker value, marker TTL (s),
///   number of bucket fields n, number of entities e, the value the guard
///   must hold, the value it is then set to, the n fields, the e schedule
///   members, prior CTR, prior weight, then per increment its field, amount
///   and key TTL (s).
///
/// The value it writes is [`Packed`]'s layout (`struct.pack('<BfffffffI4')`).
///
/// Returns 0 when the marker already existed (a redelivered event: nothing
/// changed), 2 when the increments were applied, else 1. Each entity's
/// value is re-summed from its buckets at `now`; buckets out of every window
/// are deleted; an entity left with no counts loses its value, buckets and
/// schedule entry; otherwise its value and buckets get the TTL and its
/// schedule entry the time its sums next change (when a bucket leaves a
/// window).
///
/// The increments (`HINCRBY`, then `EXPIRE`) are counters outside the
/// windows (spend, frequency: `adserve_counters::on_impression`). They run
/// once per event, under the same marker; with a guard, only while the
/// guard key holds the expected value, which they replace (KEEPTTL): a
/// compare-and-set that charges an impression's first click only.
pub const APPLY_SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
if KEYS[1] ~= '' then
  if not redis.call('SET', KEYS[1], ARGV[3], 'NX', 'EX', tonumber(ARGV[4])) then return 0 end
end
local nf, entities = tonumber(ARGV[5]), tonumber(ARGV[6])
local at = 9 + nf
local prior, weight = tonumber(ARGV[at + entities]), tonumber(ARGV[at + entities + 1])
local minute, hour = math.floor(now / 60), math.floor(now / 3600)
for e = 0, entities - 1 do
  local hash, value, member = KEYS[4 + 2 * e], KEYS[5 + 2 * e], ARGV[at + e]
  for f = 0, nf - 1 do redis.call('HINCRBY', hash, ARGV[9 + f], 1) end
  local sums = { i = { 0, 0, 0 }, c = { 0, 0, 0 } }
  local next_change, stale = nil, {}
  local function change_at(t) if next_change == nil or t < next_change then next_change = t end end
  local all = redis.call('HGETALL', hash)
  for k = 1, #all, 2 do
    local kind, res, b = string.match(all[k], '^(%a):(%a):(%-?%d+)$')
    local v, s = tonumber(all[k + 1]), sums[kind or '']
    b = tonumber(b)
    local keep = false
    if s and v and b then
      if res == 'm' and minute - b < 60 then
        keep = true
        s[2] = s[2] + v
        change_at((b + 60) * 60)
        if minute - b < 5 then s[1] = s[1] + v; change_at((b + 5) * 60) end
      elseif res == 'h' and hour - b < 24 then
        keep = true
        s[3] = s[3] + v
        change_at((b + 24) * 3600)
      end
    end
    if not keep then stale[#stale + 1] = all[k] end
  end
  if #stale > 0 then redis.call('HDEL', hash, unpack(stale)) end
  if next_change == nil then
    redis.call('DEL', hash, value)
    redis.call('ZREM', KEYS[2], member)
  else
    local ctr = (sums.c[3] + prior * weight) / (sums.i[3] + weight)
    local packed = struct.pack('<BfffffffI4', 1, sums.i[1], sums.i[2], sums.i[3],
      sums.c[1], sums.c[2], sums.c[3], ctr, now)
    redis.call('SET', value, packed, 'EX', ttl)
    redis.call('EXPIRE', hash, ttl)
    redis.call('ZADD', KEYS[2], next_change, member)
  end
end
local first = 4 + 2 * entities
if #KEYS < first then return 1 end
if KEYS[3] ~= '' then
  if redis.call('GET', KEYS[3]) ~= ARGV[7] then return 1 end
  redis.call('SET', KEYS[3], ARGV[8], 'KEEPTTL')
end
local a = at + entities + 2
for k = first, #KEYS do
  local i = a + 3 * (k - first)
  redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
  redis.call('EXPIRE', KEYS[k], tonumber(ARGV[i + 2]))
end
return 2
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_counters_by_window_then_ctr() {
        let a = attributes();
        assert_eq!(a.len(), COUNTERS.len() * WINDOWS.len() + 1, "the script packs exactly 7 names");
        assert_eq!(a[0], "impressions_5m");
        assert_eq!(a[1], "impressions_1h");
        assert_eq!(a[5], "clicks_24h");
        assert_eq!(a[6], SMOOTHED_CTR);
    }

    #[test]
    fn keys_keep_an_entity_and_all_ads_in_one_slot() {
        assert_eq!(value_key("rt", Entity::User, "u1"), "rt:{u:u1}");
        assert_eq!(buckets_key("rt", Entity::User, "u1"), "rt:{u:u1}:b");
        assert_eq!(value_key("rt", Entity::Ad, "42"), "rt:{a}:42");
        assert_eq!(buckets_key("rt", Entity::Ad, "42"), "rt:{a}:42:b");
        assert_eq!(parse_member(&member(Entity::User, "a:b")), Some((Entity::User, "a:b")));
        assert_eq!(parse_member(&member(Entity::Ad, "7")), Some((Entity::Ad, "7")));
        assert_eq!(parse_member("x:1"), None);
        assert_eq!(parse_member("u:"), None);
    }

    #[test]
    fn packed_values_round_trip_and_other_layouts_are_refused() {
        let p = Packed::of(&[("impressions_1h", 3.0), (SMOOTHED_CTR, 0.025)], 17).expect("known names");
        let bytes = p.encode();
        assert_eq!(bytes.len(), PACKED_LEN);
        assert_eq!(PACKED_LEN, 33);
        let back = Packed::decode(&bytes).expect("same layout");
        assert_eq!(back, p);
        assert_eq!(back.values[attribute_index("impressions_1h").expect("known")], 3.0);
        assert_eq!(back.values[attribute_index(SMOOTHED_CTR).expect("known")], 0.025);
        assert_eq!(back.as_of, 17);
        assert!(Packed::of(&[("views", 1.0)], 0).is_none());
        assert!(Packed::decode(b"impressions_1h=3").is_none(), "the old text layout");
        let mut other = bytes.clone();
        other[0] = 2;
        assert!(Packed::decode(&other).is_none(), "another version");
        assert!(Packed::decode(&bytes[..32]).is_none());
    }

    #[test]
    fn an_event_lands_in_the_buckets_whose_windows_still_hold_it() {
        let now = 1_800_000_000; // a minute boundary plus change
        assert_eq!(bucket_fields(0, now, now), vec![format!("i:m:{}", now / 60), format!("i:h:{}", now / 3600)]);
        assert_eq!(bucket_fields(1, now - 30, now)[0], format!("c:m:{}", (now - 30) / 60));
        // Two hours old: only the 24 h window still holds it.
        assert_eq!(bucket_fields(0, now - 7200, now), vec![format!("i:h:{}", (now - 7200) / 3600)]);
        // Older than a day: nothing.
        assert!(bucket_fields(0, now - 90_000, now).is_empty());
        assert!(bucket_fields(9, now, now).is_empty());
    }

    #[test]
    fn the_script_packs_the_same_layout() {
        // Version byte, one f32 per attribute, the u32 time.
        let format = format!("'<B{}I4'", "f".repeat(ATTRIBUTES));
        assert!(APPLY_SCRIPT.contains(&format!("struct.pack({format}, {LAYOUT_VERSION},")), "{format}");
    }
}
