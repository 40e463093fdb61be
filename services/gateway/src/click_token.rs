//! Signed click tokens: a click is recorded only for an impression this
//! gateway (or a replica sharing its keys) served.
//!
//! Each winner of an ad answer carries `click_token`, an HMAC-SHA256 over the
//! impression id, the ad and the time it was served, under the first key of
//! `click_tokens.keys`. `POST /v1/clicks` must send it back: a token that does
//! not verify under any configured key (forged, altered, for another
//! impression), is older than the label window (a click that late is neither
//! a label nor charged), or comes from the future is refused with a 4xx and
//! counted, and never reaches the click log, so it can never become a
//! training row or a charge. Verifying under every configured key lets keys
//! rotate: add the new key first, then drop the old one a label window later.
//!
//! Wire form: `v1.<ad_id>.<served_unix_ms>.<signature, base64url>`.
//!
//! **Billing tokens** sign an OpenRTB bid's billing notice (`burl`) the same
//! way, under a different prefix, so neither kind of token passes for the
//! other: `b1.<ad_id>.<served_unix_ms>.<bid_cpm_micros>.<signature>`, an
//! HMAC over the impression id, the ad, the time and the bid's price (a
//! clearing price above it is refused). A click token travels in the
//! creative's markup, to every browser that shows it; a billing token only
//! to the exchange.

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Version prefix of the click token format.
const VERSION: &str = "v1";
/// Version prefix of the billing token format.
const BILLING: &str = "b1";

/// Shortest accepted key.
pub const MIN_KEY_BYTES: usize = 32;

/// How far a token's time may lie ahead of this gateway's clock (replicas'
/// clocks differ a little).
pub const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// What a verified token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// The ad that was served.
    pub ad_id: i64,
    /// When it was served, unix ms.
    pub served_ms: u64,
}

/// What a verified billing token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BillingClaims {
    /// The ad that was bid.
    pub ad_id: i64,
    /// When the bid was made, unix ms.
    pub served_ms: u64,
    /// The bid's price per thousand impressions, micro units: the most a
    /// clearing price may be.
    pub bid_cpm_micros: i64,
}

/// Why a token was refused; each is a label of
/// `adserve_gateway_clicks_refused_total{reason}` (or
/// `adserve_gateway_billing_notices_refused_total{reason}`). The message
/// does not name the field: the caller does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format at all.
    #[error("malformed")]
    Malformed,
    /// The signature does not verify for this impression under any key.
    #[error("does not match impression_id")]
    Forged,
    /// Served longer ago than the label window.
    #[error("expired (served {age_s} s ago; clicks and billing notices count within {window_s} s)")]
    Expired {
        /// Age of the impression, seconds.
        age_s: u64,
        /// The label window, seconds.
        window_s: u64,
    },
    /// Served in the future: a forged time.
    #[error("issued in the future")]
    FromTheFuture,
}

impl TokenError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Forged => "forged",
            Self::Expired { .. } => "expired",
            Self::FromTheFuture => "future",
        }
    }
}

/// Signs and verifies click tokens.
#[derive(Clone)]
pub struct ClickTokens {
    /// The first signs; all verify.
    keys: Vec<Vec<u8>>,
    /// Oldest accepted token.
    max_age: Duration,
}

impl std::fmt::Debug for ClickTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("ClickTokens").field("keys", &self.keys.len()).field("max_age", &self.max_age).finish()
    }
}

impl ClickTokens {
    /// Tokens under `keys` (the first signs; each at least
    /// [`MIN_KEY_BYTES`]), valid for `max_age`.
    pub fn new(keys: Vec<Vec<u8>>, max_age: Duration) -> Self {
        assert!(!keys.is_empty(), "at least one click token key");
        Self { keys, max_age }
    }

    /// The MAC of `prefix`, the impression and `fields`. Unambiguous: the
    /// impression id is a UUID (no '|'), the fields are numbers.
    fn mac(key: &[u8], prefix: &str, impression_id: &str, fields: &[i64]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        let mut text = format!("{prefix}|{impression_id}");
        for f in fields {
            text.push('|');
            text.push_str(&f.to_string());
        }
        mac.update(text.as_bytes());
        mac
    }

