//! Unit tests of the driver: two or more drivers over one in-memory store with Envoy's CAS rules.

use std::sync::Arc;

use super::store::memory::MemoryStore;
use super::*;
use crate::cache::Entry;
use crate::config::{self, Config};

fn config_with(profile_extra: &str) -> Arc<Config> {
    config_at(r#""token_url": "http://idp.test/token""#, profile_extra)
}

fn config_at(endpoint: &str, profile_extra: &str) -> Arc<Config> {
    config_top(endpoint, "", profile_extra)
}

/// `top_extra` goes before `profiles` and ends with a comma.
fn config_top(endpoint: &str, top_extra: &str, profile_extra: &str) -> Arc<Config> {
    let json = format!(
        r#"{{{top_extra} "profiles": {{"p": {{"cluster": "idp", {endpoint},
            "client_id": "svc", "client_secret": "s3cret", "timeout_ms": 1000 {profile_extra}}}}},
            "routes": [{{"match": {{"path_prefix": "/"}}, "profile": "p"}}]}}"#
    );
    match config::parse(json.as_bytes(), &|_| None) {
        Ok(config) => Arc::new(config),
        Err(error) => panic!("test config refused: {error}"),
    }
}

fn sends(actions: &[Action]) -> Vec<&Callout> {
    actions.iter().filter_map(|a| if let Action::Send(c) = a { Some(c) } else { None }).collect()
}

fn logs(actions: &[Action]) -> Vec<&str> {
    actions
        .iter()
        .filter_map(|a| if let Action::Log { message, .. } = a { Some(message.as_str()) } else { None })
        .collect()
}

fn ok_body(token: &str, expires_in: u64) -> Vec<u8> {
    format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{expires_in}}}"#).into_bytes()
}

fn answer<'a>(status: &'a [u8], body: &'a [u8]) -> Answer<'a> {
    Answer { status: Some(status), retry_after: None, body: AnswerBody::Bytes(body) }
}

fn entry(store: &MemoryStore, config: &Config) -> Entry {
    read_entry(store, &config.profiles[0].cache_key)
}

#[test]
fn one_token_request_for_many_vms_then_every_vm_serves_the_token() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let mut vms: Vec<Driver> =
        (1..=4).map(|holder| Driver::new(Arc::clone(&config), holder, 0, &mut store).0).collect();
    let mut sent = Vec::new();
    for vm in &mut vms {
        sent.extend(sends(&vm.on_tick(10, &mut store)).into_iter().map(|c| c.id));
    }
    assert_eq!(sent.len(), 1, "one VM claims the lease, the others see it: {sent:?}");
    let actions = vms[0].on_answer(sent[0], answer(b"200", &ok_body("tok", 100)), 60, &mut store);
    assert!(actions.contains(&Action::BroadcastWake), "{actions:?}");
    assert!(actions.contains(&Action::Count { profile: 0, metric: Metric::FetchOk }));
    for vm in &mut vms {
        let _ = vm.on_wake(&[], 70, &mut store);
        let cached = vm.cached(0).map(|s| s.header_value.clone());
        assert_eq!(cached.as_deref(), Some("Bearer tok"));
    }
    let stored = entry(&store, &config);
    assert_eq!((stored.lease_holder, stored.budget_used), (0, 1), "{stored:?}");
}

#[test]
fn a_paused_request_is_kicked_resumed_and_a_late_answer_ignored() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 9, 0, &mut store);
    vm.set_serves_requests();
    let (outcome, actions) = vm.on_request(0, 77, 5, &mut store);
    assert_eq!(outcome, RequestOutcome::Wait);
    assert!(actions.contains(&Action::Kick { profile: 0 }), "{actions:?}");
    let kicked = vm.on_wake(&[0], 6, &mut store);
    let ids: Vec<CalloutId> = sends(&kicked).iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), 1, "{kicked:?}");
    let landed = vm.on_answer(ids[0], answer(b"200", &ok_body("tok", 100)), 50, &mut store);
    let settled = vm.on_wake(&[], 51, &mut store);
    let resumed = landed.iter().chain(&settled).filter(|a| matches!(a, Action::Resume { request: 77, .. })).count();
    assert_eq!(resumed, 1, "landed {landed:?} settled {settled:?}");
    assert_eq!(vm.waiting(), 0);
    let duplicate = vm.on_answer(ids[0], answer(b"200", &ok_body("other", 100)), 52, &mut store);
    assert!(duplicate.is_empty(), "a duplicate answer does nothing: {duplicate:?}");
}

