//! The `exp` claim of an access token that is a JWS (RFC 7515 compact form), read without any
//! signature check: it only schedules refreshes, never grants trust.
//!
//! Some IdPs stamp `exp` in whole seconds, so a token can stop working up to a second before
//! `expires_in` says; when the token carries its own `exp`, the cache uses the earlier of the two.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Payloads larger than this are not decoded (an `exp` never needs more).
const MAX_PAYLOAD_CHARS: usize = 16 * 1024;

/// The token's `exp` in milliseconds since the epoch, when the token is a compact JWS whose
/// payload is a JSON object with a numeric, non-negative `exp`; `None` for anything else.
pub(crate) fn jws_expiry_ms(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.is_empty() || payload.len() > MAX_PAYLOAD_CHARS {
        return None;
    }
    // Some encoders keep the padding; base64url without it is what RFC 7515 asks for.
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.as_object()?.get("exp")?.as_f64()?;
    // Whole seconds before the epoch or beyond year 10,000 are not an expiry worth honouring.
    if !(0.0..=253_402_300_799.0).contains(&exp) {
        return None;
    }
    Some((exp * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jws(payload: &str) -> String {
        format!("eyJhbGciOiJub25lIn0.{}.c2ln", URL_SAFE_NO_PAD.encode(payload))
    }

    #[test]
    fn reads_a_numeric_exp_and_ignores_everything_else() {
        let cases: &[(&str, Option<u64>)] = &[
            (r#"{"exp":1700000000}"#, Some(1_700_000_000_000)),
            (r#"{"exp":1700000000.5,"sub":"x"}"#, Some(1_700_000_000_500)),
            (r#"{"exp":"1700000000"}"#, None),
            (r#"{"exp":-1}"#, None),
            (r#"{"exp":1e300}"#, None),
            (r#"{"iat":1}"#, None),
            (r#"[1,2]"#, None),
            ("not json", None),
        ];
        for (payload, want) in cases {
            assert_eq!(jws_expiry_ms(&jws(payload)), *want, "payload {payload}");
        }
        for opaque in ["", "abc", "a.b", "a.b.c.d", "a..c", "a.!!!.c", "a.\u{ff}\u{fe}.c"] {
            assert_eq!(jws_expiry_ms(opaque), None, "token {opaque:?}");
        }
        let huge = format!("a.{}.c", "A".repeat(MAX_PAYLOAD_CHARS + 1));
        assert_eq!(jws_expiry_ms(&huge), None);
    }
}
