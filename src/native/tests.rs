//! The native host against a fake Envoy: the callback table is a set of recording functions, so
//! the executor's side of the ABI (what it defines, sends, posts and answers) is checked without
//! a real Envoy (the e2e suite covers that).

use std::ffi::c_void;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use super::abi::{self, Buffer, Callbacks, ConfigHandle, HttpHeader, OnMain, Ptr};
use super::parked::{DELIVERED, Outcome, Parked};
use super::plugin::{EVENT_TICK, EVENT_WAKE, Plugin};
use super::stream::{StreamFilter, Verdict};

/// What the fake Envoy was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Log(u32, String),
    DefineCounter(String),
    DefineGauge(String),
    Increment(usize, u64),
    SetGauge(usize, u64),
    Callout { cluster: String, headers: Vec<(String, String)>, body: Vec<u8> },
    ConfigCommit(u64),
    StreamCommit(u64),
    SetHeader(String, String),
    Reply(u32, String),
}

static CALLS: Mutex<Vec<Call>> = Mutex::new(Vec::new());
/// Tests share the process-wide callback table and store: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());
/// The fake's answer to a callout (0: success).
static CALLOUT_RESULT: Mutex<u32> = Mutex::new(0);

fn record(call: Call) {
    CALLS.lock().unwrap().push(call);
}

fn text(b: Buffer) -> String {
    // SAFETY: the module passes live buffers.
    String::from_utf8_lossy(unsafe { b.as_bytes() }).into_owned()
}

unsafe extern "C" fn log(level: u32, message: Buffer) {
    record(Call::Log(level, text(message)));
}
unsafe extern "C" fn log_enabled(_: u32) -> bool {
    true
}
unsafe extern "C" fn no() -> bool {
    false
}
/// The upstream's `:status` on every response.
static STATUS: Mutex<&'static [u8]> = Mutex::new(b"200");

/// The request's `authorization` header (none by default).
static AUTHORIZATION: Mutex<Option<&'static [u8]>> = Mutex::new(None);

