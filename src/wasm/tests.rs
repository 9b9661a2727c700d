//! The proxy-wasm host against a fake Envoy ([`fake_envoy`]): the SDK's exports driven as Envoy
//! drives them, every host call the filter makes recorded, so the glue between the SDK, the core
//! and Envoy's ABI is checked by `cargo test` natively (the e2e suite runs it on real Envoy).

use crate::fake_envoy;

use fake_envoy::{Call, answer, deliver_queues, request, response, start_root, take_calls, tick};
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
            Call::Callout { context, token, .. } => Some((*context, *token)),
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
        // One host call per hit: a route that matches every request reads no fact, and the
        // copy is this VM's (no shared data, no clock, no metric call until the tick).
        assert_eq!(
            calls,
            [Call::ReplaceHeader { context, name: "authorization".into(), value: "Bearer tok-1".into() }],
            "{calls:?}"
        );
        assert_eq!(fake_envoy::request_header(context, "authorization").as_deref(), Some(&b"Bearer tok-1"[..]));
    }
}

fn resumed_with_token(calls: &[Call], context: u32) -> bool {
    calls.contains(&Call::ReplaceHeader { context, name: "authorization".into(), value: "Bearer tok-1".into() })
        && calls.contains(&Call::Continue(context))
}

#[test]
fn a_miss_pauses_and_the_answer_resumes_it_here_and_through_the_queue_on_another_vm() {
    // Two VMs (root contexts), as two workers: the first's tick sends the only token request.
    const OTHER: u32 = 2;
    assert!(start_root(ROOT, &config()));
    assert!(start_root(OTHER, &config()));
    tick(ROOT);
    let sent = http_calls(&take_calls());
    assert_eq!(sent.len(), 1);
    assert_eq!(request(ROOT, 10, &headers()), Action::Pause, "no token yet: the request waits");
    assert_eq!(request(OTHER, 20, &headers()), Action::Pause);
    tick(OTHER);
    let calls = take_calls();
    assert!(http_calls(&calls).is_empty(), "the lease in shared data keeps the other VM from fetching: {calls:?}");
    assert!(!calls.iter().any(|c| matches!(c, Call::Continue(_))), "{calls:?}");

    answer(ROOT, sent[0].1, b"200", TOKEN_BODY);
    let calls = take_calls();
    assert!(calls.iter().any(|c| matches!(c, Call::SetShared(k) if k.starts_with("oauth2_cc.v1.token.p."))));
    assert!(
        calls.iter().filter(|c| matches!(c, Call::Enqueue(_))).count() == 2,
        "a stored token wakes every VM: {calls:?}"
    );
    assert!(!calls.iter().any(|c| matches!(c, Call::Continue(_))), "requests resume on their VM's wake: {calls:?}");

    deliver_queues();
    let calls = take_calls();
    assert!(resumed_with_token(&calls, 10), "the wake resumes the fetching VM's request: {calls:?}");
    assert!(resumed_with_token(&calls, 20), "and the other VM's, from shared data: {calls:?}");
    assert!(http_calls(&calls).is_empty(), "{calls:?}");
}

#[test]
fn a_refused_configuration_is_reported_naming_the_field() {
    let bad = config().replace(r#""client_id": "svc""#, r#""client_id": 7"#);
    assert!(!start_root(ROOT, &bad), "a bad configuration is refused");
    let calls = take_calls();
    let errors: Vec<&String> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Log(4, line) => Some(line),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 1, "{calls:?}");
    assert!(errors[0].starts_with("configuration rejected: profiles.p.client_id"), "{}", errors[0]);
    assert!(!calls.iter().any(|c| format!("{c:?}").contains("s3cr3t")), "no secret in any call: {calls:?}");
    // Envoy sends no traffic to a refused plugin; a stray request passes untouched.
    assert_eq!(request(ROOT, 10, &headers()), Action::Continue);
    assert!(!take_calls().iter().any(|c| matches!(c, Call::ReplaceHeader { .. })));
}

#[test]
fn a_401_purges_the_shared_entry_and_a_200_touches_no_shared_data() {
    configured_with_token();
    assert_eq!(request(ROOT, 10, &headers()), Action::Continue);
    take_calls();
    assert_eq!(response(10, b"200"), Action::Continue);
    let calls = take_calls();
    assert!(
        !calls.iter().any(|c| matches!(c, Call::GetShared(_) | Call::SetShared(_) | Call::Callout { .. })),
        "a 200 is not the driver's business: {calls:?}"
    );

    assert_eq!(request(ROOT, 11, &headers()), Action::Continue);
    take_calls();
    assert_eq!(response(11, b"401"), Action::Continue);
    let calls = take_calls();
    assert!(
        calls.iter().any(|c| matches!(c, Call::SetShared(k) if k.starts_with("oauth2_cc.v1.token.p."))),
        "a 401 purges the token everyone shares: {calls:?}"
    );
    // The purged token is not injected again.
    let after = request(ROOT, 12, &headers());
    let calls = take_calls();
    assert!(
        !calls.iter().any(|c| matches!(c, Call::ReplaceHeader { value, .. } if value == "Bearer tok-1")),
        "{calls:?}"
    );
    assert_eq!(after, Action::Pause, "{calls:?}");
}

