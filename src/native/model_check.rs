//! The native host model-checked: shuttle runs fake Envoy threads over the real `Plugin`, `Parked`
//! mailboxes, epoch and `Ticker`, every lock, atomic and channel operation a point where its
//! seeded scheduler may switch threads (the host's `sync` module is shuttle's in this build).
//!
//! The fake Envoy of one execution: a main thread that loads configurations and runs their
//! scheduled events and callout answers; request threads that pause on a cold cache, and then
//! either wait for their outcome or hang up (`on_complete`), and report a response status (401:
//! a purge); a listener update that loads a second configuration with the same cache key while
//! requests flow and sends a request through it; the old configuration destroyed once its
//! requests are done, and the new one at the end (the tick thread is then stopped and joined).
//!
//! A check fails when every thread is blocked (shuttle reports the deadlock), when a request that
//! stayed got no outcome or two, or when a configuration still lists a paused request at the end.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use shuttle::scheduler::{PctScheduler, RandomScheduler};
use shuttle::sync::mpsc::{Sender, channel};
use shuttle::{Config, MaxSteps, Runner, thread};

use super::abi::{self, Buffer, Callbacks, ConfigHandle, HttpHeader, OnMain, Ptr, RESPONSE_HEADER, Stream};
use super::plugin::Plugin;
use super::stream::{StreamFilter, Verdict};
use super::ticker::Ticker;

/// What the fake main thread is asked to do.
enum MainEvent {
    Scheduled {
        config: usize,
        event: u64,
    },
    Answer {
        config: usize,
        callout: u64,
    },
    /// A listener update: load the configuration again and send it back.
    Reconfigure(Sender<Arc<Plugin>>),
    RequestDone {
        config: usize,
    },
}

/// What a request's stream was told by the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    Continued,
    Replied(u32),
}

/// The fake Envoy of the running execution.
#[derive(Default)]
struct Fake {
    main: Option<Sender<MainEvent>>,
    streams: HashMap<usize, Sender<u64>>,
    told: HashMap<usize, Vec<Told>>,
    unauthorized: Vec<usize>,
    next_callout: u64,
}

static FAKE: StdMutex<Option<Fake>> = StdMutex::new(None);

/// Runs `f` on the fake (never across a shuttle operation: the lock is the OS thread's).
fn fake<T>(f: impl FnOnce(&mut Fake) -> T) -> T {
    let mut guard = FAKE.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(Fake::default))
}

fn post_main(event: MainEvent) {
    if let Some(main) = fake(|f| f.main.clone()) {
        let _ = main.send(event);
    }
}

fn text(b: Buffer) -> String {
    // SAFETY: the module passes live buffers.
    String::from_utf8_lossy(unsafe { b.as_bytes() }).into_owned()
}