/// Every request is `GET /` (enough for the routes of [`config`]), with [`AUTHORIZATION`].
unsafe extern "C" fn get_header(_: Ptr, _: u32, name: Buffer, out: *mut Buffer, _: usize, _: *mut usize) -> bool {
    static PATH: &[u8] = b"/";
    static METHOD: &[u8] = b"GET";
    let value = match text(name).as_str() {
        ":path" => PATH,
        ":method" => METHOD,
        ":status" => *STATUS.lock().unwrap(),
        "authorization" => match *AUTHORIZATION.lock().unwrap() {
            Some(value) => value,
            None => return false,
        },
        _ => return false,
    };
    // SAFETY: the module passes a live out slot; the value is static.
    unsafe { *out = Buffer::of(value) };
    true
}
unsafe extern "C" fn set_header(_: Ptr, _: u32, name: Buffer, value: Buffer) -> bool {
    record(Call::SetHeader(text(name), text(value)));
    true
}
unsafe extern "C" fn send_response(_: Ptr, status: u32, _: *mut HttpHeader, _: usize, body: Buffer, _: Buffer) {
    record(Call::Reply(status, text(body)));
}
unsafe extern "C" fn continue_decoding(_: Ptr) {}
unsafe extern "C" fn attribute(_: Ptr, _: u32, _: *mut Buffer) -> bool {
    false
}
unsafe extern "C" fn metadata_string(_: Ptr, _: u32, _: Buffer, _: Buffer, _: *mut Buffer) -> bool {
    false
}
unsafe extern "C" fn metadata_keys_count(_: Ptr, _: u32, _: Buffer) -> usize {
    0
}
unsafe extern "C" fn metadata_keys(_: Ptr, _: u32, _: Buffer, _: *mut Buffer) -> bool {
    false
}
unsafe extern "C" fn metadata_bool(_: Ptr, _: u32, _: Buffer, _: Buffer, _: *mut bool) -> bool {
    false
}
/// Schedulers are the address of a static tag: 1 for streams, 2 for the configuration.
static STREAM_TAG: u8 = 1;
static CONFIG_TAG: u8 = 2;
/// Run once, the next time the module makes a stream scheduler (a test's "meanwhile, on the main
/// thread").
static ON_STREAM_SCHEDULER: Mutex<Option<Box<dyn FnOnce() + Send>>> = Mutex::new(None);
unsafe extern "C" fn stream_scheduler_new(_: Ptr) -> Ptr {
    let meanwhile = ON_STREAM_SCHEDULER.lock().unwrap().take();
    if let Some(meanwhile) = meanwhile {
        meanwhile();
    }
    (&raw const STREAM_TAG).cast_mut().cast()
}
unsafe extern "C" fn config_scheduler_new(_: Ptr) -> Ptr {
    (&raw const CONFIG_TAG).cast_mut().cast()
}
unsafe extern "C" fn stream_commit(_: Ptr, event: u64) {
    record(Call::StreamCommit(event));
}
unsafe extern "C" fn config_commit(_: Ptr, event: u64) {
    record(Call::ConfigCommit(event));
}
unsafe extern "C" fn scheduler_delete(_: Ptr) {}
unsafe extern "C" fn callout(
    _: Ptr,
    id: *mut u64,
    cluster: Buffer,
    headers: *mut HttpHeader,
    n: usize,
    body: Buffer,
    _: u64,
) -> u32 {
    // SAFETY: the module passes `n` live headers.
    let list = unsafe { std::slice::from_raw_parts(headers, n) };
    let headers = list
        .iter()
        .map(|h| (text(Buffer { ptr: h.key, len: h.key_len }), text(Buffer { ptr: h.value, len: h.value_len })))
        .collect();
    // SAFETY: as above.
    let body = unsafe { body.as_bytes() }.to_vec();
    record(Call::Callout { cluster: text(cluster), headers, body });
    // SAFETY: the module passes a live id slot.
    unsafe { *id = 77 };
    *CALLOUT_RESULT.lock().unwrap()
}
static NEXT_METRIC: Mutex<usize> = Mutex::new(0);
fn next_metric(id: *mut usize) -> u32 {
    let mut next = NEXT_METRIC.lock().unwrap();
    *next += 1;
    // SAFETY: the module passes a live id slot.
    unsafe { *id = *next };
    abi::METRICS_SUCCESS
}
unsafe extern "C" fn define_counter(_: Ptr, name: Buffer, _: *mut Buffer, _: usize, id: *mut usize) -> u32 {
    record(Call::DefineCounter(text(name)));
    next_metric(id)
}
unsafe extern "C" fn define_gauge(_: Ptr, name: Buffer, _: *mut Buffer, _: usize, id: *mut usize) -> u32 {
    record(Call::DefineGauge(text(name)));
    next_metric(id)
}
unsafe extern "C" fn increment(_: Ptr, id: usize, _: *mut Buffer, _: usize, by: u64) -> u32 {
    record(Call::Increment(id, by));
    abi::METRICS_SUCCESS
}
unsafe extern "C" fn set_gauge(_: Ptr, id: usize, _: *mut Buffer, _: usize, value: u64) -> u32 {
    record(Call::SetGauge(id, value));
    abi::METRICS_SUCCESS
}

