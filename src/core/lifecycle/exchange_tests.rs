//! Unit tests of token exchange in the driver: drivers over one in-memory store with Envoy's CAS
//! rules, subjects that must never get each other's tokens.

use std::sync::Arc;

use super::store::memory::MemoryStore;
use super::*;
use crate::config::{self, Config};
use crate::exchange::set::{SubjectSet, limit_key, set_key};
use crate::exchange::{Refusal, Subject};

const TE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

fn config_with(token_exchange: &str, profile_extra: &str) -> Arc<Config> {
    let json = format!(
        r#"{{"profiles": {{
            "x": {{"cluster": "idp", "token_url": "http://idp.test/token", "client_id": "gw",
                   "client_secret": "s3cret", "timeout_ms": 1000, "grant_type": "{TE}", "audience": "tools",
                   "token_exchange": {token_exchange} {profile_extra}}},
            "y": {{"cluster": "idp", "token_url": "http://idp.test/token", "client_id": "workload",
                   "client_secret": "s3cret"}}}},
            "routes": [{{"match": {{"path_prefix": "/"}}, "profile": "x"}}]}}"#
    );
    match config::parse(json.as_bytes(), &|_| None) {
        Ok(config) => Arc::new(config),
        Err(error) => panic!("test config refused: {error}"),
    }
}

fn sends(actions: &[Action]) -> Vec<&Callout> {
    actions.iter().filter_map(|a| if let Action::Send(c) = a { Some(c) } else { None }).collect()
}