unsafe extern "C" fn log(_: u32, _: Buffer) {}
unsafe extern "C" fn no_log(_: u32) -> bool {
    false
}
unsafe extern "C" fn not_validating() -> bool {
    false
}
unsafe extern "C" fn get_header(
    stream: Ptr,
    kind: u32,
    name: Buffer,
    out: *mut Buffer,
    _: usize,
    _: *mut usize,
) -> bool {
    static PATH: &[u8] = b"/";
    static METHOD: &[u8] = b"GET";
    static UNAUTHORIZED: &[u8] = b"401";
    static OK: &[u8] = b"200";
    let value = match (kind, text(name).as_str()) {
        (RESPONSE_HEADER, ":status") => {
            if fake(|f| f.unauthorized.contains(&(stream as usize))) {
                UNAUTHORIZED
            } else {
                OK
            }
        }
        (RESPONSE_HEADER, _) => return false,
        (_, ":path") => PATH,
        (_, ":method") => METHOD,
        _ => return false,
    };
    // SAFETY: the module passes a live out slot; the value is static.
    unsafe { *out = Buffer::of(value) };
    true
}
unsafe extern "C" fn set_header(_: Ptr, _: u32, _: Buffer, _: Buffer) -> bool {
    true
}
unsafe extern "C" fn send_response(stream: Ptr, status: u32, _: *mut HttpHeader, _: usize, _: Buffer, _: Buffer) {
    fake(|f| f.told.entry(stream as usize).or_default().push(Told::Replied(status)));
}
unsafe extern "C" fn continue_decoding(stream: Ptr) {
    fake(|f| f.told.entry(stream as usize).or_default().push(Told::Continued));
}
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
/// A scheduler is the stream's or the configuration's own pointer.
unsafe extern "C" fn scheduler_new(owner: Ptr) -> Ptr {
    owner
}
unsafe extern "C" fn stream_commit(stream: Ptr, event: u64) {
    if let Some(worker) = fake(|f| f.streams.get(&(stream as usize)).cloned()) {
        let _ = worker.send(event); // a stream that is gone drops it, as Envoy does
    }
}
unsafe extern "C" fn config_commit(config: Ptr, event: u64) {
    post_main(MainEvent::Scheduled { config: config as usize, event });
}
unsafe extern "C" fn scheduler_delete(_: Ptr) {}
unsafe extern "C" fn callout(
    config: Ptr,
    id: *mut u64,
    _: Buffer,
    _: *mut HttpHeader,
    _: usize,
    _: Buffer,
    _: u64,
) -> u32 {
    let callout = fake(|f| {
        f.next_callout += 1;
        f.next_callout
    });
    // SAFETY: the module passes a live id slot.
    unsafe { *id = callout };
    // Envoy answers later, on the main thread.
    post_main(MainEvent::Answer { config: config as usize, callout });
    abi::CALLOUT_INIT_SUCCESS
}
unsafe extern "C" fn define(_: Ptr, _: Buffer, _: *mut Buffer, _: usize, id: *mut usize) -> u32 {
    // SAFETY: the module passes a live id slot.
    unsafe { *id = 1 };
    abi::METRICS_SUCCESS
}
unsafe extern "C" fn metric(_: Ptr, _: usize, _: *mut Buffer, _: usize, _: u64) -> u32 {
    abi::METRICS_SUCCESS
}

fn install_fake_envoy() {
    abi::install(Callbacks {
        log,
        log_enabled: no_log,
        is_validation_mode: not_validating,
        get_header,
        set_header,
        send_response,
        continue_decoding,
        get_attribute_string: attribute,
        get_metadata_string: metadata_string,
        get_metadata_bool: metadata_bool,
        get_metadata_keys_count: metadata_keys_count,
        get_metadata_keys: metadata_keys,
        filter_scheduler_new: scheduler_new,
        filter_scheduler_commit: stream_commit,
        filter_scheduler_delete: scheduler_delete,
        config_scheduler_new: scheduler_new,
        config_scheduler_commit: config_commit,
        config_scheduler_delete: scheduler_delete,
        config_http_callout: callout,
        config_define_counter: define,
        config_define_gauge: define,
        config_increment_counter: metric,
        config_set_gauge: metric,
        filter_increment_counter: metric,
    });
}

/// Tells executions apart: each gets its own cache key (the token store is the process's) and
/// its own choice of which requests hang up or see a 401.
static EXECUTIONS: AtomicU64 = AtomicU64::new(0);
/// Pointers for streams and configurations: distinct, never dereferenced by the fake.
static POINTERS: AtomicU64 = AtomicU64::new(0x1000);

fn pointer() -> usize {
    usize::try_from(POINTERS.fetch_add(8, Ordering::Relaxed)).unwrap()
}

fn config_bytes(execution: u64) -> String {
    format!(
        r#"{{"profiles": {{"p": {{"cluster": "idp-{execution}", "token_url": "https://idp.example/{execution}/token",
            "client_id": "svc", "client_secret": "s3cr3t-value", "purge_on_status": [401]}}}},
            "routes": [{{"match": {{"path_prefix": "/"}}, "profile": "p"}}]}}"#
    )
}

