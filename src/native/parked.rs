//! Requests paused for a token, as the main thread reaches them: each has a mailbox for its
//! outcome and its own Envoy scheduler, which runs `on_http_filter_scheduled` on the request's
//! worker, where the outcome is carried out.

use crate::abi::Scheduler;
use crate::sync::{Mutex, MutexGuard, lock};

/// What the driver decided for a paused request.
pub enum Outcome {
    /// Write `header: value` (token `generation`) and continue the request.
    Resume { header: String, value: String, generation: u64 },
    /// Answer with the failure reply of the profile.
    Fail,
    /// Answer with the reply of a token-exchange profile's refusal.
    Refuse(oauth2_cc_core::exchange::Refusal),
}

/// The event id posted to a paused request's worker.
pub const DELIVERED: u64 = 1;

struct Inner {
    /// `None` once the request is gone: nothing is posted to it any more.
    scheduler: Option<Scheduler>,
    outcome: Option<Outcome>,
}

/// One paused request's mailbox, shared by its stream (worker) and the main thread.
pub struct Parked {
    inner: Mutex<Inner>,
}

impl Parked {
    pub fn new(scheduler: Scheduler) -> Parked {
        Parked { inner: Mutex::new(Inner { scheduler: Some(scheduler), outcome: None }) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Leaves the outcome and wakes the request on its worker (any thread). False when the
    /// request is already gone.
    pub fn deliver(&self, outcome: Outcome) -> bool {
        let mut inner = self.lock();
        if inner.scheduler.is_none() {
            return false;
        }
        inner.outcome = Some(outcome);
        if let Some(scheduler) = &inner.scheduler {
            scheduler.commit(DELIVERED);
        }
        true
    }

    /// The outcome, on the request's worker; `None` for a wake that brought none (the request
    /// then stays paused and listed: its outcome, or its client going away, is still to come).
    pub fn take(&self) -> Option<Outcome> {
        self.lock().outcome.take()
    }

    /// The request is gone: delete its scheduler (under the lock, so no delivery races it).
    pub fn close(&self) {
        let scheduler = self.lock().scheduler.take();
        drop(scheduler);
    }
}