fn body_param(callout: &Callout, name: &str) -> Option<String> {
    form_urlencoded::parse(callout.body.as_deref()?).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// The IdP's answer: a token naming the subject it was exchanged for.
fn exchanged_for(callout: &Callout, expires_in: u64) -> Vec<u8> {
    let subject = body_param(callout, "subject_token").unwrap_or_default();
    format!(r#"{{"access_token":"x-{subject}","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":{expires_in}}}"#)
        .into_bytes()
}

fn answer<'a>(status: &'a [u8], body: &'a [u8]) -> Answer<'a> {
    Answer { status: Some(status), retry_after: None, body: AnswerBody::Bytes(body) }
}

fn resumed(actions: &[Action]) -> Vec<(RequestId, String)> {
    actions
        .iter()
        .filter_map(
            |a| if let Action::Resume { request, value, .. } = a { Some((*request, value.clone())) } else { None },
        )
        .collect()
}

fn vms(config: &Arc<Config>, store: &mut MemoryStore, n: u64) -> Vec<Driver> {
    (1..=n)
        .map(|holder| {
            let (mut vm, _) = Driver::new(Arc::clone(config), holder, 0, store);
            vm.set_serves_requests();
            vm
        })
        .collect()
}

#[test]
fn one_exchange_per_subject_across_vms_and_each_subject_gets_its_own_token() {
    let config = config_with("{}", "");
    let mut store = MemoryStore::default();
    let mut vms = vms(&config, &mut store, 2);
    let alice = Subject::new("alice-token");
    let bob = Subject::new("bob-token");
    assert_eq!(vms[0].on_subject_request(0, 1, &alice, 10, &mut store).0, RequestOutcome::Wait);
    assert_eq!(vms[1].on_subject_request(0, 2, &alice, 10, &mut store).0, RequestOutcome::Wait);
    assert_eq!(vms[1].on_subject_request(0, 3, &bob, 10, &mut store).0, RequestOutcome::Wait);
    let first = vms[0].on_wake(&[0], 11, &mut store);
    let second = vms[1].on_wake(&[0], 11, &mut store);
    let (first, second) = (sends(&first), sends(&second));
    assert_eq!((first.len(), second.len()), (1, 1), "alice once (VM 0 won her lease), bob once: {first:?} {second:?}");
    assert_eq!(body_param(first[0], "subject_token").as_deref(), Some("alice-token"));
    assert_eq!(body_param(second[0], "subject_token").as_deref(), Some("bob-token"));
    assert_eq!(body_param(first[0], "grant_type").as_deref(), Some(TE));
    assert_eq!(body_param(first[0], "audience").as_deref(), Some("tools"));
    let mut landed = vms[0].on_answer(first[0].id, answer(b"200", &exchanged_for(first[0], 100)), 50, &mut store);
    landed.extend(vms[1].on_answer(second[0].id, answer(b"200", &exchanged_for(second[0], 100)), 50, &mut store));
    let mut all = Vec::new();
    for vm in &mut vms {
        all.extend(resumed(&vm.on_wake(&[], 51, &mut store)));
    }
    all.sort();
    assert_eq!(
        all,
        vec![(1, "Bearer x-alice-token".into()), (2, "Bearer x-alice-token".into()), (3, "Bearer x-bob-token".into())]
    );
    // The hit path: each VM's copy per subject, never another subject's.
    assert_eq!(
        vms[0].cached_subject(0, alice.bytes()).map(|c| c.snapshot.header_value.as_str()),
        Some("Bearer x-alice-token")
    );
    assert_eq!(
        vms[1].cached_subject(0, bob.bytes()).map(|c| c.snapshot.header_value.as_str()),
        Some("Bearer x-bob-token")
    );
    assert!(vms[0].cached_subject(0, b"carol").is_none());
    // A later request of alice on VM 1 is injected from the store.
    let (outcome, _) = vms[1].on_subject_request(0, 4, &alice, 60, &mut store);
    assert!(
        matches!(outcome, RequestOutcome::Inject { ref value, .. } if value == "Bearer x-alice-token"),
        "{outcome:?}"
    );
}

#[test]
fn refresh_happens_on_demand_with_the_callers_subject_token() {
    let config = config_with("{}", "");
    let mut store = MemoryStore::default();
    let mut vm = vms(&config, &mut store, 1).remove(0);
    let alice = Subject::new("alice-token");
    let _ = vm.on_subject_request(0, 1, &alice, 0, &mut store);
    let sent = vm.on_wake(&[0], 0, &mut store);
    let call = sends(&sent)[0].clone();
    let _ = vm.on_answer(call.id, answer(b"200", &exchanged_for(&call, 100)), 10, &mut store);
    let _ = vm.on_wake(&[], 10, &mut store);
    // Ticks never refresh a subject on their own, even long past its refresh time.
    for now in [50_000, 81_000, 90_000] {
        let ticked = vm.on_tick(now, &mut store);
        let exchanges = sends(&ticked).into_iter().filter(|c| body_param(c, "subject_token").is_some()).count();
        assert_eq!(exchanges, 0, "no background refresh at {now}");
    }
    assert!(vm.cached_subject(0, alice.bytes()).is_none(), "the copy ends at the refresh time");
    let (outcome, actions) = vm.on_subject_request(0, 2, &alice, 90_000, &mut store);
    assert!(matches!(outcome, RequestOutcome::Inject { .. }), "the still-usable token, at once: {outcome:?}");
    assert!(actions.contains(&Action::Kick { profile: 0 }), "{actions:?}");
    let refresh = vm.on_wake(&[0], 90_001, &mut store);
    assert_eq!(sends(&refresh).len(), 1, "{refresh:?}");
    assert_eq!(body_param(sends(&refresh)[0], "subject_token").as_deref(), Some("alice-token"));
}

/// A compact JWS whose payload is `{"exp": exp_s}` (unsigned: only the expiry is read).
fn jws_expiring(exp_s: u64) -> String {
    use base64::Engine;
    let payload =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp_s},"sub":"alice"}}"#));
    format!("eyJhbGciOiJub25lIn0.{payload}.c2ln")
}

