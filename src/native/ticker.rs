//! The one thread that drives every live filter configuration's tick: every [`TICK_PERIOD`] it
//! posts each configuration's tick event to that configuration's main-thread scheduler (Envoy
//! gives dynamic HTTP filters no timer; its schedulers accept events from any thread).
//!
//! One thread for the process, however many configurations a control plane pushes: a
//! configuration registers when it loads and unregisters when it is destroyed (an old listener's
//! may live on while it drains). Schedulers are held weakly, so the thread keeps nothing alive;
//! it commits under its lock, so a configuration that unregisters never has its scheduler deleted
//! on this thread. The thread starts with the first registration and is stopped and joined when
//! the last configuration goes away (the module may be unloaded then). The same list carries a
//! broadcast wake: a token one configuration stored reaches every configuration at once; and
//! each configuration's cache keys, so an older configuration (a listener being drained) learns
//! that a newer one owns a key's fetches.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use crate::abi::Scheduler;
use crate::sync::{Condvar, Mutex, lock, thread, wait_period};

pub const TICK_PERIOD: Duration = Duration::from_millis(100);

struct Registered {
    /// Configuration ids grow with load order: a larger one is newer.
    config: u64,
    scheduler: Weak<Scheduler>,
    event: u64,
    cache_keys: Vec<String>,
}

#[derive(Default)]
struct State {
    registered: Vec<Registered>,
    /// The run that should be ticking (`None`: no thread should); a thread whose run is not this
    /// one returns, so a stop followed at once by a start never leaves two threads ticking.
    running: Option<u64>,
    runs: u64,
    thread: Option<thread::JoinHandle<()>>,
}

#[derive(Default)]
pub struct Ticker {
    state: Mutex<State>,
    signal: Condvar,
}

impl Ticker {
    /// The ticker of this process.
    pub fn process() -> Arc<Ticker> {
        static PROCESS: OnceLock<Arc<Ticker>> = OnceLock::new();
        Arc::clone(PROCESS.get_or_init(|| Arc::new(Ticker::default())))
    }

    /// Posts `event` on `scheduler` every period until `config` unregisters (or the scheduler is
    /// dropped); `cache_keys` are the configuration's profiles' keys. False if the thread could
    /// not be started.
    pub fn register(
        self: &Arc<Self>,
        config: u64,
        scheduler: &Arc<Scheduler>,
        event: u64,
        cache_keys: Vec<String>,
    ) -> bool {
        let mut state = lock(&self.state);
        state.registered.retain(|r| r.scheduler.strong_count() > 0);
        state.registered.push(Registered { config, scheduler: Arc::downgrade(scheduler), event, cache_keys });
        if state.thread.is_some() {
            return true;
        }
        state.runs += 1;
        let run = state.runs;
        let ticker = Arc::clone(self);
        state.thread = thread::Builder::new().name("oauth2_cc-tick".into()).spawn(move || ticker.run(run)).ok();
        state.running = state.thread.as_ref().map(|_| run);
        state.thread.is_some()
    }

    /// Stops ticking `config`; the last configuration out stops the thread and waits for it.
    pub fn unregister(&self, config: u64) {
        let finished = {
            let mut state = lock(&self.state);
            state.registered.retain(|r| r.config != config && r.scheduler.strong_count() > 0);
            if state.registered.is_empty() {
                state.running = None;
                state.thread.take()
            } else {
                None
            }
        };
        self.signal.notify_all();
        if let Some(finished) = finished {
            let _ = finished.join();
        }
    }

    /// The cache keys of `config` that a newer registered configuration also has (the driver's
    /// `set_superseded`: the newest configuration of a key owns its fetches).
    pub fn superseded(&self, config: u64) -> Vec<String> {
        let state = lock(&self.state);
        let Some(own) = state.registered.iter().find(|r| r.config == config) else { return Vec::new() };
        own.cache_keys
            .iter()
            .filter(|key| state.registered.iter().any(|r| r.config > config && r.cache_keys.contains(key)))
            .cloned()
            .collect()
    }

    /// Posts `event` to every registered configuration now (a token changed: a configuration
    /// with the same cache key, an old one still draining, takes it at once rather than on its
    /// next tick).
    pub fn broadcast(&self, event: u64) {
        let state = lock(&self.state);
        for registered in &state.registered {
            if let Some(scheduler) = registered.scheduler.upgrade() {
                scheduler.commit(event);
            }
        }
    }

    fn run(&self, run: u64) {
        let mut state = lock(&self.state);
        loop {
            state = wait_period(&self.state, &self.signal, state, TICK_PERIOD);
            if state.running != Some(run) {
                return;
            }
            for registered in &state.registered {
                if let Some(scheduler) = registered.scheduler.upgrade() {
                    scheduler.commit(registered.event);
                }
            }
        }
    }
}