#[test]
fn a_request_that_waits_too_long_is_failed_and_the_paused_limit_holds() {
    let endpoint = r#""token_url": "http://idp.test/token""#;
    let config = config_top(endpoint, r#""max_paused_requests": 2,"#, r#", "max_wait_ms": 100"#);
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 9, 0, &mut store);
    assert_eq!(vm.on_request(0, 1, 0, &mut store).0, RequestOutcome::Wait);
    assert_eq!(vm.on_request(0, 2, 0, &mut store).0, RequestOutcome::Wait);
    let (outcome, actions) = vm.on_request(0, 3, 0, &mut store);
    assert_eq!(outcome, RequestOutcome::Fail, "a third waiter beyond max_paused_requests 2: {actions:?}");
    assert!(actions.contains(&Action::Count { profile: 0, metric: Metric::FailedRequest }), "{actions:?}");
    assert_eq!(vm.waiting(), 2);
    let settled = vm.on_tick(99, &mut store);
    assert!(!settled.iter().any(|a| matches!(a, Action::Fail { .. })), "{settled:?}");
    let settled = vm.on_tick(100, &mut store);
    let failed: Vec<&Action> = settled.iter().filter(|a| matches!(a, Action::Fail { .. })).collect();
    assert_eq!(
        failed,
        [&Action::Fail { request: 1, profile: 0 }, &Action::Fail { request: 2, profile: 0 }],
        "{settled:?}"
    );
    assert_eq!(vm.waiting(), 0);
}

#[test]
fn a_lost_compare_and_swap_never_sends() {
    struct Contended(MemoryStore);
    impl Environment for Contended {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            self.0.get(key)
        }
        fn set(&mut self, _: &str, _: &[u8], _: Option<u32>) -> Written {
            Written::CasMismatch
        }
        fn random_u64(&mut self) -> u64 {
            1
        }
    }
    let config = config_with(r#", "max_fetches_per_hour": 1"#);
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    let mut contended = Contended(store);
    let actions = vm.on_tick(10, &mut contended);
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert!(logs(&actions).iter().any(|l| l.contains("contended")), "{actions:?}");
    assert_eq!(entry(&contended.0, &config).budget_used, 0, "the budget counts only sent requests");
}

#[test]
fn an_unknown_cluster_is_one_clear_failure() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    let id = sends(&vm.on_tick(10, &mut store))[0].id;
    let actions = vm.on_send_failed(id, 11, &mut store);
    assert!(actions.contains(&Action::Count { profile: 0, metric: Metric::FetchFailed("no_cluster".into()) }));
    let lines = logs(&actions);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("\"idp\"") && !lines[0].contains("no response"), "{lines:?}");
    let delay = entry(&store, &config).retry_at_ms.saturating_sub(11);
    // Retrying soon cannot make a missing cluster appear: the longest ceiling (60 s), equal jitter.
    assert!((30_000..=60_000).contains(&delay), "a configuration fault's backoff: {delay} ms");
}

#[test]
fn retry_after_as_an_http_date_is_a_floor() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 784_111_770_000, &mut store);
    let now = 784_111_777_000; // Sun, 06 Nov 1994 08:49:37 GMT
    let id = sends(&vm.on_tick(now, &mut store))[0].id;
    let busy = Answer {
        status: Some(b"429"),
        retry_after: Some(b"Sun, 06 Nov 1994 08:50:37 GMT"),
        body: AnswerBody::Bytes(b"{}"),
    };
    let _ = vm.on_answer(id, busy, now, &mut store);
    assert!(entry(&store, &config).retry_at_ms >= now + 60_000, "{:?}", entry(&store, &config));
}

/// How long after a first 429 with this `Retry-After` the store says to try again.
fn delay_after_a_429(retry_after: Option<&[u8]>) -> u64 {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    let id = sends(&vm.on_tick(10, &mut store))[0].id;
    let busy = Answer { status: Some(b"429"), retry_after, body: AnswerBody::Bytes(b"") };
    let _ = vm.on_answer(id, busy, 20, &mut store);
    let stored = entry(&store, &config);
    assert_eq!(stored.failures, 1, "{stored:?}");
    stored.retry_at_ms - 20
}