/// How a request thread behaves.
#[derive(Clone, Copy)]
struct Client {
    hangs_up: bool,
    unauthorized: bool,
}

/// One request on its worker: headers, then its outcome or its client hanging up, then the
/// response status, then the stream's end.
fn request(plugin: Arc<Plugin>, config: usize, client: Client) -> usize {
    let stream_ptr = pointer();
    let (events, inbox) = channel();
    fake(|f| {
        f.streams.insert(stream_ptr, events);
        if client.unauthorized {
            f.unauthorized.push(stream_ptr);
        }
    });
    let stream = Stream(stream_ptr as *mut c_void);
    let mut filter = StreamFilter::new(plugin);
    if filter.on_request_headers(stream) == Verdict::Continue {
        fake(|f| f.told.entry(stream_ptr).or_default().push(Told::Continued));
    }
    if filter.waiting() {
        if client.hangs_up {
            thread::yield_now();
            filter.on_complete();
        } else {
            while filter.waiting() {
                let Ok(event) = inbox.recv() else { break };
                // SAFETY: the hook Envoy runs for a stream's scheduled event.
                let hook_filter: *const c_void = (&raw mut filter).cast_const().cast();
                unsafe { super::hooks::envoy_dynamic_module_on_http_filter_scheduled(stream.0, hook_filter, event) };
            }
        }
    }
    if !filter.waiting() {
        filter.on_response_headers(stream);
    }
    drop(filter);
    fake(|f| f.streams.remove(&stream_ptr));
    post_main(MainEvent::RequestDone { config });
    stream_ptr
}

