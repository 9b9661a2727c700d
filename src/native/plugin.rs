//! One filter configuration (`filter_config` of a `DynamicModuleFilter`): the compiled
//! configuration, the lifecycle driver behind its lock, the requests it paused, the callouts it
//! sent, and the executor that carries out the driver's actions.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::abi::{self, ConfigHandle, Level, OnMain, Scheduler, Stream};
use crate::env::{self, ProcessEnv};
use crate::metrics::Metrics;
use crate::parked::{Outcome, Parked};
use crate::secret_files::{self, Rotation, SecretFiles};
use crate::sync::{AtomicU64, Mutex, Ordering, lock};
use crate::ticker::Ticker;
use oauth2_cc_core::config::{self, Config};
use oauth2_cc_core::lifecycle::{self, Action, Answer, AnswerBody, CalloutId, Driver, LogLevel, RequestId};

/// Main-thread events (`on_http_filter_config_scheduled`).
pub const EVENT_TICK: u64 = 1;
pub const EVENT_WAKE: u64 = 2;

/// Where an action list is carried out: only the main thread (which proves it with an `OnMain`)
/// may send callouts and touch the configuration's counters and gauges.
#[derive(Clone, Copy)]
pub enum Thread {
    Main(OnMain),
    /// A request's worker, with that request's stream (`None`: the stream is going away).
    Worker(Option<Stream>),
}

/// A callout answer copied out of Envoy's buffers, waiting for the driver.
struct OwnedAnswer {
    envoy_id: u64,
    status: Option<Vec<u8>>,
    retry_after: Option<Vec<u8>>,
    body: Vec<u8>,
    /// The body was larger than any profile accepts (only its first bytes were kept).
    too_large: bool,
    /// Main-thread events that found no callout for `envoy_id` yet.
    misses: u8,
}

/// How many main-thread events an answer waits for its callout id before it is dropped.
const MAX_MISSES: u8 = 3;

/// One filter configuration. Lock order: `driver`, then any one of `parked`, `callouts`,
/// `answers`, `kicks`, `outbox`, `secret_files`, the metrics' pending gauges or the tick thread's
/// list (each held alone, never with another of them), then a paused request's mailbox (`Parked`); a thread that holds a later lock never waits for an earlier one
/// (`unpark` takes the request out of `parked` and lets go before it takes `driver`). Only
/// `drain_answers` skips the order's wait: it `try_lock`s `driver`.
pub struct Plugin {
    /// Tells this configuration's token copies apart from another's in a thread's cache.
    pub id: u64,
    handle: ConfigHandle,
    pub config: Arc<Config>,
    pub metrics: Metrics,
    driver: Mutex<Driver>,
    /// The driver's copies generation, published under its lock after every event: it moves only
    /// when a token copy changed, so a worker re-reads its copies (under the lock) only then
    /// (see `stream`).
    epoch: AtomicU64,
    /// Driver events run so far (tests tell a path that took the driver's lock from one that did not).
    #[cfg(test)]
    pub driver_events: AtomicU64,
    main: Option<Arc<Scheduler>>,
    /// The process's tick thread, which this configuration is registered with while `main` is.
    ticker: Arc<Ticker>,
    /// Envoy's callout id -> the driver's.
    callouts: Mutex<HashMap<u64, CalloutId>>,
    /// Answers not yet given to the driver (one can arrive while the driver is busy).
    answers: Mutex<Vec<OwnedAnswer>>,
    /// Profiles kicked by requests since the last wake.
    kicks: Mutex<Vec<usize>>,
    /// Callouts the driver asked for off the main thread, sent on the next wake.
    outbox: Mutex<Vec<lifecycle::Callout>>,
    parked: Mutex<HashMap<RequestId, Arc<Parked>>>,
    /// The largest token answer any profile accepts (callout bodies are copied up to this).
    answer_cap: usize,
    /// The secret files the configuration read, watched from the main thread's ticks.
    secret_files: Mutex<Option<SecretFiles>>,
    /// When the secret files are next looked at (`u64::MAX`: none to watch); a tick is asked for
    /// then too.
    secret_poll_at_ms: AtomicU64,
    /// How long, from the last driver event, until the tick this configuration asked for.
    wake_in_ms: AtomicU64,
}

fn level(level: LogLevel) -> Level {
    match level {
        LogLevel::Debug => Level::Debug,
        LogLevel::Info => Level::Info,
        LogLevel::Warn => Level::Warn,
        LogLevel::Error => Level::Error,
    }
}

impl Plugin {
    /// Compiles the configuration; `Err` carries the line to log (it names the bad field, never
    /// a secret), and Envoy then rejects the filter configuration.
    pub fn load(main: OnMain, handle: ConfigHandle, bytes: &[u8]) -> Result<Arc<Plugin>, String> {
        Plugin::load_ticked_by(main, handle, bytes, Ticker::process())
    }