    /// `prefix.f1.f2….signature`, signed under the first key.
    fn seal(&self, prefix: &str, impression_id: &str, fields: &[i64]) -> String {
        let tag = Self::mac(&self.keys[0], prefix, impression_id, fields).finalize().into_bytes();
        let mut token = prefix.to_string();
        for f in fields {
            token.push('.');
            token.push_str(&f.to_string());
        }
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(tag));
        token
    }

    /// The `N` fields of a token `prefix` signed for `impression_id` under
    /// any configured key.
    fn open<const N: usize>(&self, prefix: &str, token: &str, impression_id: &str) -> Result<[i64; N], TokenError> {
        let mut parts = token.split('.');
        if parts.next() != Some(prefix) {
            return Err(TokenError::Malformed);
        }
        let mut fields = [0i64; N];
        for f in &mut fields {
            *f = parts.next().and_then(|p| p.parse().ok()).ok_or(TokenError::Malformed)?;
        }
        let (Some(sig), None) = (parts.next(), parts.next()) else { return Err(TokenError::Malformed) };
        // Both formats: the ad, then the time (unix ms, never negative).
        if fields.get(1).is_some_and(|t| *t < 0) {
            return Err(TokenError::Malformed);
        }
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| TokenError::Malformed)?;
        // Constant-time comparison (verify_slice), under each key in turn.
        let genuine =
            self.keys.iter().any(|key| Self::mac(key, prefix, impression_id, &fields).verify_slice(&sig).is_ok());
        if !genuine {
            return Err(TokenError::Forged);
        }
        Ok(fields)
    }

    /// Whether a token for a time of `served_ms` is still good at `now_ms`.
    fn fresh(&self, served_ms: u64, now_ms: u64) -> Result<(), TokenError> {
        if served_ms > now_ms + CLOCK_SKEW.as_millis() as u64 {
            return Err(TokenError::FromTheFuture);
        }
        let age = Duration::from_millis(now_ms.saturating_sub(served_ms));
        if age > self.max_age {
            return Err(TokenError::Expired { age_s: age.as_secs(), window_s: self.max_age.as_secs() });
        }
        Ok(())
    }

    /// The token of an impression served at `served_ms`.
    pub fn sign(&self, impression_id: &str, ad_id: i64, served_ms: u64) -> String {
        self.seal(VERSION, impression_id, &[ad_id, served_ms as i64])
    }

    /// Checks `token` against `impression_id` at `now_ms`.
    pub fn verify(&self, token: &str, impression_id: &str, now_ms: u64) -> Result<Claims, TokenError> {
        let claims = self.genuine(token, impression_id)?;
        self.fresh(claims.served_ms, now_ms)?;
        Ok(claims)
    }

    /// Checks only that `token` was signed here for `impression_id`, at any
    /// time: its claims (the ad) can be trusted, though a click on it may
    /// no longer count ([`verify`](Self::verify) says whether it does).
    pub fn genuine(&self, token: &str, impression_id: &str) -> Result<Claims, TokenError> {
        let [ad_id, served_ms] = self.open(VERSION, token, impression_id)?;
        let served_ms = u64::try_from(served_ms).map_err(|_| TokenError::Malformed)?;
        Ok(Claims { ad_id, served_ms })
    }

    /// The billing token of a bid made at `served_ms` at `bid_cpm_micros`.
    pub fn sign_billing(&self, impression_id: &str, ad_id: i64, served_ms: u64, bid_cpm_micros: i64) -> String {
        self.seal(BILLING, impression_id, &[ad_id, served_ms as i64, bid_cpm_micros])
    }

    /// Checks a billing token against `impression_id` at `now_ms`: signed
    /// here, for this impression, no older than the label window (a notice
    /// that late is neither a label nor counted).
    pub fn verify_billing(&self, token: &str, impression_id: &str, now_ms: u64) -> Result<BillingClaims, TokenError> {
        let [ad_id, served_ms, bid_cpm_micros] = self.open(BILLING, token, impression_id)?;
        let served_ms = u64::try_from(served_ms).map_err(|_| TokenError::Malformed)?;
        self.fresh(served_ms, now_ms)?;
        Ok(BillingClaims { ad_id, served_ms, bid_cpm_micros })
    }
}