/// Installs the fake Envoy and clears what it recorded; hold the guard for the whole test.
fn fake_envoy() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    abi::install(Callbacks {
        log,
        log_enabled,
        is_validation_mode: no,
        get_header,
        set_header,
        send_response,
        continue_decoding,
        get_attribute_string: attribute,
        get_metadata_string: metadata_string,
        get_metadata_bool: metadata_bool,
        get_metadata_keys_count: metadata_keys_count,
        get_metadata_keys: metadata_keys,
        filter_scheduler_new: stream_scheduler_new,
        filter_scheduler_commit: stream_commit,
        filter_scheduler_delete: scheduler_delete,
        config_scheduler_new,
        config_scheduler_commit: config_commit,
        config_scheduler_delete: scheduler_delete,
        config_http_callout: callout,
        config_define_counter: define_counter,
        config_define_gauge: define_gauge,
        config_increment_counter: increment,
        config_set_gauge: set_gauge,
        filter_increment_counter: increment,
    });
    CALLS.lock().unwrap().clear();
    *CALLOUT_RESULT.lock().unwrap() = 0;
    *ON_STREAM_SCHEDULER.lock().unwrap() = None;
    *AUTHORIZATION.lock().unwrap() = None;
    guard
}

fn calls() -> Vec<Call> {
    CALLS.lock().unwrap().clone()
}

/// A one-profile configuration whose cache key no other test uses (the store is per process).
fn config(cluster: &str) -> String {
    format!(
        r#"{{"profiles": {{"p": {{"cluster": "{cluster}", "token_url": "https://idp.example/{cluster}/token",
            "client_id": "svc", "client_secret": "s3cr3t-value"}}}},
            "routes": [{{"match": {{"path_prefix": "/"}}, "profile": "p"}}]}}"#
    )
}

/// The tests play Envoy's main thread.
fn on_main() -> OnMain {
    // SAFETY: see above.
    unsafe { OnMain::assume() }
}

fn handle() -> ConfigHandle {
    ConfigHandle(std::ptr::null_mut::<c_void>())
}

