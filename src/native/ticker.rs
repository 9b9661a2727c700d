//! The one thread that drives every live filter configuration's tick: it posts a configuration's
//! tick event to that configuration's main-thread scheduler when the configuration asked for it
//! ([`Ticker::schedule`], from its driver's `next_wake` after every event), and sleeps until the
//! earliest time any configuration asked for (Envoy gives dynamic HTTP filters no timer; its
//! schedulers accept events from any thread). An earlier time, or a new configuration, wakes it
//! at once; it never sleeps longer than the core's `MAX_WAKE_INTERVAL_MS`, and a configuration
//! that asked for nothing is ticked that often.
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
use crate::env;
use crate::sync::{Condvar, Mutex, lock, thread, wait_until};
use oauth2_cc_core::lifecycle::{MAX_WAKE_INTERVAL_MS, wake_in_ms};

struct Registered {
    /// Configuration ids grow with load order: a larger one is newer.
    config: u64,
    scheduler: Weak<Scheduler>,
    event: u64,
    cache_keys: Vec<String>,
    /// When to post its next tick (milliseconds since the epoch).
    wake_at_ms: u64,
}

#[derive(Default)]
struct State {
    registered: Vec<Registered>,
    /// The run that should be ticking (`None`: no thread should); a thread whose run is not this
    /// one returns, so a stop followed at once by a start never leaves two threads ticking.
    running: Option<u64>,
    runs: u64,
    thread: Option<thread::JoinHandle<()>>,
    /// Until when the thread sleeps (`None`: it is awake and will look at every wake time before
    /// it sleeps again); an earlier wake time signals it.
    sleeping_until: Option<u64>,
    /// Ticks posted so far (tests).
    #[cfg(test)]
    ticks: u64,
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

    /// Posts `event` on `scheduler` whenever `config` asks ([`Ticker::schedule`]; until then, at
    /// most [`MAX_WAKE_INTERVAL_MS`] from now) until `config` unregisters (or the scheduler is
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
        let wake_at_ms = env::now_ms().saturating_add(MAX_WAKE_INTERVAL_MS);
        state.registered.push(Registered {
            config,
            scheduler: Arc::downgrade(scheduler),
            event,
            cache_keys,
            wake_at_ms,
        });
        if state.thread.is_some() {
            self.wake_if_sooner(&state, wake_at_ms);
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

    /// `config` wants its next tick at `wake_at_ms` (replacing the time it asked for before).
    pub fn schedule(&self, config: u64, wake_at_ms: u64) {
        let mut state = lock(&self.state);
        let Some(registered) = state.registered.iter_mut().find(|r| r.config == config) else { return };
        registered.wake_at_ms = wake_at_ms;
        self.wake_if_sooner(&state, wake_at_ms);
    }

    /// Signals the sleeping thread if `wake_at_ms` comes before the end of its sleep (the state's
    /// lock is held: the thread is either asleep on the signal or has yet to look at the times).
    fn wake_if_sooner(&self, state: &State, wake_at_ms: u64) {
        if state.sleeping_until.is_some_and(|until| wake_at_ms < until) {
            self.signal.notify_all();
        }
    }

    /// Ticks posted so far (tests).
    #[cfg(all(test, not(feature = "model-check")))]
    pub fn ticks(&self) -> u64 {
        lock(&self.state).ticks
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
        // The time a sleep that ran its full length reached: that much has passed, whatever the
        // wall clock says (the sleep is timed by a monotonic clock).
        let mut reached_ms = 0;
        while state.running == Some(run) {
            let now_ms = env::now_ms().max(reached_ms);
            let mut posted = 0;
            for registered in state.registered.iter_mut().filter(|r| r.wake_at_ms <= now_ms) {
                if let Some(scheduler) = registered.scheduler.upgrade() {
                    scheduler.commit(registered.event);
                    posted += 1;
                }
                // The tick's own event schedules the next one; this stands only if it never runs.
                registered.wake_at_ms = now_ms.saturating_add(MAX_WAKE_INTERVAL_MS);
            }
            #[cfg(test)]
            {
                state.ticks += posted;
            }
            #[cfg(not(test))]
            let _ = posted;
            let next_ms = state.registered.iter().map(|r| r.wake_at_ms).min();
            let sleep_ms = wake_in_ms(next_ms, now_ms);
            state.sleeping_until = Some(now_ms.saturating_add(sleep_ms));
            let (guard, slept) = wait_until(&self.state, &self.signal, state, Duration::from_millis(sleep_ms));
            state = guard;
            state.sleeping_until = None;
            reached_ms = if slept { now_ms.saturating_add(sleep_ms) } else { 0 };
        }
    }
}