    /// [`Plugin::load`] with the tick thread to register with (the model check runs its own).
    pub fn load_ticked_by(
        on_main: OnMain,
        handle: ConfigHandle,
        bytes: &[u8],
        ticker: Arc<Ticker>,
    ) -> Result<Arc<Plugin>, String> {
        let now = env::now_ms();
        let (config, secret_files) = secret_files::load(bytes, now)
            .map_err(|error| format!("oauth2_cc: {}", config::rejected_message(&error)))?;
        let config = Arc::new(config);
        static IDS: AtomicU64 = AtomicU64::new(1);
        let (driver, actions) = Driver::new(Arc::clone(&config), env::random_u64(), now, &mut ProcessEnv);
        let validating = abi::is_validation_mode();
        let main = if validating { None } else { handle.scheduler(on_main).map(Arc::new) };
        let plugin = Arc::new(Plugin {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            handle,
            metrics: Metrics::define(on_main, handle, &config),
            answer_cap: config.profiles.iter().map(|p| p.max_response_bytes).max().unwrap_or(0),
            config,
            driver: Mutex::new(driver),
            epoch: AtomicU64::new(0),
            #[cfg(test)]
            driver_events: AtomicU64::new(0),
            main: main.clone(),
            ticker,
            callouts: Mutex::new(HashMap::new()),
            answers: Mutex::new(Vec::new()),
            kicks: Mutex::new(Vec::new()),
            outbox: Mutex::new(Vec::new()),
            parked: Mutex::new(HashMap::new()),
            secret_poll_at_ms: AtomicU64::new(secret_files.as_ref().map_or(u64::MAX, SecretFiles::next_poll_ms)),
            secret_files: Mutex::new(secret_files),
            wake_in_ms: AtomicU64::new(0),
        });
        {
            let mut driver = lock(&plugin.driver);
            plugin.execute(actions, Thread::Main(on_main), &mut driver);
            plugin.publish(&driver);
        }
        abi::log_line(Level::Info, format_args!("{}", config::configured_message(&plugin.config)));
        if let Some(main) = main {
            let keys = plugin.config.profiles.iter().map(|p| p.cache_key.clone()).collect();
            if !plugin.ticker.register(plugin.id, &main, EVENT_TICK, keys) {
                abi::log_line(
                    Level::Error,
                    format_args!("cannot start the tick thread; tokens are fetched on demand only"),
                );
            }
            // The first tick now: prefetch tokens before the first request needs one.
            main.commit(EVENT_TICK);
        }
        Ok(plugin)
    }

