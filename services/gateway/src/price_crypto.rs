//! Encrypted clearing prices in billing notices.
//!
//! Exchanges that do not want the clearing price readable by whoever sees a
//! notice URL substitute `${AUCTION_PRICE}` with the price encrypted under
//! two keys they share with the bidder. This is the scheme Google Authorized
//! Buyers documents ("Decrypt price confirmations") and other exchanges
//! copied:
//!
//! - the macro becomes web-safe base64 of 28 bytes: a 16-byte
//!   initialisation vector, the 8-byte price, a 4-byte signature;
//! - price = ciphertext XOR the first 8 bytes of HMAC-SHA1(encryption key, iv),
//!   a big-endian integer in micro units of the currency per mille;
//! - signature = the first 4 bytes of HMAC-SHA1(integrity key, price || iv).
//!
//! The keys are given to the bidder as web-safe base64 (32 bytes each) and
//! are used as raw bytes. A price that fails the signature was altered or
//! encrypted under other keys; it is refused, never billed.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

const IV_BYTES: usize = 16;
const PRICE_BYTES: usize = 8;
const SIGNATURE_BYTES: usize = 4;
/// Decoded length of an encrypted price.
pub const CIPHERTEXT_BYTES: usize = IV_BYTES + PRICE_BYTES + SIGNATURE_BYTES;

/// Why an encrypted price was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    /// Not base64 of 28 bytes: not an encrypted price at all (400).
    #[error("must be a decimal clearing price or an encrypted one (web-safe base64 of {CIPHERTEXT_BYTES} bytes)")]
    Malformed,
    /// Well-formed, but its signature does not verify under the keys (403).
    #[error("the encrypted price does not verify with openrtb.price_keys (altered, or encrypted for another bidder)")]
    Integrity,
}

/// The encryption and integrity keys an exchange shares with this bidder.
#[derive(Clone)]
pub struct PriceKeys {
    encryption: HmacSha1,
    integrity: HmacSha1,
}

impl std::fmt::Debug for PriceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PriceKeys([redacted])")
    }
}

impl PriceKeys {
    /// Keys as raw bytes (HMAC takes any length; exchanges issue 32).
    pub fn new(encryption: &[u8], integrity: &[u8]) -> Self {
        Self {
            encryption: HmacSha1::new_from_slice(encryption).expect("HMAC takes keys of any length"),
            integrity: HmacSha1::new_from_slice(integrity).expect("HMAC takes keys of any length"),
        }
    }

    /// Decrypts and verifies `text`, the value the exchange put in for
    /// `${AUCTION_PRICE}`: the clearing price in micro units per mille.
    pub fn decrypt(&self, text: &str) -> Result<u64, PriceError> {
        let bytes = decode(text).ok_or(PriceError::Malformed)?;
        let (iv, rest) = bytes.split_at(IV_BYTES);
        let (ciphertext, signature) = rest.split_at(PRICE_BYTES);
        let pad = self.pad(iv);
        let mut price = [0u8; PRICE_BYTES];
        for (i, b) in price.iter_mut().enumerate() {
            *b = ciphertext[i] ^ pad[i];
        }
        let mut mac = self.integrity.clone();
        mac.update(&price);
        mac.update(iv);
        // Constant time: the signature is a secret-derived value.
        mac.verify_truncated_left(signature).map_err(|_| PriceError::Integrity)?;
        Ok(u64::from_be_bytes(price))
    }

    /// What an exchange sends for `price_cpm_micros` with this `iv` (its
    /// first 8 bytes are conventionally the time in seconds and
    /// microseconds): web-safe base64 without padding. For tests and for
    /// integrators checking their keys.
    pub fn encrypt(&self, price_cpm_micros: u64, iv: [u8; IV_BYTES]) -> String {
        let pad = self.pad(&iv);
        let price = price_cpm_micros.to_be_bytes();
        let mut out = Vec::with_capacity(CIPHERTEXT_BYTES);
        out.extend_from_slice(&iv);
        out.extend(price.iter().zip(pad).map(|(p, k)| p ^ k));
        let mut mac = self.integrity.clone();
        mac.update(&price);
        mac.update(&iv);
        out.extend_from_slice(&mac.finalize().into_bytes()[..SIGNATURE_BYTES]);
        URL_SAFE_NO_PAD.encode(out)
    }

    fn pad(&self, iv: &[u8]) -> [u8; PRICE_BYTES] {
        let mut mac = self.encryption.clone();
        mac.update(iv);
        let digest = mac.finalize().into_bytes();
        let mut pad = [0u8; PRICE_BYTES];
        pad.copy_from_slice(&digest[..PRICE_BYTES]);
        pad
    }
}

/// Whether `text` decodes to an encrypted price's length (it may still
/// not verify).
pub fn is_ciphertext(text: &str) -> bool {
    decode(text).is_some()
}

