//! Opaque `$skiptoken` / `$deltatoken` values: a small binary body sealed with an HMAC, so a
//! client cannot forge or edit one, and bound to the window it was made for.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What a token continues: a round (skiptoken) or a delta state (deltatoken).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A `$skiptoken`.
    Skip = 1,
    /// A `$deltatoken`.
    Delta = 2,
}

/// Where a link points: a sync-state cache entry and, for a skiptoken, a page position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBody {
    /// Skip or delta.
    pub kind: TokenKind,
    /// The cache entry.
    pub entry: u64,
    /// Items of the round already sent.
    pub offset: u32,
    /// Empty pages sent (empty-pages quirk).
    pub empties: u16,
    /// Times the endless-nextLink quirk repeated a page.
    pub loops: u32,
    /// The page's number in the round.
    pub page_no: u32,
    /// Window start (Unix seconds) the token is bound to.
    pub window_start: i64,
    /// Window end (Unix seconds) the token is bound to.
    pub window_end: i64,
}

const BODY_LEN: usize = 1 + 8 + 4 + 2 + 4 + 4 + 8 + 8;
const MAC_LEN: usize = 16;

/// Seals tokens with an HMAC so an edited or foreign token is told apart from an evicted one.
#[derive(Debug, Clone)]
pub struct TokenCodec {
    key: [u8; 32],
}

/// Why a token could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not base64 or not the right length.
    Malformed,
    /// The seal does not match: edited, or made by another simulator.
    Tampered,
}

impl TokenCodec {
    /// A codec keyed from `seed`: the same seed reads the same tokens.
    pub fn new(seed: u64) -> Self {
        let mut key = [0u8; 32];
        for (i, chunk) in key.chunks_mut(8).enumerate() {
            let v = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(i as u32 * 13)
                ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        TokenCodec { key }
    }

    fn mac(&self, body: &[u8]) -> [u8; MAC_LEN] {
        let mut out = [0u8; MAC_LEN];
        if let Ok(mut m) = Hmac::<Sha256>::new_from_slice(&self.key) {
            m.update(body);
            out.copy_from_slice(&m.finalize().into_bytes()[..MAC_LEN]);
        }
        out
    }

    /// The token as URL-safe base64 of its body and seal.
    pub fn encode(&self, t: &TokenBody) -> String {
        let mut b = Vec::with_capacity(BODY_LEN + MAC_LEN);
        b.push(t.kind as u8);
        b.extend_from_slice(&t.entry.to_le_bytes());
        b.extend_from_slice(&t.offset.to_le_bytes());
        b.extend_from_slice(&t.empties.to_le_bytes());
        b.extend_from_slice(&t.loops.to_le_bytes());
        b.extend_from_slice(&t.page_no.to_le_bytes());
        b.extend_from_slice(&t.window_start.to_le_bytes());
        b.extend_from_slice(&t.window_end.to_le_bytes());
        let mac = self.mac(&b);
        b.extend_from_slice(&mac);
        URL_SAFE_NO_PAD.encode(b)
    }

    /// Reads a token, checking its seal.
    pub fn decode(&self, s: &str) -> Result<TokenBody, TokenError> {
        let b = URL_SAFE_NO_PAD
            .decode(s.trim())
            .map_err(|_| TokenError::Malformed)?;
        if b.len() != BODY_LEN + MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let (body, mac) = b.split_at(BODY_LEN);
        if self.mac(body) != mac {
            return Err(TokenError::Tampered);
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[i..i + 8]);
            a
        };
        let u32_at = |i: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&body[i..i + 4]);
            u32::from_le_bytes(a)
        };
        let kind = match body[0] {
            1 => TokenKind::Skip,
            2 => TokenKind::Delta,
            _ => return Err(TokenError::Malformed),
        };
        Ok(TokenBody {
            kind,
            entry: u64::from_le_bytes(u64_at(1)),
            offset: u32_at(9),
            empties: u16::from_le_bytes([body[13], body[14]]),
            loops: u32_at(15),
            page_no: u32_at(19),
            window_start: i64::from_le_bytes(u64_at(23)),
            window_end: i64::from_le_bytes(u64_at(31)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> TokenBody {
        TokenBody {
            kind: TokenKind::Skip,
            entry: 42,
            offset: 7,
            empties: 1,
            loops: 0,
            page_no: 3,
            window_start: 1_700_000_000,
            window_end: 1_800_000_000,
        }
    }

    #[test]
    fn tokens_round_trip() {
        let c = TokenCodec::new(1);
        assert_eq!(c.decode(&c.encode(&body())), Ok(body()));
    }

    #[test]
    fn an_edited_token_is_detected() {
        let c = TokenCodec::new(1);
        let t = c.encode(&body());
        let mut bytes = URL_SAFE_NO_PAD.decode(&t).unwrap();
        bytes[1] ^= 1;
        assert_eq!(
            c.decode(&URL_SAFE_NO_PAD.encode(bytes)),
            Err(TokenError::Tampered)
        );
        assert_eq!(c.decode("not a token"), Err(TokenError::Malformed));
        assert_eq!(TokenCodec::new(2).decode(&t), Err(TokenError::Tampered));
    }
}