#[test]
fn the_subject_tokens_expiry_caps_the_exchanged_one_and_an_expired_subject_is_refused() {
    let config = config_with("{}", "");
    let mut store = MemoryStore::default();
    let mut vm = vms(&config, &mut store, 1).remove(0);
    let subject = Subject::new(&jws_expiring(20));
    let _ = vm.on_subject_request(0, 1, &subject, 0, &mut store);
    let sent = vm.on_wake(&[0], 0, &mut store);
    let call = sends(&sent)[0].clone();
    // An opaque token (no `exp` of its own) that the IdP says lives an hour.
    let opaque = br#"{"access_token":"opaque-x","token_type":"Bearer","expires_in":3600}"#;
    let _ = vm.on_answer(call.id, answer(b"200", opaque), 10, &mut store);
    let set = SubjectSet::decode(
        store.get(&set_key(&config.profiles[0].cache_key, subject.key().set_index(128))).0.as_deref(),
    );
    let stored = set.find(&subject.key()).map(|e| e.entry.clone()).unwrap_or_default();
    assert_eq!(stored.expires_at_ms, 19_000, "20 s less the 1 s margin, not an hour: {stored:?}");
    let (outcome, _) = vm.on_subject_request(0, 2, &subject, 18_999, &mut store);
    assert!(matches!(outcome, RequestOutcome::Inject { .. }), "usable until its cap: {outcome:?}");
    // From the cap on, never injected and never exchanged again: a new token could not outlive it.
    for (request, now_ms) in [(3, 19_000), (4, 19_500), (5, 20_000)] {
        let (outcome, actions) = vm.on_subject_request(0, request, &subject, now_ms, &mut store);
        assert_eq!(outcome, RequestOutcome::Refuse(Refusal::SubjectRejected), "at {now_ms} ms");
        assert!(actions.contains(&Action::Count { profile: 0, metric: Refusal::SubjectRejected.metric() }));
        assert!(!actions.iter().any(|a| matches!(a, Action::Kick { .. })), "at {now_ms} ms: {actions:?}");
    }
    let later = vm.on_wake(&[0], 20_001, &mut store);
    assert!(
        sends(&later).iter().all(|c| body_param(c, "subject_token") != Some(jws_expiring(20))),
        "never exchanged once expired"
    );
}

#[test]
fn the_limits_refuse_new_subjects_with_429_but_keep_serving_usable_tokens() {
    let config = config_with(r#"{"limits": {"exchanges_per_second": 1, "burst": 2, "max_in_flight": 8}}"#, "");
    let mut store = MemoryStore::default();
    let mut vm = vms(&config, &mut store, 1).remove(0);
    let subjects: Vec<Subject> = (0..4).map(|n| Subject::new(&format!("subject-{n}"))).collect();
    for (n, subject) in subjects.iter().enumerate() {
        assert_eq!(vm.on_subject_request(0, n as u64, subject, 0, &mut store).0, RequestOutcome::Wait);
    }
    let actions = vm.on_wake(&[0], 0, &mut store);
    assert_eq!(sends(&actions).len(), 2, "the burst: {actions:?}");
    let refused: Vec<RequestId> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Refuse { request, refusal: Refusal::ExchangeLimited, .. } => Some(*request),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 2, "{actions:?}");
    let counted = actions
        .iter()
        .filter(|a| **a == Action::Count { profile: 0, metric: Refusal::ExchangeLimited.metric() })
        .count();
    assert_eq!(counted, 2);
    assert_eq!(vm.waiting(), 2);
    // A second later, one more token in the bucket: one more exchange.
    let _ = vm.on_subject_request(0, 10, &Subject::new("subject-new"), 1_000, &mut store);
    assert_eq!(sends(&vm.on_wake(&[0], 1_000, &mut store)).len(), 1);
}