#[test]
fn a_bad_configuration_is_refused_naming_the_field() {
    let _envoy = fake_envoy();
    let bad = config("idp-bad").replace(r#""client_id": "svc""#, r#""client_id": 7"#);
    let Err(line) = Plugin::load(on_main(), handle(), bad.as_bytes()) else { panic!("accepted a bad configuration") };
    assert!(line.starts_with("oauth2_cc: configuration rejected: profiles.p.client_id"), "{line}");
    assert!(!line.contains("s3cr3t"), "{line}");
}

#[test]
fn loading_defines_the_wasm_metric_names_and_ticks_at_once() {
    let _envoy = fake_envoy();
    let plugin = Plugin::load(on_main(), handle(), config("idp-load").as_bytes()).unwrap();
    let calls = calls();
    for name in ["fetch_ok", "injected", "waited", "failed_requests", "purged", "budget_refused"] {
        assert!(calls.contains(&Call::DefineCounter(format!("oauth2_cc.p.{name}"))), "{name}: {calls:?}");
    }
    assert!(calls.contains(&Call::DefineGauge("oauth2_cc.p.token_remaining_s".into())), "{calls:?}");
    assert!(calls.contains(&Call::DefineGauge("oauth2_cc.p.token_lifetime_s".into())), "{calls:?}");
    assert!(calls.contains(&Call::ConfigCommit(EVENT_TICK)), "the first tick is posted at load: {calls:?}");
    plugin.shut_down(on_main());
}

#[test]
fn a_tick_sends_the_token_request_from_the_configuration() {
    let _envoy = fake_envoy();
    let plugin = Plugin::load(on_main(), handle(), config("idp-tick").as_bytes()).unwrap();
    plugin.on_main_event(on_main(), EVENT_TICK);
    let sent: Vec<Call> = calls().into_iter().filter(|c| matches!(c, Call::Callout { .. })).collect();
    let [Call::Callout { cluster, headers, body }] = sent.as_slice() else { panic!("one callout expected: {sent:?}") };
    assert_eq!(cluster, "idp-tick");
    assert!(headers.iter().any(|(k, v)| k == ":path" && v == "/idp-tick/token"), "{headers:?}");
    assert!(String::from_utf8_lossy(body).contains("grant_type=client_credentials"));
    // A second tick while the request is in flight sends nothing more (the lease holds).
    plugin.on_main_event(on_main(), EVENT_TICK);
    assert_eq!(calls().iter().filter(|c| matches!(c, Call::Callout { .. })).count(), 1);
    plugin.shut_down(on_main());
}

#[test]
fn a_refused_dispatch_goes_back_to_the_driver_and_is_counted() {
    let _envoy = fake_envoy();
    *CALLOUT_RESULT.lock().unwrap() = 2; // ClusterNotFound
    let plugin = Plugin::load(on_main(), handle(), config("idp-missing").as_bytes()).unwrap();
    let no_cluster = metric_id(&Call::DefineCounter("oauth2_cc.p.fetch_failed.no_cluster".into()));
    plugin.on_main_event(on_main(), EVENT_TICK);
    let calls = calls();
    assert!(calls.iter().any(|c| matches!(c, Call::Callout { .. })), "the tick tried to send: {calls:?}");
    let counted: u64 = calls.iter().map(|c| if *c == Call::Increment(no_cluster, 1) { 1 } else { 0 }).sum();
    assert_eq!(counted, 1, "the refused dispatch is counted once as fetch_failed.no_cluster: {calls:?}");
    assert!(calls.iter().any(|c| matches!(c, Call::Log(3..=4, m) if m.contains("idp-missing"))), "{calls:?}");
    plugin.shut_down(on_main());
}

/// The id the fake gave the metric whose definition is `definition` (ids count definitions).
fn metric_id(definition: &Call) -> usize {
    let calls = calls();
    let defined = calls.iter().filter(|c| matches!(c, Call::DefineCounter(_) | Call::DefineGauge(_)));
    let position = defined.clone().position(|c| c == definition).expect("defined at load");
    *NEXT_METRIC.lock().unwrap() - defined.count() + position + 1
}

#[test]
fn an_answer_stores_the_token_and_wakes() {
    let _envoy = fake_envoy();
    let plugin = Plugin::load(on_main(), handle(), config("idp-answer").as_bytes()).unwrap();
    plugin.on_main_event(on_main(), EVENT_TICK);
    CALLS.lock().unwrap().clear();
    let body = br#"{"access_token":"tok-answer","expires_in":3600}"#;
    plugin.on_callout_done(on_main(), 77, true, &[(b":status", b"200")], &[&body[..20], &body[20..]]);
    let calls = calls();
    assert!(calls.contains(&Call::ConfigCommit(EVENT_WAKE)), "a stored token wakes the waiters: {calls:?}");
    let cached = plugin.with_driver(|d| d.cached(0).map(|s| s.header_value.clone()));
    assert_eq!(cached.as_deref(), Some("Bearer tok-answer"));
    assert!(calls.iter().all(|c| !format!("{c:?}").contains("tok-answer")), "no token in logs: {calls:?}");
    plugin.shut_down(on_main());
}

#[test]
fn a_paused_request_gets_its_outcome_through_its_own_scheduler() {
    let _envoy = fake_envoy();
    let parked = Arc::new(Parked::new(stream_scheduler()));
    assert!(parked.deliver(Outcome::Fail));
    assert_eq!(calls(), vec![Call::StreamCommit(DELIVERED)]);
    assert!(matches!(parked.take(), Some(Outcome::Fail)));
    parked.close();
    assert!(!parked.deliver(Outcome::Fail), "nothing is posted to a request that is gone");
    assert_eq!(calls().len(), 1);
}

fn stream_scheduler() -> abi::Scheduler {
    abi::Stream(std::ptr::null_mut()).scheduler().unwrap()
}

/// A request misses while the token request is in flight, and the answer is stored on the main
/// thread while the worker is still between the driver's decision and listing its mailbox (here:
/// while it makes the request's scheduler). The request must still get its token: at once, or
/// through its scheduler. (Before the mailbox was listed under the driver's lock, the driver's
/// Resume found no mailbox and the request hung until the client gave up; seen in the e2e suite.)
#[test]
fn a_token_stored_while_a_missing_request_is_being_paused_still_reaches_it() {
    let _envoy = fake_envoy();
    let plugin = Plugin::load(on_main(), handle(), config("idp-race").as_bytes()).unwrap();
    plugin.on_main_event(on_main(), EVENT_TICK); // the token request is in flight
    let main = Arc::clone(&plugin);
    *ON_STREAM_SCHEDULER.lock().unwrap() = Some(Box::new(move || {
        let body = br#"{"access_token":"tok-race","expires_in":3600}"#;
        main.on_callout_done(on_main(), 77, true, &[(b":status", b"200")], &[&body[..]]);
    }));
    CALLS.lock().unwrap().clear();
    let stream = abi::Stream(std::ptr::null_mut());
    let mut filter = StreamFilter::new(Arc::clone(&plugin));
    let verdict = filter.on_request_headers(stream);
    let calls = calls();
    assert!(ON_STREAM_SCHEDULER.lock().unwrap().is_none(), "the answer was not delivered meanwhile");
    match verdict {
        Verdict::Continue => {} // the token was there when the driver decided
        Verdict::Stop => {
            assert!(
                calls.contains(&Call::StreamCommit(DELIVERED)),
                "a paused request was never resumed (verdict Stop, no DELIVERED post): {calls:?}"
            );
            filter.on_delivered(stream);
            assert!(!filter.waiting());
        }
    }
    plugin.shut_down(on_main());
}

/// A wake that brings no outcome (nothing was delivered yet) is no outcome: the request stays
/// paused and listed, and the token that arrives later still resumes it.
#[test]
fn a_wake_without_an_outcome_leaves_the_request_paused_for_its_token() {
    let _envoy = fake_envoy();
    let plugin = Plugin::load(on_main(), handle(), config("idp-empty-wake").as_bytes()).unwrap();
    plugin.on_main_event(on_main(), EVENT_TICK); // the token request is in flight
    let stream = abi::Stream(std::ptr::null_mut());
    let mut filter = StreamFilter::new(Arc::clone(&plugin));
    assert_eq!(filter.on_request_headers(stream), Verdict::Stop);
    filter.on_delivered(stream);
    assert!(filter.waiting(), "a wake without an outcome let go of the paused request");
    assert_eq!(plugin.parked_count(), 1, "the paused request is still listed for its outcome");
    CALLS.lock().unwrap().clear();
    let body = br#"{"access_token":"tok-empty-wake","expires_in":3600}"#;
    plugin.on_callout_done(on_main(), 77, true, &[(b":status", b"200")], &[&body[..]]);
    plugin.on_main_event(on_main(), EVENT_WAKE); // the wake the stored token posted
    assert!(calls().contains(&Call::StreamCommit(DELIVERED)), "{:?}", calls());
    filter.on_delivered(stream);
    assert!(!filter.waiting());
    assert_eq!(plugin.parked_count(), 0);
    plugin.shut_down(on_main());
}

/// A response whose status is not in `purge_on_status` takes no lock and moves no epoch (every
/// worker would re-copy its tokens under the lock on its next request); one in the list purges.
#[test]
fn only_a_status_in_the_purge_list_reaches_the_driver() {
    let _envoy = fake_envoy();
    let plugin = Plugin::load(on_main(), handle(), config("idp-status").as_bytes()).unwrap();
    plugin.on_main_event(on_main(), EVENT_TICK);
    let body = br#"{"access_token":"tok-status","expires_in":3600}"#;
    plugin.on_callout_done(on_main(), 77, true, &[(b":status", b"200")], &[&body[..]]);
    let stream = abi::Stream(std::ptr::null_mut());
    let respond = |status: &'static [u8]| {
        *STATUS.lock().unwrap() = status;
        let mut filter = StreamFilter::new(Arc::clone(&plugin));
        assert_eq!(filter.on_request_headers(stream), Verdict::Continue);
        let events = plugin.driver_events.load(Ordering::Relaxed);
        filter.on_response_headers(stream);
        plugin.driver_events.load(Ordering::Relaxed) != events
    };
    for status in [&b"200"[..], b"403", b"500", b"4x1"] {
        assert!(!respond(status), "status {:?} took the driver's lock", String::from_utf8_lossy(status));
    }
    assert!(plugin.with_driver(|d| d.cached(0).is_some()));
    assert!(respond(b"401"), "a 401 reaches the driver");
    assert!(plugin.with_driver(|d| d.cached(0).is_none()), "and purges the token");
    *STATUS.lock().unwrap() = b"200";
    plugin.shut_down(on_main());
}

