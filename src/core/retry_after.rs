//! The `Retry-After` header of an IdP's answer (RFC 9110 §10.2.3): delay-seconds or an HTTP-date.
//! The value is bytes from the network: anything that is neither form is ignored.

use std::time::{Duration, UNIX_EPOCH};

/// The longest wait honoured; beyond it an IdP (or an attacker in its place) could park the
/// filter for days. The backoff's own ceiling applies after it.
pub(crate) const MAX_RETRY_AFTER_MS: u64 = 3_600_000;

/// Milliseconds to wait from `now_ms`, if the value is a delay in seconds or an HTTP-date (a date
/// in the past means no wait).
// Out of line: one caller must not absorb it into a large wasm function (docs/memory.md, "Function shape").
#[inline(never)]
pub(crate) fn retry_after_ms(value: &[u8], now_ms: u64) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() {
        return None;
    }
    let wait_ms = if text.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only; an overlong number saturates instead of failing.
        text.parse::<u64>().unwrap_or(u64::MAX).saturating_mul(1000)
    } else {
        let at = httpdate::parse_http_date(text).ok()?;
        let at_ms = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis();
        u64::try_from(at_ms).unwrap_or(u64::MAX).saturating_sub(now_ms)
    };
    Some(wait_ms.min(MAX_RETRY_AFTER_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example date).
    const EXAMPLE_MS: u64 = 784_111_777_000;

    #[test]
    fn both_forms_and_hostile_bytes() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (b"2", Some(2_000)),
            (b" 120 ", Some(120_000)),
            (b"0", Some(0)),
            (b"99999999999999999999999", Some(MAX_RETRY_AFTER_MS)),
            (b"Sun, 06 Nov 1994 08:49:40 GMT", Some(3_000)),
            (b"Sunday, 06-Nov-94 08:49:40 GMT", Some(3_000)),
            (b"Sun Nov  6 08:49:40 1994", Some(3_000)),
            (b"Sun, 06 Nov 1994 08:49:30 GMT", Some(0)),
            (b"-1", None),
            (b"1.5", None),
            (b"", None),
            (b"\xff\xfe", None),
            (b"Sun, 06 Nov 1994 \x80\x81 GMT", None),
            (b"Sun, 99 Nov 1994 08:49:40 GMT", None),
        ];
        for (value, want) in cases {
            assert_eq!(retry_after_ms(value, EXAMPLE_MS), *want, "value {:?}", String::from_utf8_lossy(value));
        }
    }
}
