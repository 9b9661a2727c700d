//! The thread that drives a filter configuration's tick: every 100 ms it posts a tick event to
//! the main thread (Envoy gives dynamic HTTP filters no timer; its schedulers accept events from
//! any thread). Stopped and joined when the configuration is destroyed.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::abi::Scheduler;

pub const TICK_PERIOD: Duration = Duration::from_millis(100);

pub struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts posting `event` on `scheduler` every [`TICK_PERIOD`]; `None` if the thread could not
    /// be started.
    pub fn start(scheduler: Arc<Scheduler>, event: u64) -> Option<Ticker> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("oauth2_cc-tick".into())
            .spawn(move || {
                let (lock, signal) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                loop {
                    let (guard, _) =
                        signal.wait_timeout(stopped, TICK_PERIOD).unwrap_or_else(|poisoned| poisoned.into_inner());
                    stopped = guard;
                    if *stopped {
                        return;
                    }
                    scheduler.commit(event);
                }
            })
            .ok()?;
        Some(Ticker { stop, thread: Some(thread) })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (lock, signal) = &*self.stop;
        *lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = true;
        signal.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