/// Decodes a configured key: hex (64+ digits) or standard base64.
pub fn decode_key(text: &str) -> Result<Vec<u8>, String> {
    use base64::engine::general_purpose::STANDARD;
    let text = text.trim();
    let bytes = if text.len().is_multiple_of(2) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).map_err(|e| e.to_string())?
    } else {
        STANDARD.decode(text).map_err(|_| "must be hex or base64".to_string())?
    };
    if bytes.len() < MIN_KEY_BYTES {
        return Err(format!("must be at least {MIN_KEY_BYTES} bytes, got {}", bytes.len()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMP: &str = "0190b7a2-1c2d-7e3f-8a9b-0c1d2e3f4a5b";
    const HOUR: Duration = Duration::from_secs(3600);

    fn tokens(keys: &[u8]) -> ClickTokens {
        ClickTokens::new(keys.iter().map(|k| vec![*k; 32]).collect(), HOUR)
    }

    #[test]
    fn a_token_verifies_for_its_impression_only() {
        let t = tokens(&[1]);
        let token = t.sign(IMP, 42, 1_000_000);
        assert_eq!(t.verify(&token, IMP, 1_000_500), Ok(Claims { ad_id: 42, served_ms: 1_000_000 }));
        let other = "0190b7a2-1c2d-7e3f-8a9b-0c1d2e3f4a5c";
        assert_eq!(t.verify(&token, other, 1_000_500), Err(TokenError::Forged));
    }

    #[test]
    fn altering_any_part_breaks_the_signature() {
        let t = tokens(&[1]);
        let token = t.sign(IMP, 42, 1_000_000);
        let sig = token.rsplit('.').next().unwrap();
        for altered in [format!("v1.43.1000000.{sig}"), format!("v1.42.1000001.{sig}")] {
            assert_eq!(t.verify(&altered, IMP, 1_000_500), Err(TokenError::Forged), "{altered}");
        }
        // Another key's token is a forgery here.
        assert_eq!(t.verify(&tokens(&[2]).sign(IMP, 42, 1_000_000), IMP, 1_000_500), Err(TokenError::Forged));
    }

    #[test]
    fn old_and_future_tokens_are_refused() {
        let t = tokens(&[1]);
        let token = t.sign(IMP, 42, 1_000_000);
        let late = 1_000_000 + HOUR.as_millis() as u64 + 1;
        assert!(matches!(t.verify(&token, IMP, late), Err(TokenError::Expired { .. })));
        assert_eq!(t.verify(&token, IMP, 1_000_000 - 10_000), Err(TokenError::FromTheFuture));
        // Within the skew is fine.
        assert!(t.verify(&token, IMP, 1_000_000 - 1_000).is_ok());
        // Genuine at any age (the click redirect still lands such a click).
        assert_eq!(t.genuine(&token, IMP), Ok(Claims { ad_id: 42, served_ms: 1_000_000 }));
        assert_eq!(tokens(&[2]).genuine(&token, IMP), Err(TokenError::Forged));
    }

    #[test]
    fn garbage_is_malformed() {
        let t = tokens(&[1]);
        for bad in ["", "v1", "v2.1.2.AAAA", "v1.x.2.AAAA", "v1.1.-2.AAAA", "v1.1.2.!!", "v1.1.2.AAAA.extra"] {
            assert_eq!(t.verify(bad, IMP, 0), Err(TokenError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn rotation_verifies_under_every_key_and_signs_with_the_first() {
        let old = tokens(&[1]);
        let rotated = tokens(&[2, 1]);
        let token = old.sign(IMP, 7, 5_000);
        assert!(rotated.verify(&token, IMP, 6_000).is_ok(), "tokens of the old key still verify");
        assert_eq!(old.verify(&rotated.sign(IMP, 7, 5_000), IMP, 6_000), Err(TokenError::Forged));
    }

    #[test]
    fn keys_are_hex_or_base64_and_long_enough() {
        assert_eq!(decode_key(&"ab".repeat(32)).unwrap(), vec![0xab; 32]);
        assert_eq!(decode_key(&base64::engine::general_purpose::STANDARD.encode([7u8; 40])).unwrap(), vec![7; 40]);
        assert!(decode_key("abcd").unwrap_err().contains("at least 32 bytes"));
        assert!(decode_key("not a key!").is_err());
    }

    #[test]
    fn billing_tokens_verify_for_their_bid_and_never_pass_for_click_tokens() {
        let t = tokens(&[7]);
        let now = 1_700_000_000_000;
        let billing = t.sign_billing(IMP, 42, now, 2_500_000);
        assert!(billing.starts_with("b1.42."), "{billing}");
        assert_eq!(
            t.verify_billing(&billing, IMP, now + 1000),
            Ok(BillingClaims { ad_id: 42, served_ms: now, bid_cpm_micros: 2_500_000 })
        );
        assert_eq!(t.verify_billing(&billing, "another", now), Err(TokenError::Forged));
        // Raising the price in the token breaks the signature.
        let raised = billing.replacen(".2500000.", ".9500000.", 1);
        assert_eq!(t.verify_billing(&raised, IMP, now), Err(TokenError::Forged));
        // A click token (in every browser's markup) is not a billing token, nor the reverse.
        let click = t.sign(IMP, 42, now);
        assert_eq!(t.verify_billing(&click, IMP, now), Err(TokenError::Malformed));
        assert_eq!(t.verify(&billing, IMP, now), Err(TokenError::Malformed));
        // The same fields under the other prefix do not verify either.
        let swapped = format!("v1{}", &billing[2..]);
        assert_eq!(t.verify(&swapped, IMP, now), Err(TokenError::Malformed), "three fields are not a click token");
        assert!(matches!(t.verify_billing(&billing, IMP, now + 2 * 3_600_000), Err(TokenError::Expired { .. })));
        assert_eq!(t.verify_billing(&billing, IMP, now - 60_000), Err(TokenError::FromTheFuture));
    }
}