#[test]
fn bytes_that_are_not_utf8_do_not_panic() {
    // Every matcher reads its fact from the request: authority, path, method, a header.
    let matching = r#"{"authority": "upstream", "path_prefix": "/api", "method": "GET",
        "headers": [{"name": "x-tenant", "value": "a"}]}"#;
    assert!(start_root(ROOT, &config().replace(r#"{"path_prefix": "/"}"#, matching)));
    tick(ROOT);
    let sent = http_calls(&take_calls());
    answer(ROOT, sent[0].1, b"200", TOKEN_BODY);
    take_calls();
    let hostile: &[u8] = b"\xff\xfe";
    let mut request_headers = headers();
    request_headers.push(("x-tenant", b"a"));
    assert_eq!(request(ROOT, 9, &request_headers), Action::Continue);
    assert_eq!(fake_envoy::request_header(9, "authorization").as_deref(), Some(&b"Bearer tok-1"[..]));
    for (index, name) in [":authority", ":path", ":method", "x-tenant"].into_iter().enumerate() {
        let mut spoiled = request_headers.clone();
        spoiled.retain(|(n, _)| *n != name);
        spoiled.push((name, hostile));
        let context = 10 + index as u32;
        // A fact that is not UTF-8 matches no pattern: no route, the request goes on untouched.
        assert_eq!(request(ROOT, context, &spoiled), Action::Continue, "{name}");
        assert_eq!(fake_envoy::request_header(context, "authorization"), None, "{name}");
    }
    take_calls();
    assert_eq!(request(ROOT, 20, &request_headers), Action::Continue);
    assert_eq!(response(20, b"4\xff1"), Action::Continue);
    // A callout answer with bytes that are not UTF-8 in its status and body.
    fake_envoy::advance_ms(3_600_000);
    tick(ROOT);
    let sent = http_calls(&take_calls());
    assert_eq!(sent.len(), 1, "the expired token is fetched again");
    answer(ROOT, sent[0].1, b"2\xff0", b"{\"access_token\":\"\xff\"}");
    assert!(take_calls().iter().any(|c| matches!(c, Call::Log(..))), "the bad answer is logged, not a panic");
}

#[test]
fn a_request_whose_client_left_is_not_resumed() {
    assert!(start_root(ROOT, &config()));
    tick(ROOT);
    let sent = http_calls(&take_calls());
    assert_eq!(request(ROOT, 10, &headers()), Action::Pause);
    assert_eq!(request(ROOT, 11, &headers()), Action::Pause);
    fake_envoy::delete(10);
    answer(ROOT, sent[0].1, b"200", TOKEN_BODY);
    deliver_queues();
    let calls = take_calls();
    assert!(resumed_with_token(&calls, 11), "{calls:?}");
    assert!(!calls.iter().any(|c| matches!(c, Call::SetEffective(10) | Call::Continue(10))), "{calls:?}");
}

fn tick_periods(calls: &[Call]) -> Vec<u32> {
    calls.iter().filter_map(|c| if let Call::SetTick(ms) = c { Some(*ms) } else { None }).collect()
}

#[test]
fn the_tick_comes_when_the_driver_needs_it_not_every_100_ms() {
    assert!(start_root(ROOT, &config()));
    assert_eq!(tick_periods(&take_calls()), [1], "the first tick at once: it prefetches");
    tick(ROOT);
    let calls = take_calls();
    let sent = http_calls(&calls);
    // A main-thread VM sets its gauges every second; the fetch in flight is due later (its lease).
    assert_eq!(tick_periods(&calls), [1_000], "{calls:?}");
    answer(ROOT, sent[0].1, b"200", TOKEN_BODY);
    assert_eq!(tick_periods(&take_calls()), [0u32; 0], "a stored token due in an hour changes nothing");
    // This VM serves requests now (no gauges): its 3600 s token needs nothing for minutes, so the
    // tick comes at the longest period, the core's ceiling.
    assert_eq!(request(ROOT, 10, &headers()), Action::Continue);
    fake_envoy::advance_ms(1_000);
    tick(ROOT);
    assert_eq!(tick_periods(&take_calls()), [1_000]);
    // A 401 drops the token: the next tick, which fetches a new one, comes at once.
    let _ = response(10, b"401");
    assert_eq!(tick_periods(&take_calls()), [1], "a purged token is fetched again at once");
}