/// One execution: Envoy's main thread is this one.
fn envoy() {
    let execution = EXECUTIONS.fetch_add(1, Ordering::Relaxed);
    let (to_main, main_inbox) = channel();
    let fresh = Fake { main: Some(to_main.clone()), ..Fake::default() };
    // What a failed execution left behind belongs to a finished shuttle run: leaked, not dropped.
    std::mem::forget(FAKE.lock().unwrap_or_else(|p| p.into_inner()).replace(fresh));
    super::sync::model_ticks(3);
    // SAFETY: this thread plays Envoy's main thread.
    let main = unsafe { OnMain::assume() };
    let ticker = Arc::new(Ticker::default());
    let bytes = config_bytes(execution);
    let load = |ticker: &Arc<Ticker>| {
        let config = pointer();
        let plugin =
            Plugin::load_ticked_by(main, ConfigHandle(config as *mut c_void), bytes.as_bytes(), Arc::clone(ticker))
                .unwrap();
        (config, plugin)
    };
    let (old_config, old) = load(&ticker);
    let mut plugins: HashMap<usize, Arc<Plugin>> = HashMap::from([(old_config, Arc::clone(&old))]);

    // Bits of the execution number choose who hangs up and who sees a 401, so every combination
    // is run under many schedules.
    let clients: Vec<Client> = (0..3)
        .map(|i| Client { hangs_up: execution >> i & 1 == 1, unauthorized: execution >> (i + 3) & 1 == 1 })
        .collect();
    let mut workers = Vec::new();
    for client in clients.iter().copied() {
        let plugin = Arc::clone(&old);
        workers.push((client, thread::spawn(move || request(plugin, old_config, client))));
    }
    // The listener update: a new configuration with the same cache key, and a request through it.
    let update = thread::spawn(move || {
        let (reply, answer) = channel();
        let _ = to_main.send(MainEvent::Reconfigure(reply));
        answer.recv().is_ok()
    });
    drop(old);

    let mut requests_left: HashMap<usize, usize> = HashMap::from([(old_config, clients.len())]);
    let mut new_request = None;
    while requests_left.values().any(|left| *left > 0) || new_request.is_none() {
        let Ok(event) = main_inbox.recv() else { break };
        match event {
            MainEvent::Scheduled { config, event } => {
                if let Some(plugin) = plugins.get(&config) {
                    plugin.on_main_event(main, event);
                }
            }
            MainEvent::Answer { config, callout } => {
                if let Some(plugin) = plugins.get(&config) {
                    let body = format!(r#"{{"access_token":"tok-{execution}-{callout}","expires_in":3600}}"#);
                    plugin.on_callout_done(main, callout, true, &[(b":status", b"200")], &[body.as_bytes()]);
                }
            }
            MainEvent::Reconfigure(reply) => {
                let (config, plugin) = load(&ticker);
                plugins.insert(config, Arc::clone(&plugin));
                requests_left.insert(config, 1);
                let client = Client { hangs_up: execution >> 6 & 1 == 1, unauthorized: false };
                let through_new = Arc::clone(&plugin);
                new_request = Some((client, thread::spawn(move || request(through_new, config, client))));
                let _ = reply.send(plugin);
            }
            MainEvent::RequestDone { config } => {
                requests_left.entry(config).and_modify(|n| *n = n.saturating_sub(1));
                destroy_if_done(main, &mut plugins, &requests_left, config);
            }
        }
    }
    assert!(update.join().unwrap(), "the listener update got no configuration");
    assert_every_request_told(workers.into_iter().chain(new_request));
    // Module unload: every configuration is gone, so the tick thread is stopped and joined.
    drop(plugins);
    *FAKE.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Every request that kept its client was told to continue exactly once; one that hung up may
/// have been told nothing.
fn assert_every_request_told(requests: impl Iterator<Item = (Client, thread::JoinHandle<usize>)>) {
    let mut outcomes = Vec::new();
    for (client, worker) in requests {
        let stream = worker.join().unwrap();
        let told = fake(|f| f.told.remove(&stream).unwrap_or_default());
        outcomes.push((client.hangs_up, told));
    }
    for (hangs_up, told) in outcomes {
        match told.as_slice() {
            [Told::Continued] => {}
            [] if hangs_up => {}
            other => panic!("a request was told {other:?} (hung up: {hangs_up}); the token endpoint always answers"),
        }
    }
}

/// Envoy destroys a configuration once its last stream is gone, token requests in flight or not
/// (their answers then go nowhere). One destroyed with its token request in flight gives that
/// request's lease back: had it not, a request of the newer configuration with the same cache key
/// would wait for the lease to run out (seconds, which no bounded model reaches: every thread
/// blocks and the check fails).
fn destroy_if_done(
    main: OnMain,
    plugins: &mut HashMap<usize, Arc<Plugin>>,
    requests_left: &HashMap<usize, usize>,
    config: usize,
) {
    if requests_left.get(&config).copied().unwrap_or(1) > 0 {
        return;
    }
    if let Some(plugin) = plugins.remove(&config) {
        assert_eq!(plugin.parked_count(), 0, "a finished configuration still lists a paused request");
        assert_eq!(plugin.with_driver(|d| d.waiting()), 0, "the driver still holds a waiter");
        plugin.shut_down(main);
    }
}

fn config(max_steps: usize) -> Config {
    let mut config = Config::new();
    config.max_steps = MaxSteps::FailAfter(max_steps);
    // Shuttle runs each thread on its own stack, 32 KiB by default: the request hook's unoptimised
    // frames (a token-exchange step carries the subject by value) overflow it.
    config.stack_size = 0x20000;
    config
}

const SEED: u64 = 0x6f61_7574_6832;
static SERIAL: StdMutex<()> = StdMutex::new(());

/// Seeded random schedules: every thread switch anywhere.
#[test]
fn model_check_random_schedules_never_deadlock_and_resume_or_forget_every_request() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_fake_envoy();
    Runner::new(RandomScheduler::new_from_seed(SEED, 500), config(200_000)).run(envoy);
}

/// PCT schedules: few, deep preemptions (what a lock-order inversion needs).
#[test]
fn model_check_pct_schedules_never_deadlock_and_resume_or_forget_every_request() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_fake_envoy();
    Runner::new(PctScheduler::new_from_seed(SEED, 3, 500), config(200_000)).run(envoy);
}
