//! The signature of a batch: `Calsync-Signature: v1=<hex>` where `<hex>` is HMAC-SHA256 with
//! the sink's secret over `"<Calsync-Timestamp>.<body>"` (the scheme of Stripe's and GitHub's
//! webhooks: the timestamp in the signed text lets a receiver refuse a replayed request).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The signature header's value for `body` sent at `timestamp` (seconds since the epoch).
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = mac(secret);
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let mut out = String::with_capacity(3 + bytes.len() * 2);
    out.push_str("v1=");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Whether `header` is the signature of `body` at `timestamp` (compared in constant time):
/// what a receiver checks; the tests use it as one would.
pub fn verify(secret: &[u8], timestamp: i64, body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("v1=") else {
        return false;
    };
    let Some(given) = decode_hex(hex) else {
        return false;
    };
    let mut mac = mac(secret);
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length: this cannot fail.
    match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 (key "Jefe"), as the signed text "<timestamp>.<body>" splits it.
    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        let secret = b"Jefe";
        // "what do ya want for nothing?" = "what do ya want" + " for nothing?" is not a
        // timestamp; the RFC's text is signed here as timestamp 0 would not be, so check
        // against an HMAC of the same text computed directly.
        let direct = {
            let mut m = mac(secret);
            m.update(b"1700000000.{\"changes\":[]}");
            m.finalize().into_bytes()
        };
        let sig = signature(secret, 1_700_000_000, b"{\"changes\":[]}");
        assert_eq!(sig.len(), 3 + 64);
        assert_eq!(decode_hex(&sig[3..]).unwrap(), direct.to_vec());
        // RFC 4231 §4.3: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        let mut m = mac(secret);
        m.update(b"what do ya want for nothing?");
        let rfc: Vec<u8> = m.finalize().into_bytes().to_vec();
        assert_eq!(
            decode_hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843").unwrap(),
            rfc
        );
    }

    #[test]
    fn verify_accepts_the_signature_and_refuses_any_change() {
        let (secret, body) = (b"s3cret".as_slice(), b"{\"changes\":[1]}".as_slice());
        let sig = signature(secret, 42, body);
        assert!(verify(secret, 42, body, &sig));
        assert!(!verify(secret, 43, body, &sig), "another timestamp");
        assert!(
            !verify(secret, 42, b"{\"changes\":[2]}", &sig),
            "another body"
        );
        assert!(!verify(b"other", 42, body, &sig), "another secret");
        assert!(!verify(secret, 42, body, "v1=zz"));
        assert!(!verify(secret, 42, body, &sig[3..]), "no scheme");
    }
}
