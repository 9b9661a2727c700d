//! The proxy-wasm host's token-exchange glue against the fake Envoy: the subject read from the
//! request header or from dynamic metadata, the jwt_authn fact, the kick that makes the root
//! context send the exchange with the subject token from this VM's memory, a hit per subject that
//! touches nothing but the header, and the refusals the core decides, carried out as local replies.

use crate::fake_envoy;

use fake_envoy::{Call, answer, callout_body, deliver_queues, request, set_property, start_root, take_calls};
use proxy_wasm::types::Action;

const ROOT: u32 = 1;
const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

fn config(token_exchange: &str) -> String {
    format!(
        r#"{{"profiles": {{"ex": {{"cluster": "idp", "token_url": "https://idp.example/token",
        "client_id": "svc", "client_secret": "s3cr3t-value", "grant_type": "{GRANT}",
        "token_exchange": {token_exchange}}}}},
        "routes": [{{"match": {{"path_prefix": "/"}}, "profile": "ex"}}]}}"#
    )
}

fn with_bearer(subject: &'static str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (":path", b"/api".to_vec()),
        (":method", b"GET".to_vec()),
        ("authorization", format!("Bearer {subject}").into_bytes()),
    ]
}

fn send(context: u32, headers: &[(&'static str, Vec<u8>)]) -> Action {
    let borrowed: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    request(ROOT, context, &borrowed)
}

fn callouts(calls: &[Call]) -> Vec<u32> {
    calls.iter().filter_map(|c| if let Call::Callout { token, .. } = c { Some(*token) } else { None }).collect()
}

fn answer_body(token: &str) -> Vec<u8> {
    format!(r#"{{"access_token":"{token}","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":3600}}"#).into_bytes()
}

fn form_value(body: &[u8], name: &str) -> Option<String> {
    form_urlencoded::parse(body).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

fn local_reply(calls: &[Call], context: u32) -> Option<u32> {
    calls.iter().find_map(|c| match c {
        Call::LocalResponse { context: c, status } if *c == context => Some(*status),
        _ => None,
    })
}

/// Sends `subject`'s first request on `context`, lets the kick send the exchange from the root
/// context, answers it with `exchanged`, and checks the paused request resumed with it.
fn exchange(context: u32, subject: &'static str, exchanged: &str) {
    assert_eq!(send(context, &with_bearer(subject)), Action::Pause, "no copy yet: the request waits");
    let calls = take_calls();
    assert!(callouts(&calls).is_empty(), "an http context never sends the exchange itself: {calls:?}");
    assert!(calls.iter().any(|c| matches!(c, Call::Enqueue(_))), "it kicks its own root context: {calls:?}");

    deliver_queues();
    let calls = take_calls();
    let sent = callouts(&calls);
    assert_eq!(sent.len(), 1, "{calls:?}");
    assert!(calls.contains(&Call::Callout { context: ROOT, cluster: "idp".into(), token: sent[0] }), "{calls:?}");
    let body = callout_body(sent[0]);
    assert_eq!(form_value(&body, "grant_type").as_deref(), Some(GRANT));
    assert_eq!(form_value(&body, "subject_token").as_deref(), Some(subject), "the subject token from VM memory");

    answer(ROOT, sent[0], b"200", &answer_body(exchanged));
    deliver_queues();
    let calls = take_calls();
    let header = format!("Bearer {exchanged}");
    assert!(calls.contains(&Call::ReplaceHeader { context, name: "authorization".into(), value: header }), "{calls:?}");
    assert!(calls.contains(&Call::Continue(context)), "{calls:?}");
}

#[test]
fn each_subject_is_exchanged_once_from_the_root_context_and_then_hits_its_own_copy() {
    assert!(start_root(ROOT, &config("{}")));
    take_calls();
    exchange(10, "subject-a", "ex-a");
    exchange(11, "subject-b", "ex-b");
    for (context, subject, exchanged) in
        [(20, "subject-a", "ex-a"), (21, "subject-b", "ex-b"), (22, "subject-a", "ex-a")]
    {
        assert_eq!(send(context, &with_bearer(subject)), Action::Continue);
        let calls = take_calls();
        // The hit: read the subject, write its own token; no shared data, no clock, no callout.
        assert_eq!(
            calls,
            [
                Call::GetHeader(0, "authorization".into()),
                Call::ReplaceHeader { context, name: "authorization".into(), value: format!("Bearer {exchanged}") },
            ],
            "{calls:?}"
        );
    }
}

#[test]
fn a_subject_from_dynamic_metadata_is_exchanged() {
    let te = r#"{"subject": {"metadata": {"namespace": "auth", "key": "subject"}}}"#;
    assert!(start_root(ROOT, &config(te)));
    take_calls();
    let headers = vec![(":path", b"/api".to_vec())];
    set_property(10, &["metadata", "filter_metadata", "auth", "subject"], b"subject-m");
    assert_eq!(send(10, &headers), Action::Pause);
    deliver_queues();
    let sent = callouts(&take_calls());
    assert_eq!(sent.len(), 1);
    assert_eq!(form_value(&callout_body(sent[0]), "subject_token").as_deref(), Some("subject-m"));
    answer(ROOT, sent[0], b"200", &answer_body("ex-m"));
    deliver_queues();
    assert_eq!(fake_envoy::request_header(10, "authorization").as_deref(), Some(&b"Bearer ex-m"[..]));
    // No metadata: no subject, refused.
    assert_eq!(send(11, &headers), Action::Pause);
    assert_eq!(local_reply(&take_calls(), 11), Some(401));
}

#[test]
fn the_jwt_authn_verified_mode_reads_its_metadata_and_refuses_without_it() {
    assert!(start_root(ROOT, &config(r#"{"verified_by_jwt_authn": "jwt_payload"}"#)));
    take_calls();
    assert_eq!(send(10, &with_bearer("subject-a")), Action::Pause);
    let calls = take_calls();
    assert_eq!(local_reply(&calls, 10), Some(401), "no jwt_authn payload: unverified: {calls:?}");
    assert!(
        calls.contains(&Call::GetProperty(
            "metadata\0filter_metadata\0envoy.filters.http.jwt_authn\0jwt_payload".into()
        )),
        "{calls:?}"
    );
    assert!(callouts(&calls).is_empty() && !calls.iter().any(|c| matches!(c, Call::Enqueue(_))), "{calls:?}");

    set_property(11, &["metadata", "filter_metadata", "envoy.filters.http.jwt_authn", "jwt_payload"], b"\x01\0\0\0");
    exchange(11, "subject-a", "ex-a");
}

#[test]
fn a_request_without_a_subject_gets_the_refusal_and_no_exchange() {
    assert!(start_root(ROOT, &config("{}")));
    let defined: Vec<String> =
        take_calls().into_iter().filter_map(|c| if let Call::DefineMetric(n) = c { Some(n) } else { None }).collect();
    let Some(missing_id) = defined.iter().position(|n| n == "oauth2_cc.ex.subject_missing") else {
        panic!("an exchange profile defines its refusal counters: {defined:?}")
    };
    let headers = vec![(":path", b"/api".to_vec()), ("authorization", b"Basic c3ZjOng=".to_vec())];
    assert_eq!(send(10, &headers), Action::Pause);
    let calls = take_calls();
    assert_eq!(local_reply(&calls, 10), Some(401), "{calls:?}");
    assert!(!calls.iter().any(|c| matches!(c, Call::SetShared(_) | Call::Enqueue(_))), "{calls:?}");
    // The fake numbers metrics from 1 in the order they are defined.
    assert!(calls.contains(&Call::IncrementMetric(missing_id as u32 + 1, 1)), "counted: {calls:?}");
}

#[test]
fn the_limiter_refuses_a_paused_request_with_429() {
    assert!(start_root(ROOT, &config(r#"{"limits": {"exchanges_per_second": 1, "burst": 1, "max_in_flight": 1}}"#)));
    take_calls();
    exchange(10, "subject-a", "ex-a");
    assert_eq!(send(11, &with_bearer("subject-b")), Action::Pause);
    deliver_queues();
    let calls = take_calls();
    assert!(callouts(&calls).is_empty(), "the bucket is empty: no exchange: {calls:?}");
    assert_eq!(local_reply(&calls, 11), Some(429), "{calls:?}");
}

#[test]
fn an_upstream_401_purges_that_subjects_token_only() {
    assert!(start_root(ROOT, &config("{}")));
    take_calls();
    exchange(10, "subject-a", "ex-a");
    exchange(11, "subject-b", "ex-b");
    assert_eq!(send(20, &with_bearer("subject-a")), Action::Continue);
    take_calls();
    assert_eq!(fake_envoy::response(20, b"401"), Action::Continue);
    let calls = take_calls();
    assert!(
        calls.iter().any(|c| matches!(c, Call::SetShared(k) if k.starts_with("oauth2_cc.v1.token.ex."))),
        "the 401 drops subject-a's entry from its set: {calls:?}"
    );
    deliver_queues();
    take_calls();
    // subject-a misses and waits for a new exchange; subject-b still hits its own copy.
    assert_eq!(send(21, &with_bearer("subject-a")), Action::Pause);
    assert_eq!(send(22, &with_bearer("subject-b")), Action::Continue);
    assert_eq!(fake_envoy::request_header(22, "authorization").as_deref(), Some(&b"Bearer ex-b"[..]));
}