/// The epoch the workers watch moves when a token copy changed, not after every driver event: a
/// tick that changes nothing leaves every worker's copies valid (no re-copy under the lock).
#[test]
fn the_epoch_moves_only_when_a_token_copy_changes() {
    let _envoy = fake_envoy();
    let plugin = Plugin::load(on_main(), handle(), config("idp-epoch").as_bytes()).unwrap();
    plugin.on_main_event(on_main(), EVENT_TICK);
    let before = plugin.epoch();
    let body = br#"{"access_token":"tok-epoch","expires_in":3600}"#;
    plugin.on_callout_done(on_main(), 77, true, &[(b":status", b"200")], &[&body[..]]);
    let with_token = plugin.epoch();
    assert_ne!(with_token, before, "a stored token is a new copy");
    let events = plugin.driver_events.load(Ordering::Relaxed);
    plugin.on_main_event(on_main(), EVENT_TICK);
    plugin.on_main_event(on_main(), EVENT_TICK);
    assert!(plugin.driver_events.load(Ordering::Relaxed) > events, "the ticks ran the driver");
    assert_eq!(plugin.epoch(), with_token, "ticks that changed no copy moved the epoch");
    plugin.shut_down(on_main());
}

#[test]
fn the_tick_thread_sleeps_until_the_earliest_wake_and_an_earlier_one_wakes_it_at_once() {
    use super::ticker::Ticker;
    use std::time::{Duration, Instant};
    let _envoy = fake_envoy();
    let ticker = Arc::new(Ticker::default());
    let scheduler = Arc::new(handle().scheduler(on_main()).unwrap());
    assert!(ticker.register(1, &scheduler, EVENT_TICK, Vec::new()));
    ticker.schedule(1, super::env::now_ms() + 60_000);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ticker.ticks(), 0, "nothing due for a minute: no tick (a 100 ms period would have posted 3)");
    let asked = Instant::now();
    ticker.schedule(1, super::env::now_ms());
    while ticker.ticks() == 0 && asked.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = asked.elapsed();
    eprintln!("a wake due now was posted after {took:?}");
    assert_eq!(ticker.ticks(), 1);
    // The sleep it was in ends about 1 s after registration; a missed signal would post then.
    assert!(took < Duration::from_millis(400), "the sleeping thread was not woken: posted after {took:?}");
    assert!(calls().contains(&Call::ConfigCommit(EVENT_TICK)));
    ticker.unregister(1);
}