/// Web-safe base64 (as exchanges send it), padded or not; the standard
/// alphabet too, which some exchanges use, with a `+` that a query string
/// decoded to a space put back.
fn decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    if text.len() > 64 {
        return None;
    }
    let text = text.replace(' ', "+");
    let bytes = URL_SAFE_NO_PAD.decode(&text).or_else(|_| STANDARD_NO_PAD.decode(&text)).ok()?;
    (bytes.len() == CIPHERTEXT_BYTES).then_some(bytes)
}

/// Decodes a key as exchanges issue them: base64 (web-safe or standard,
/// padded or not) or hex; at least 16 bytes.
pub fn decode_key(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    let bytes = if text.len().is_multiple_of(2) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).map_err(|e| e.to_string())?
    } else {
        let unpadded = text.trim_end_matches('=');
        URL_SAFE_NO_PAD
            .decode(unpadded)
            .or_else(|_| STANDARD_NO_PAD.decode(unpadded))
            .map_err(|_| "must be base64 (web-safe or standard) or hex".to_string())?
    };
    if bytes.len() < 16 {
        return Err(format!("must be at least 16 bytes, got {}", bytes.len()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example keys and prices of Google's "Decrypt price confirmations".
    const E_KEY: &str = "skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o=";
    const I_KEY: &str = "arO23ykdNqUQ5LEoQ0FVmPkBd7xB5CO89PDZlSjpFxo=";

    fn keys() -> PriceKeys {
        PriceKeys::new(&decode_key(E_KEY).unwrap(), &decode_key(I_KEY).unwrap())
    }

    #[test]
    fn the_published_examples_decrypt_to_their_prices() {
        let k = keys();
        assert_eq!(k.decrypt("YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCce_6msaw"), Ok(100));
        assert_eq!(k.decrypt("YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCAWJRxOgA"), Ok(1900));
        assert_eq!(k.decrypt("YWJjMTIzZGVmNDU2Z2hpN7fhCuPemC32prpWWw"), Ok(2700));
        // Padded, and in the standard alphabet, are the same ciphertext.
        assert_eq!(k.decrypt("YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCce_6msaw=="), Ok(100));
        assert_eq!(k.decrypt("YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCce/6msaw"), Ok(100));
    }

    #[test]
    fn encryption_is_what_the_exchange_sends() {
        let k = keys();
        assert_eq!(k.encrypt(100, *b"abc123def456ghi7"), "YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCce_6msaw");
        for price in [0, 1, 1_234_500, u64::MAX] {
            assert_eq!(k.decrypt(&k.encrypt(price, [7; 16])), Ok(price));
        }
    }

    #[test]
    fn an_altered_price_or_other_keys_fail_the_integrity_check() {
        let k = keys();
        let good = "YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCce_6msaw";
        // Flip one bit of each part in turn: iv, price, signature.
        let bytes = decode(good).unwrap();
        for at in [0, IV_BYTES, IV_BYTES + PRICE_BYTES] {
            let mut altered = bytes.clone();
            altered[at] ^= 1;
            assert_eq!(k.decrypt(&URL_SAFE_NO_PAD.encode(&altered)), Err(PriceError::Integrity), "byte {at}");
        }
        let other = PriceKeys::new(&[1; 32], &[2; 32]);
        assert_eq!(other.decrypt(good), Err(PriceError::Integrity));
        // Keys swapped: the classic integration mistake.
        let swapped = PriceKeys::new(&decode_key(I_KEY).unwrap(), &decode_key(E_KEY).unwrap());
        assert_eq!(swapped.decrypt(good), Err(PriceError::Integrity));
    }

    #[test]
    fn anything_but_28_bytes_of_base64_is_malformed() {
        let k = keys();
        for text in
            ["", "1.25", "YWJj", "YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCce_6msawAA", "not base64 at all!!", &"A".repeat(500)]
        {
            assert_eq!(k.decrypt(text), Err(PriceError::Malformed), "{text:?}");
        }
    }

    #[test]
    fn keys_decode_from_base64_or_hex_and_must_not_be_short() {
        assert_eq!(decode_key(E_KEY).unwrap().len(), 32);
        assert_eq!(decode_key(&"ab".repeat(32)).unwrap(), vec![0xab; 32]);
        assert_eq!(decode_key("skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o").unwrap(), decode_key(E_KEY).unwrap());
        assert!(decode_key("c2hvcnQ=").unwrap_err().contains("at least 16 bytes"));
        assert!(decode_key("?!").unwrap_err().contains("base64"));
    }

    #[test]
    fn keys_never_print() {
        assert_eq!(format!("{:?}", keys()), "PriceKeys([redacted])");
    }
}
