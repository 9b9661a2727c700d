//! The proxy-wasm host against a fake Envoy ([`fake_envoy`]): the SDK's exports driven as Envoy
//! drives them, every host call the filter makes recorded, so the glue between the SDK, the core
//! and Envoy's ABI is checked by `cargo test` natively (the e2e suite runs it on real Envoy).

use crate::fake_envoy;

use fake_envoy::{Call, answer, request, start_root, take_calls, tick};
use proxy_wasm::types::Action;

const ROOT: u32 = 1;

fn config() -> String {
    r#"{"profiles": {"p": {"cluster": "idp", "token_url": "https://idp.example/token",
        "client_id": "svc", "client_secret": "s3cr3t-value"}},
        "routes": [{"match": {"path_prefix": "/"}, "profile": "p"}]}"#
        .to_string()
}

const TOKEN_BODY: &[u8] = br#"{"access_token":"tok-1","expires_in":3600}"#;

fn headers() -> Vec<(&'static str, &'static [u8])> {
    vec![(":path", b"/api"), (":method", b"GET"), (":authority", b"upstream")]
}

fn http_calls(calls: &[Call]) -> Vec<(u32, u32)> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::HttpCall { context, token, .. } => Some((*context, *token)),
            _ => None,
        })
        .collect()
}

/// A VM configured and given its token by the prefetch the first tick sends.
fn configured_with_token() {
    assert!(start_root(ROOT, &config()));
    tick(ROOT);
    let calls = take_calls();
    let sent = http_calls(&calls);
    assert_eq!(sent.len(), 1, "the first tick prefetches: {calls:?}");
    answer(ROOT, sent[0].1, b"200", TOKEN_BODY);
    take_calls();
}

#[test]
fn a_hit_writes_the_header_from_the_vms_copy_and_calls_nothing_else() {
    configured_with_token();
    for context in [10, 11, 12] {
        assert_eq!(request(ROOT, context, &headers()), Action::Continue);
        let calls = take_calls();
        let writes: Vec<&Call> = calls.iter().filter(|c| matches!(c, Call::ReplaceHeader { .. })).collect();
        assert_eq!(
            writes,
            [&Call::ReplaceHeader { context, name: "authorization".into(), value: "Bearer tok-1".into() }],
            "{calls:?}"
        );
        assert!(calls.len() <= 2, "a hit reads at most the selected fact and writes one header: {calls:?}");
        for call in &calls {
            assert!(
                matches!(call, Call::ReplaceHeader { .. } | Call::GetHeader(0, _)),
                "nothing but request headers on a hit: {call:?}"
            );
        }
        assert_eq!(fake_envoy::request_header(context, "authorization").as_deref(), Some(&b"Bearer tok-1"[..]));
    }
}