/// A token-exchange profile whose cache key no other test uses.
fn exchange_config(cluster: &str) -> String {
    config(cluster).replace(
        r#""client_secret": "s3cr3t-value""#,
        r#""client_secret": "s3cr3t-value", "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
           "token_exchange": {}"#,
    )
}

fn set_authorization(value: Option<&str>) {
    *AUTHORIZATION.lock().unwrap() = value.map(|v| &*Box::leak(v.as_bytes().to_vec().into_boxed_slice()));
}

/// The caller's bearer goes to the IdP as the subject token from the main thread, the exchanged
/// token replaces it, and the next request of the same subject on this worker is a hit on the
/// worker's own copy (no driver event); another subject misses; no subject gets 401.
#[test]
fn an_exchange_sends_the_callers_token_and_a_hit_needs_no_driver() {
    let _envoy = fake_envoy();
    let plugin = Plugin::load(on_main(), handle(), exchange_config("idp-exchange").as_bytes()).unwrap();
    plugin.on_main_event(on_main(), EVENT_TICK);
    assert!(!calls().iter().any(|c| matches!(c, Call::Callout { .. })), "no token before a caller");
    let stream = abi::Stream(std::ptr::null_mut());
    set_authorization(Some("Bearer alice-subject-token"));
    let mut first = StreamFilter::new(Arc::clone(&plugin));
    assert_eq!(first.on_request_headers(stream), Verdict::Stop);
    assert!(calls().contains(&Call::ConfigCommit(EVENT_WAKE)), "the kick goes to the main thread: {:?}", calls());
    plugin.on_main_event(on_main(), EVENT_WAKE);
    let bodies: Vec<String> = calls()
        .into_iter()
        .filter_map(|c| {
            if let Call::Callout { body, .. } = c { Some(String::from_utf8_lossy(&body).into_owned()) } else { None }
        })
        .collect();
    let [body] = bodies.as_slice() else { panic!("one exchange expected: {bodies:?}") };
    assert!(body.contains("subject_token=alice-subject-token"), "{body}");
    assert!(body.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"), "{body}");
    let answer = br#"{"access_token":"exchanged-for-alice","expires_in":3600}"#;
    plugin.on_callout_done(on_main(), 77, true, &[(b":status", b"200")], &[&answer[..]]);
    plugin.on_main_event(on_main(), EVENT_WAKE);
    first.on_delivered(stream);
    assert!(!first.waiting());
    assert!(calls().contains(&Call::SetHeader("authorization".into(), "Bearer exchanged-for-alice".into())));

    // The same subject again: this worker's copy is filled on the next miss, then hits.
    let mut second = StreamFilter::new(Arc::clone(&plugin));
    assert_eq!(second.on_request_headers(stream), Verdict::Continue);
    CALLS.lock().unwrap().clear();
    let events = plugin.driver_events.load(Ordering::Relaxed);
    let mut third = StreamFilter::new(Arc::clone(&plugin));
    assert_eq!(third.on_request_headers(stream), Verdict::Continue);
    assert_eq!(plugin.driver_events.load(Ordering::Relaxed), events, "a hit takes no lock");
    let written: Vec<Call> =
        calls().into_iter().filter(|c| matches!(c, Call::SetHeader(..) | Call::Callout { .. })).collect();
    assert_eq!(written, vec![Call::SetHeader("authorization".into(), "Bearer exchanged-for-alice".into())]);

    // Another subject is not served alice's token.
    set_authorization(Some("Bearer bob-subject-token"));
    CALLS.lock().unwrap().clear();
    let mut bob = StreamFilter::new(Arc::clone(&plugin));
    assert_eq!(bob.on_request_headers(stream), Verdict::Stop, "bob waits for his own exchange");
    assert!(!calls().iter().any(|c| matches!(c, Call::SetHeader(_, v) if v.contains("alice"))), "{:?}", calls());
    bob.on_complete();

    // No subject token: 401, counted, nothing exchanged.
    set_authorization(None);
    CALLS.lock().unwrap().clear();
    let mut nobody = StreamFilter::new(Arc::clone(&plugin));
    assert_eq!(nobody.on_request_headers(stream), Verdict::Stop);
    let replies: Vec<Call> = calls().into_iter().filter(|c| matches!(c, Call::Reply(..))).collect();
    assert_eq!(
        replies,
        vec![Call::Reply(401, r#"{"error":"subject_token_missing","profile":"p"}"#.into())],
        "{:?}",
        calls()
    );
    assert!(calls().iter().all(|c| !format!("{c:?}").contains("subject-token") || matches!(c, Call::Callout { .. })));
    plugin.shut_down(on_main());
}
