//! Publisher API keys and per-key rate limits.
//!
//! With `auth.api_keys` configured, every ad request and click must present
//! one of the keys (`Authorization: Bearer <key>` or `x-api-key: <key>`; the
//! same names as gRPC metadata). The config holds only each key's SHA-256,
//! never the key, so it may live in a ConfigMap. A request without a key, or
//! with one that is not configured, is refused (401 / `Unauthenticated`).
//! Each key has its own token bucket (`requests_per_second`, `burst`); a
//! request beyond it is refused at once (429 / `ResourceExhausted`, with
//! `Retry-After`), before it costs a catalog query or a model call. Health
//! checks need no key. With no keys configured the gateway is open (the local
//! stack), and says so at start.

use std::{collections::HashMap, num::NonZeroU32, sync::Arc, time::Duration};

use governor::{Quota, RateLimiter, clock::Clock as _};
use sha2::{Digest, Sha256};

use crate::config::ApiKey;

/// One publisher's key: who it is and its bucket.
struct Publisher {
    name: String,
    limiter: governor::DefaultDirectRateLimiter,
}

/// Why a request was refused at the door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No key presented.
    Missing,
    /// A key that is not configured.
    Unknown,
    /// The publisher's rate is spent; retry after this long.
    Limited {
        /// The publisher.
        publisher: String,
        /// Until a request would be admitted.
        retry_after: Duration,
    },
}

/// The configured publishers, by the SHA-256 of their key.
#[derive(Clone, Default)]
pub struct Publishers {
    by_hash: Arc<HashMap<[u8; 32], Publisher>>,
}

impl std::fmt::Debug for Publishers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publishers").field("keys", &self.by_hash.len()).finish()
    }
}

/// The SHA-256 of a key, as `auth.api_keys[].sha256` holds it (hex).
pub fn key_sha256(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Publishers {
    /// The publishers of `keys` (validated config: 64-hex hashes, rates >= 1).
    pub fn new(keys: &[ApiKey]) -> Self {
        let by_hash = keys
            .iter()
            .filter_map(|k| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&k.sha256, &mut hash).ok()?;
                let rate = NonZeroU32::new(k.requests_per_second)?;
                let burst = NonZeroU32::new(k.burst)?;
                let limiter = RateLimiter::direct(Quota::per_second(rate).allow_burst(burst));
                Some((hash, Publisher { name: k.publisher.clone(), limiter }))
            })
            .collect();
        Self { by_hash: Arc::new(by_hash) }
    }

    /// No keys configured: every request is admitted.
    pub fn is_open(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Admits a request presenting `key`: the publisher's name (None when the
    /// gateway is open), or why not. Takes one token from the publisher's
    /// bucket.
    pub fn admit(&self, key: Option<&str>) -> Result<Option<&str>, Refusal> {
        if self.is_open() {
            return Ok(None);
        }
        let key = key.map(str::trim).filter(|k| !k.is_empty()).ok_or(Refusal::Missing)?;
        // Looked up by hash: the comparison never touches the key itself.
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let publisher = self.by_hash.get(&hash).ok_or(Refusal::Unknown)?;
        match publisher.limiter.check() {
            Ok(()) => Ok(Some(&publisher.name)),
            Err(not_until) => Err(Refusal::Limited {
                publisher: publisher.name.clone(),
                retry_after: not_until.wait_time_from(governor::clock::DefaultClock::default().now()),
            }),
        }
    }
}

/// The key a request presents: `Authorization: Bearer <key>`, else
/// `x-api-key`. `header` reads one header (HTTP) or metadata entry (gRPC).
pub fn presented<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<&'a str> {
    header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| header("x-api-key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(publisher: &str, secret: &str, rps: u32, burst: u32) -> ApiKey {
        ApiKey { publisher: publisher.into(), sha256: key_sha256(secret), requests_per_second: rps, burst }
    }

    #[test]
    fn without_keys_everyone_is_admitted() {
        let p = Publishers::new(&[]);
        assert!(p.is_open());
        assert_eq!(p.admit(None), Ok(None));
    }

    #[test]
    fn a_configured_key_is_admitted_as_its_publisher_and_others_are_not() {
        let p = Publishers::new(&[key("news-site", "s3cret-news", 100, 100), key("app", "s3cret-app", 100, 100)]);
        assert_eq!(p.admit(Some("s3cret-news")), Ok(Some("news-site")));
        assert_eq!(p.admit(Some(" s3cret-app ")), Ok(Some("app")));
        assert_eq!(p.admit(None), Err(Refusal::Missing));
        assert_eq!(p.admit(Some("")), Err(Refusal::Missing));
        assert_eq!(p.admit(Some("s3cret-new")), Err(Refusal::Unknown));
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let p = Publishers::new(&[key("small", "k-small", 1, 3), key("big", "k-big", 1000, 1000)]);
        for _ in 0..3 {
            assert!(p.admit(Some("k-small")).is_ok());
        }
        match p.admit(Some("k-small")) {
            Err(Refusal::Limited { publisher, retry_after }) => {
                assert_eq!(publisher, "small");
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1), "{retry_after:?}");
            }
            other => panic!("expected a limit, got {other:?}"),
        }
        // Another publisher is not affected.
        assert_eq!(p.admit(Some("k-big")), Ok(Some("big")));
    }

    #[test]
    fn the_key_comes_from_a_bearer_token_or_x_api_key() {
        let headers = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
        };
        assert_eq!(presented(headers(&[("authorization", "Bearer abc")])), Some("abc"));
        assert_eq!(presented(headers(&[("x-api-key", "xyz")])), Some("xyz"));
        assert_eq!(presented(headers(&[("authorization", "Basic Zm9v")])), None);
        assert_eq!(presented(headers(&[])), None);
    }
}
