//! Any status and body as a token endpoint response: never a panic, and a token that comes out is
//! safe to put in a header value (visible ASCII only, non-empty, within the size cap).

#![no_main]

use libfuzzer_sys::fuzz_target;
use oauth2_cc_core::test_support::{FieldPath, MAX_LIFETIME_S, MAX_TOKEN_BYTES, parse_token_response};

fuzz_target!(|data: &[u8]| {
    let Some((status, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = u32::from(u16::from_le_bytes(*status));
    let token_field = FieldPath(vec!["access_token".into()]);
    let expires_in_field = FieldPath(vec!["expires_in".into()]);
    match parse_token_response(status, body, &token_field, &expires_in_field, 65536) {
        Ok(grant) => {
            let token = grant.access_token.as_bytes();
            assert!(!token.is_empty(), "empty token accepted");
            assert!(token.len() <= MAX_TOKEN_BYTES, "oversized token accepted");
            assert!(token.iter().all(|b| (0x21..=0x7e).contains(b)), "unsafe token byte accepted: {token:?}");
            assert!((200..300).contains(&status), "token accepted with status {status}");
            if let Some(lifetime) = grant.expires_in_s {
                assert!((1..=MAX_LIFETIME_S).contains(&lifetime), "lifetime {lifetime} out of range");
            }
        }
        Err(err) => {
            // Display and the label never panic either.
            let _ = (err.to_string(), err.label(), err.class());
        }
    }
});