    /// The configuration is going away (main thread): no more ticks (the last one out stops the
    /// tick thread), and the driver gives back the leases of its token requests in flight, whose
    /// answers will never reach it, and wakes every other configuration.
    pub fn shut_down(&self, main: OnMain) {
        // Unregistered first: the broadcast goes to the configurations that stay.
        self.ticker.unregister(self.id);
        self.run(Thread::Main(main), |driver, _| driver.on_shut_down(&mut ProcessEnv));
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Runs `event` on the driver under its lock and carries out what it returns.
    pub fn run(&self, thread: Thread, event: impl FnOnce(&mut Driver, u64) -> Vec<Action>) {
        let mut driver = lock(&self.driver);
        let actions = event(&mut driver, env::now_ms());
        self.execute(actions, thread, &mut driver);
        self.publish(&driver);
    }

    /// Publishes the driver's copies generation (the driver's lock is held: a worker that reads the
    /// new value and then takes the lock sees copies at least that new).
    /// Also asks the tick thread for the next tick: when the driver next needs one, or the secret
    /// files are due, at most the core's ceiling from now.
    fn publish(&self, driver: &Driver) {
        #[cfg(test)]
        self.driver_events.fetch_add(1, Ordering::Relaxed);
        self.epoch.store(driver.copies_generation(), Ordering::Release);
        let secrets = self.secret_poll_at_ms.load(Ordering::Relaxed);
        let next = driver.next_wake().map_or(secrets, |at| at.min(secrets));
        let now = env::now_ms();
        let wake_in = lifecycle::wake_in_ms(Some(next), now);
        self.wake_in_ms.store(wake_in, Ordering::Relaxed);
        self.ticker.schedule(self.id, now.saturating_add(wake_in));
    }

    /// Like [`Plugin::run`] for an event that also returns a value (a request's outcome).
    pub fn run_with<T>(&self, thread: Thread, event: impl FnOnce(&mut Driver, u64) -> (T, Vec<Action>)) -> T {
        let mut driver = lock(&self.driver);
        let (value, actions) = event(&mut driver, env::now_ms());
        self.execute(actions, thread, &mut driver);
        self.publish(&driver);
        value
    }

    /// Reads the driver under its lock without an event (the request path's token copies).
    pub fn with_driver<T>(&self, read: impl FnOnce(&Driver) -> T) -> T {
        read(&lock(&self.driver))
    }

    /// A main-thread event posted by the tick thread, a wake or a kick.
    pub fn on_main_event(&self, main: OnMain, event: u64) {
        if event == EVENT_TICK {
            self.rotate_secrets(main);
        }
        // A newer configuration with the same cache key owns its fetches (a drained one fetches
        // nothing): asked on every main-thread event, so from the newer one's load on (which runs
        // on this thread too), and before the driver's lock (the tick thread's list is a lock of
        // its own).
        let superseded = self.ticker.superseded(self.id);
        if event == EVENT_TICK {
            self.run(Thread::Main(main), |driver, now| {
                driver.set_superseded(superseded);
                driver.on_tick(now, &mut ProcessEnv)
            });
        } else {
            let kicked = std::mem::take(&mut *lock(&self.kicks));
            self.run(Thread::Main(main), |driver, now| {
                driver.set_superseded(superseded);
                driver.on_wake(&kicked, now, &mut ProcessEnv)
            });
        }
        let outbox = std::mem::take(&mut *lock(&self.outbox));
        if !outbox.is_empty() {
            self.run(Thread::Main(main), |_, _| outbox.into_iter().map(Action::Send).collect());
        }
        self.drain_answers(main);
        // What request threads counted, and gauges they were asked to set, reach Envoy here.
        self.metrics.flush(main);
        if event == EVENT_TICK {
            let wake_in = self.wake_in_ms.load(Ordering::Relaxed);
            abi::log_line(Level::Debug, format_args!("tick; next tick in {wake_in} ms"));
        }
    }

    /// A secret file changed: the driver gets the configuration compiled with its new content (the
    /// same profiles and cache keys, so its tokens and paused requests carry on), or the change is
    /// refused and logged, naming the field, and the configuration in use stays.
    fn rotate_secrets(&self, main: OnMain) {
        let rotation = {
            let mut files = lock(&self.secret_files);
            let rotation = files.as_mut().and_then(|files| files.poll(env::now_ms()));
            let next_poll = files.as_ref().map_or(u64::MAX, SecretFiles::next_poll_ms);
            self.secret_poll_at_ms.store(next_poll, Ordering::Relaxed);
            rotation
        };
        match rotation {
            None => {}
            Some(Rotation::Compiled(config)) => {
                abi::log_line(
                    Level::Info,
                    format_args!("oauth2_cc: a secret file changed; the next token request uses it"),
                );
                let config = Arc::new(config);
                self.run(Thread::Main(main), |driver, now| driver.reconfigure(config, now, &mut ProcessEnv));
            }
            Some(Rotation::Refused(error)) => abi::log_line(
                Level::Error,
                format_args!(
                    "oauth2_cc: a secret file changed but is refused, the previous value stays in use: {error}"
                ),
            ),
        }
    }

    fn post_main(&self, event: u64) {
        if let Some(main) = &self.main {
            main.commit(event);
        }
    }

    /// A paused request's mailbox, listed so the driver's outcome can reach it.
    pub fn park(&self, request: RequestId, parked: Arc<Parked>) {
        lock(&self.parked).insert(request, parked);
    }

    /// A paused request went away before its outcome.
    pub fn unpark(&self, request: RequestId) {
        // Its own statement: `parked` is let go before `driver` is taken (the lock order).
        let listed = lock(&self.parked).remove(&request);
        let Some(parked) = listed else { return };
        parked.close();
        self.run(Thread::Worker(None), |driver, _| {
            driver.on_request_gone(request);
            Vec::new()
        });
    }

    fn deliver(&self, request: RequestId, outcome: Outcome) {
        let listed = lock(&self.parked).remove(&request);
        if let Some(parked) = listed {
            let _ = parked.deliver(outcome);
        }
    }

    /// How many paused requests are listed (tests: none may be left behind).
    #[cfg(test)]
    pub fn parked_count(&self) -> usize {
        lock(&self.parked).len()
    }

    /// Carries out `actions` in order (the driver's lock is held: a dispatch failure goes back to
    /// the driver at once, and whatever it returns is carried out next).
    fn execute(&self, actions: Vec<Action>, thread: Thread, driver: &mut Driver) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send(callout) => match thread {
                    Thread::Main(main) => {
                        if let Err(reason) = self.send(main, &callout) {
                            // The driver logs the one clear error line; this is the host's detail.
                            abi::log_line(
                                Level::Debug,
                                format_args!("token request to cluster {:?} not sent: {reason}", callout.cluster),
                            );
                            queue.extend(driver.on_send_failed(callout.id, env::now_ms(), &mut ProcessEnv));
                        }
                    }
                    Thread::Worker(_) => {
                        lock(&self.outbox).push(callout);
                        self.post_main(EVENT_WAKE);
                    }
                },
                // Every configuration: one with the same cache key may have requests waiting.
                Action::BroadcastWake => {
                    if self.main.is_some() {
                        self.ticker.broadcast(EVENT_WAKE);
                    }
                }
                Action::Kick { profile } => {
                    lock(&self.kicks).push(profile);
                    self.post_main(EVENT_WAKE);
                }
                Action::Resume { request, header, value, generation, .. } => {
                    self.deliver(request, Outcome::Resume { header, value, generation })
                }
                Action::Fail { request, .. } => self.deliver(request, Outcome::Fail),
                Action::Refuse { request, refusal, .. } => self.deliver(request, Outcome::Refuse(refusal)),
                Action::Log { level: l, message } => abi::log(level(l), &format!("oauth2_cc: {message}")),
                Action::Count { profile, metric } => match thread {
                    Thread::Main(main) => self.metrics.count_on_main(main, profile, &metric),
                    Thread::Worker(stream) => self.metrics.count_on_worker(profile, &metric, stream),
                },
                Action::Gauge { profile, remaining_s, lifetime_s } => match thread {
                    Thread::Main(main) => self.metrics.gauges_on_main(main, profile, remaining_s, lifetime_s),
                    Thread::Worker(_) => {
                        self.metrics.gauges_on_worker(profile, remaining_s, lifetime_s);
                        self.post_main(EVENT_WAKE);
                    }
                },
            }
        }
    }

    fn send(&self, main: OnMain, callout: &lifecycle::Callout) -> Result<(), String> {
        let headers: Vec<(&str, &[u8])> = callout.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
        let body = callout.body.as_deref().unwrap_or_default();
        match self.handle.http_callout(main, &callout.cluster, &headers, body, callout.timeout_ms) {
            Ok(envoy_id) => {
                lock(&self.callouts).insert(envoy_id, callout.id);
                Ok(())
            }
            Err(code) => Err(format!("Envoy refused the callout (init result {code})")),
        }
    }

    /// A callout's answer (main thread). Copied out of Envoy's buffers at once; given to the
    /// driver now, or on the next main-thread event when the driver is busy (Envoy may answer a
    /// callout inline, while the executor that sent it still holds the driver).
    pub fn on_callout_done(
        &self,
        main: OnMain,
        envoy_id: u64,
        answered: bool,
        headers: &[(&[u8], &[u8])],
        chunks: &[&[u8]],
    ) {
        let header = |name: &[u8]| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.to_vec());
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        let mut body = Vec::with_capacity(total.min(self.answer_cap));
        for chunk in chunks {
            let room = self.answer_cap.saturating_sub(body.len());
            body.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
        }
        let answer = OwnedAnswer {
            envoy_id,
            status: if answered { header(b":status") } else { None },
            retry_after: if answered { header(b"retry-after") } else { None },
            too_large: total > self.answer_cap,
            body: if answered { body } else { Vec::new() },
            misses: 0,
        };
        lock(&self.answers).push(answer);
        self.drain_answers(main);
    }

    fn drain_answers(&self, main: OnMain) {
        let Ok(mut driver) = self.driver.try_lock() else {
            self.post_main(EVENT_WAKE);
            return;
        };
        loop {
            let answers = std::mem::take(&mut *lock(&self.answers));
            if answers.is_empty() {
                break;
            }
            let mut unmatched = Vec::new();
            for mut answer in answers {
                let Some(id) = lock(&self.callouts).remove(&answer.envoy_id) else {
                    // Answered inline, before `send` recorded its id: try again on the next event.
                    answer.misses = answer.misses.saturating_add(1);
                    if answer.misses < MAX_MISSES {
                        unmatched.push(answer);
                    }
                    continue;
                };
                let body = if answer.too_large || answer.body.len() > driver.answer_limit(id) {
                    AnswerBody::TooLarge
                } else {
                    AnswerBody::Bytes(&answer.body)
                };
                let view =
                    Answer { status: answer.status.as_deref(), retry_after: answer.retry_after.as_deref(), body };
                let actions = driver.on_answer(id, view, env::now_ms(), &mut ProcessEnv);
                self.execute(actions, Thread::Main(main), &mut driver);
            }
            if !unmatched.is_empty() {
                lock(&self.answers).extend(unmatched);
                self.post_main(EVENT_WAKE);
                break;
            }
        }
        self.publish(&driver);
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.ticker.unregister(self.id);
    }
}