#[test]
fn a_non_utf8_retry_after_is_ignored_and_a_valid_one_honoured() {
    // A first transient failure with the default policy (base 1 s): equal jitter puts the next try in
    // [0.5 s, 1 s], whatever the jitter draw.
    let normal = delay_after_a_429(None);
    assert!((500..=1_000).contains(&normal), "the normal backoff: {normal} ms");
    let hostile = delay_after_a_429(Some(b"\xff\xfe"));
    assert!(
        (500..=1_000).contains(&hostile),
        "a non-UTF-8 Retry-After leaves the normal backoff (not zero, not the one-hour cap): {hostile} ms"
    );
    let honoured = delay_after_a_429(Some(b"120"));
    assert_eq!(honoured, 120_000, "a valid Retry-After of 120 s is the floor");
}

#[test]
fn a_discovery_lease_covers_the_whole_chain() {
    let config = config_at(r#""issuer": "http://idp.test""#, "");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    let actions = vm.on_tick(10, &mut store);
    assert_eq!(sends(&actions).len(), 1);
    let stored = entry(&store, &config);
    assert!(stored.lease_until_ms >= 10 + 3 * 1_000, "lease until {} for three 1 s requests", stored.lease_until_ms);
}

#[test]
fn a_reconfiguration_that_changes_the_cache_key_fails_waiters_and_orphans_fetches() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    let _ = vm.on_request(0, 5, 1, &mut store);
    let id = sends(&vm.on_wake(&[0], 2, &mut store))[0].id;
    let same = vm.reconfigure(config_with(r#", "max_wait_ms": 9000"#), 3, &mut store);
    assert!(!same.iter().any(|a| matches!(a, Action::Fail { .. })), "same cache key keeps the waiter: {same:?}");
    let changed = vm.reconfigure(config_with(r#", "scopes": ["other"]"#), 4, &mut store);
    assert!(changed.contains(&Action::Fail { request: 5, profile: 0 }), "{changed:?}");
    let late = vm.on_answer(id, answer(b"200", &ok_body("old", 100)), 5, &mut store);
    assert!(late.is_empty(), "an answer for the old cache key is ignored: {late:?}");
    assert!(vm.cached(0).is_none());
}

#[test]
fn a_rejected_token_is_purged_once() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    let id = sends(&vm.on_tick(10, &mut store))[0].id;
    let _ = vm.on_answer(id, answer(b"200", &ok_body("tok", 100)), 20, &mut store);
    let generation = entry(&store, &config).generation;
    let hostile = vm.on_response_status(0, generation, Some(b"\xff1"), 30, &mut store);
    assert!(hostile.is_empty(), "{hostile:?}");
    let purged = vm.on_response_status(0, generation, Some(b"401"), 30, &mut store);
    assert!(purged.contains(&Action::Count { profile: 0, metric: Metric::Purged }), "{purged:?}");
    assert!(vm.cached(0).is_none());
    let again = vm.on_response_status(0, generation, Some(b"401"), 31, &mut store);
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn a_late_answer_to_an_older_fetch_keeps_the_newer_fetchs_lease() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    let (mut other, _) = Driver::new(Arc::clone(&config), 4, 0, &mut store);
    let old = sends(&vm.on_tick(10, &mut store))[0].id;
    // The first fetch outlives its lease (1 s timeout + 2 s): this VM claims again.
    let newer = sends(&vm.on_tick(3_010, &mut store))[0].id;
    assert_ne!(old, newer);
    let _ = vm.on_answer(old, answer(b"200", &ok_body("late", 100)), 3_100, &mut store);
    let stored = entry(&store, &config);
    assert_eq!((stored.lease_holder, stored.lease_until_ms), (3, 6_010), "the newer fetch's lease: {stored:?}");
    let _ = vm.on_answer(old, answer(b"200", &ok_body("dup", 100)), 3_101, &mut store);
    // The token is still due for refresh only much later, but a purge makes it due now: the other
    // VM must still see the newer fetch's lease and send nothing.
    let generation = stored.generation;
    let _ = vm.on_response_status(0, generation, Some(b"401"), 3_200, &mut store);
    let actions = other.on_tick(3_300, &mut store);
    assert!(sends(&actions).is_empty(), "a second fetch while the newer one holds its lease: {actions:?}");
    let failed = vm.on_answer(newer, answer(b"503", b""), 3_400, &mut store);
    assert!(failed.contains(&Action::BroadcastWake));
    assert_eq!(entry(&store, &config).lease_holder, 0, "the fetch that holds the lease releases it");
}

#[test]
fn a_superseded_cache_key_is_fetched_by_the_newer_configuration_only() {
    let config = config_with("");
    let key = config.profiles[0].cache_key.clone();
    let mut store = MemoryStore::default();
    let (mut old, _) = Driver::new(Arc::clone(&config), 1, 0, &mut store);
    old.set_superseded(vec![key]);
    assert!(sends(&old.on_tick(10, &mut store)).is_empty(), "a superseded key is not prefetched");
    let (outcome, actions) = old.on_request(0, 5, 20, &mut store);
    assert_eq!(outcome, RequestOutcome::Wait);
    assert!(sends(&old.on_wake(&[0], 30, &mut store)).is_empty(), "nor fetched for its own waiter: {actions:?}");
    let (mut new, _) = Driver::new(Arc::clone(&config), 2, 40, &mut store);
    let sent: Vec<CalloutId> = sends(&new.on_tick(50, &mut store)).into_iter().map(|c| c.id).collect();
    assert_eq!(sent.len(), 1, "the newer configuration fetches");
    let _ = new.on_answer(sent[0], answer(b"200", &ok_body("tok-new", 100)), 60, &mut store);
    let resumed = old.on_wake(&[], 70, &mut store);
    assert!(
        resumed.iter().any(|a| matches!(a, Action::Resume { request: 5, .. })),
        "the older configuration's waiter gets the newer one's token: {resumed:?}"
    );
    old.set_superseded(Vec::new());
    let _ = old.on_response_status(0, old.cached(0).map_or(0, |s| s.generation), Some(&b"401"[..]), 80, &mut store);
    assert_eq!(sends(&old.on_tick(90, &mut store)).len(), 1, "no longer superseded: it fetches again");
}

fn gauges(actions: &[Action]) -> Vec<(u64, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Gauge { remaining_s, lifetime_s, .. } => Some((*remaining_s, *lifetime_s)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_lifetime_gauge_outlives_a_purged_or_failed_token() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    let first = vm.on_tick(10, &mut store);
    assert_eq!(gauges(&first), [(0, 0)], "no token yet");
    let _ = vm.on_answer(sends(&first)[0].id, answer(b"200", &ok_body("tok", 100)), 20, &mut store);
    // Sent at 10 ms, 100 s, a 5 s margin: usable until 95.01 s.
    assert_eq!(gauges(&vm.on_tick(1_010, &mut store)), [(94, 95)]);
    let generation = entry(&store, &config).generation;
    let _ = vm.on_response_status(0, generation, Some(b"401"), 2_000, &mut store);
    let refetch = vm.on_tick(2_010, &mut store);
    assert_eq!(gauges(&refetch), [(0, 95)], "purged: no token, the lifetime stays");
    let _ = vm.on_answer(sends(&refetch)[0].id, answer(b"503", b""), 2_100, &mut store);
    assert_eq!(gauges(&vm.on_tick(10_000, &mut store)), [(0, 95)], "the refetch failed");
}

#[test]
fn the_copies_generation_moves_only_when_a_copy_changes() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    let start = vm.copies_generation();
    let sent: Vec<u64> = sends(&vm.on_tick(10, &mut store)).into_iter().map(|c| c.id).collect();
    assert_eq!(vm.copies_generation(), start, "a tick that copied nothing new");
    let _ = vm.on_answer(sent[0], answer(b"200", &ok_body("tok", 100)), 60, &mut store);
    let _ = vm.on_wake(&[], 70, &mut store);
    let with_token = vm.copies_generation();
    assert_ne!(with_token, start, "a new token is a new copy");
    let _ = vm.on_tick(170, &mut store);
    let _ = vm.on_wake(&[], 180, &mut store);
    assert_eq!(vm.copies_generation(), with_token, "ticks and wakes that change nothing");
    let generation = vm.cached(0).map(|s| s.generation).unwrap_or_default();
    let _ = vm.on_response_status(0, generation, Some(b"401"), 200, &mut store);
    assert!(vm.cached(0).is_none());
    assert_ne!(vm.copies_generation(), with_token, "a purge drops the copy");
}

mod wake;