#[test]
fn in_flight_permits_bound_concurrent_exchanges_and_come_back() {
    let config = config_with(r#"{"limits": {"exchanges_per_second": 1000, "max_in_flight": 2}}"#, "");
    let mut store = MemoryStore::default();
    let mut vms = vms(&config, &mut store, 2);
    let subjects: Vec<Subject> = (0..3).map(|n| Subject::new(&format!("s{n}"))).collect();
    let _ = vms[0].on_subject_request(0, 1, &subjects[0], 0, &mut store);
    let _ = vms[1].on_subject_request(0, 2, &subjects[1], 0, &mut store);
    let a = vms[0].on_wake(&[0], 0, &mut store);
    let b = vms[1].on_wake(&[0], 0, &mut store);
    assert_eq!(sends(&a).len() + sends(&b).len(), 2);
    let _ = vms[0].on_subject_request(0, 3, &subjects[2], 1, &mut store);
    let c = vms[0].on_wake(&[0], 1, &mut store);
    assert!(sends(&c).is_empty(), "two in flight already: {c:?}");
    assert!(c.iter().any(|x| matches!(x, Action::Refuse { request: 3, refusal: Refusal::ExchangeLimited, .. })));
    let call = sends(&a)[0].clone();
    let _ = vms[0].on_answer(call.id, answer(b"200", &exchanged_for(&call, 100)), 5, &mut store);
    let _ = vms[0].on_subject_request(0, 4, &subjects[2], 6, &mut store);
    assert_eq!(sends(&vms[0].on_wake(&[0], 6, &mut store)).len(), 1, "the permit came back");
    let limiter = crate::exchange::limiter::Limiter::decode(
        store.get(&limit_key(&config.profiles[0].cache_key)).0.as_deref(),
        &crate::config::ExchangeLimits { per_second: 1000, burst: 2000, max_in_flight: 2 },
        6,
    );
    assert_eq!(limiter.in_flight(6), 2);
}

#[test]
fn a_refused_subject_token_gets_401_and_other_subjects_carry_on() {
    // RFC 8693 §2.2.2 answers a subject token it refuses with invalid_request; some IdPs say
    // invalid_grant: either refuses this subject only.
    for code in ["invalid_request", "invalid_grant"] {
        refused_subject_token(code);
    }
}

fn refused_subject_token(code: &str) {
    let config = config_with("{}", "");
    let mut store = MemoryStore::default();
    let mut vm = vms(&config, &mut store, 1).remove(0);
    let mallory = Subject::new("forged");
    let alice = Subject::new("alice-token");
    let _ = vm.on_subject_request(0, 1, &mallory, 0, &mut store);
    let sent = vm.on_wake(&[0], 0, &mut store);
    let call = sends(&sent)[0].clone();
    let error = format!(r#"{{"error":"{code}","error_description":"subject token invalid"}}"#);
    let mut actions = vm.on_answer(call.id, answer(b"400", error.as_bytes()), 10, &mut store);
    actions.extend(vm.on_wake(&[], 11, &mut store));
    assert!(
        actions.iter().any(|a| matches!(a, Action::Refuse { request: 1, refusal: Refusal::SubjectRejected, .. })),
        "{code}: {actions:?}"
    );
    assert!(actions.contains(&Action::Count { profile: 0, metric: Metric::FetchFailed(code.into()) }));
    let (outcome, _) = vm.on_subject_request(0, 2, &mallory, 12, &mut store);
    assert_eq!(outcome, RequestOutcome::Refuse(Refusal::SubjectRejected), "while the backoff runs");
    assert_eq!(vm.on_subject_request(0, 3, &alice, 12, &mut store).0, RequestOutcome::Wait, "alice is not backed off");
    assert_eq!(sends(&vm.on_wake(&[0], 12, &mut store)).len(), 1);
}

#[test]
fn the_store_stays_bounded_whatever_the_number_of_subjects() {
    let config = config_with(
        r#"{"cache": {"max_subjects": 16, "max_bytes": 65536}, "limits": {"exchanges_per_second": 100000, "burst": 1000000, "max_in_flight": 256}}"#,
        "",
    );
    let te = config.profiles[0].exchange.clone().expect("exchange");
    let mut store = MemoryStore::default();
    let mut vm = vms(&config, &mut store, 1).remove(0);
    let mut now = 0;
    for n in 0..1_000u64 {
        let subject = Subject::new(&format!("subject-{n}"));
        now += 1;
        let _ = vm.on_subject_request(0, n, &subject, now, &mut store);
        for call in sends(&vm.on_wake(&[0], now, &mut store)) {
            let _ = vm.on_answer(call.id, answer(b"200", &exchanged_for(call, 100)), now, &mut store);
        }
        let _ = vm.on_wake(&[], now, &mut store);
    }
    let keys: Vec<&String> = store.map.keys().collect();
    assert!(keys.len() <= te.cache.sets + 2, "{} keys: {keys:?}", keys.len());
    for index in 0..te.cache.sets {
        let bytes = store.get(&set_key(&config.profiles[0].cache_key, index)).0.unwrap_or_default();
        assert!(bytes.len() <= te.cache.set_bytes, "set {index}: {} bytes", bytes.len());
        assert!(SubjectSet::decode(Some(&bytes)).entries.len() <= 8);
    }
    assert!(vm.subject_copies.len(0) <= 16, "copies bounded too: {}", vm.subject_copies.len(0));
    // The most recent subject is still cached, and only with its own token.
    let last = Subject::new("subject-999");
    let (outcome, _) = vm.on_subject_request(0, 5_000, &last, now, &mut store);
    assert!(
        matches!(outcome, RequestOutcome::Inject { ref value, .. } if value == "Bearer x-subject-999"),
        "{outcome:?}"
    );
}

#[test]
fn an_upstream_401_drops_that_subjects_token_on_every_vm() {
    let config = config_with("{}", "");
    let mut store = MemoryStore::default();
    let mut vms = vms(&config, &mut store, 2);
    let alice = Subject::new("alice-token");
    let bob = Subject::new("bob-token");
    for (request, subject) in [(1, &alice), (11, &bob)] {
        let _ = vms[0].on_subject_request(0, request, subject, 0, &mut store);
        for call in sends(&vms[0].on_wake(&[0], 0, &mut store)) {
            let _ = vms[0].on_answer(call.id, answer(b"200", &exchanged_for(call, 100)), 1, &mut store);
        }
    }
    let (outcome, _) = vms[1].on_subject_request(0, 2, &alice, 2, &mut store);
    let RequestOutcome::Inject { generation, .. } = outcome else { panic!("{outcome:?}") };
    assert!(vms[1].cached_subject(0, alice.bytes()).is_some());
    let actions = vms[0].on_subject_status(0, &alice.key(), generation, Some(b"401"), 3, &mut store);
    assert!(
        actions.contains(&Action::BroadcastWake)
            && actions.contains(&Action::Count { profile: 0, metric: Metric::Purged })
    );
    let _ = vms[1].on_wake(&[], 4, &mut store);
    assert!(vms[1].cached_subject(0, alice.bytes()).is_none(), "the other VM dropped its copies");
    assert_eq!(vms[1].on_subject_request(0, 3, &alice, 5, &mut store).0, RequestOutcome::Wait);
    assert!(
        matches!(vms[1].on_subject_request(0, 4, &bob, 5, &mut store).0, RequestOutcome::Inject { .. }),
        "bob keeps his"
    );
}

#[test]
fn the_actor_token_is_another_profiles_token_fetched_first() {
    let config = config_with(r#"{"actor": {"profile": "y"}}"#, "");
    let mut store = MemoryStore::default();
    let mut vm = vms(&config, &mut store, 1).remove(0);
    let alice = Subject::new("alice-token");
    let _ = vm.on_subject_request(0, 1, &alice, 0, &mut store);
    let first = vm.on_wake(&[0], 0, &mut store);
    let sent = sends(&first);
    assert_eq!(sent.len(), 1, "the actor's client-credentials token first: {first:?}");
    assert_eq!(body_param(sent[0], "grant_type").as_deref(), Some("client_credentials"));
    let body = br#"{"access_token":"workload-token","expires_in":100}"#;
    let landed = vm.on_answer(sent[0].id, answer(b"200", body), 5, &mut store);
    assert!(landed.contains(&Action::BroadcastWake));
    let next = vm.on_wake(&[], 6, &mut store);
    let exchange = sends(&next);
    assert_eq!(exchange.len(), 1, "{next:?}");
    assert_eq!(body_param(exchange[0], "actor_token").as_deref(), Some("workload-token"));
    assert_eq!(body_param(exchange[0], "subject_token").as_deref(), Some("alice-token"));
}

#[test]
fn no_subject_token_or_digest_in_logs_or_debug_output() {
    let config = config_with("{}", "");
    let mut store = MemoryStore::default();
    let mut vm = vms(&config, &mut store, 1).remove(0);
    let subject = Subject::new("very-secret-subject");
    let hex: String = subject.key().0.iter().map(|b| format!("{b:02x}")).collect();
    let mut all = Vec::new();
    let (_, actions) = vm.on_subject_request(0, 1, &subject, 0, &mut store);
    all.extend(actions);
    let sent = vm.on_wake(&[0], 0, &mut store);
    let call = sends(&sent)[0].clone();
    all.extend(sent.clone());
    all.extend(vm.on_answer(call.id, answer(b"400", br#"{"error":"invalid_grant"}"#), 1, &mut store));
    all.extend(vm.on_wake(&[], 2, &mut store));
    let text = format!("{all:?} {subject:?} {:?} {:?}", subject.key(), vm.subject_copies);
    for needle in ["very-secret-subject", &hex[..16], &hex[hex.len() - 16..]] {
        assert!(!text.contains(needle), "{needle} in {text}");
    }
}
