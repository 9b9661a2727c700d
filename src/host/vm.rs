//! State one VM's contexts share: the compiled configuration, the requests paused waiting for a
//! token, and the identity this VM uses for fetch leases.
//!
//! A VM is single-threaded, so `Rc` and `RefCell` are enough; nothing here crosses VMs (that is
//! what shared data and shared queues are for).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::core::cache::{self, EntryView};
use crate::core::config::Config;
use crate::host::metrics::Metrics;
use crate::host::shared;

/// A request paused until its profile has a token.
pub struct Waiter {
    pub context_id: u32,
    pub profile: usize,
    pub deadline_ms: u64,
    pub shared: Rc<RequestState>,
}

/// What the root context and a request's own context both need to know about that request.
#[derive(Default)]
pub struct RequestState {
    /// Paused waiting for a token: body data must be held back too.
    pub waiting: Cell<bool>,
    /// The generation of the token written on the request, so the request's own context can
    /// purge that token if the upstream rejects it.
    pub injected: Cell<Option<u64>>,
}

/// Per-VM state shared by the root context and its http contexts.
pub struct VmState {
    pub config: Rc<Config>,
    pub waiters: RefCell<Vec<Waiter>>,
    /// This VM's own wake queue, for kicking a fetch from an http context.
    pub own_queue: Cell<Option<u32>>,
    pub metrics: Metrics,
    /// Whether this VM serves requests (a worker); main-thread VMs never create http contexts.
    pub serves_requests: Cell<bool>,
    /// Per profile, this VM's copy of the cached token, so the request path reads no shared data.
    pub snapshots: RefCell<Vec<Option<TokenSnapshot>>>,
    /// The VM id other VMs' wake queues are resolved with.
    pub vm_id: RefCell<String>,
}

/// A VM's copy of a profile's token as shared data held it at the last tick or wake.
///
/// Shared data stays the source of truth: the copy is refreshed on every tick (100 ms) and on every
/// wake, and every write that changes the token (a fetch, a purge) wakes all VMs. A copy is kept
/// only while [`cache::keep_vm_copy`] says so, so it never injects an expired token.
pub struct TokenSnapshot {
    pub generation: u64,
    /// Prefix and token, ready for the header.
    pub header_value: String,
}

impl VmState {
    pub fn new(config: Rc<Config>) -> Self {
        VmState {
            metrics: Metrics::define(&config),
            config,
            waiters: RefCell::new(Vec::new()),
            own_queue: Cell::new(None),
            serves_requests: Cell::new(false),
            snapshots: RefCell::new(Vec::new()),
            vm_id: RefCell::new(String::new()),
        }
    }

    /// Re-reads every profile's entry from shared data into this VM's snapshots.
    pub fn refresh_snapshots(&self, now_ms: u64) {
        for index in 0..self.config.profiles.len() {
            let _ = self.refresh_snapshot(index, now_ms);
        }
    }

    /// Re-reads one profile's entry from shared data into this VM's snapshot (kept only while
    /// [`cache::keep_vm_copy`] at `now_ms`); returns the entry's bytes for callers that decide on
    /// more than the token.
    pub fn refresh_snapshot(&self, profile_index: usize, now_ms: u64) -> Option<Vec<u8>> {
        let profile = self.config.profiles.get(profile_index)?;
        let bytes = shared::read(&profile.cache_key).0;
        let snapshot =
            bytes.as_deref().and_then(EntryView::decode).filter(|v| cache::keep_vm_copy(v, now_ms)).map(|v| {
                TokenSnapshot {
                    generation: v.generation,
                    header_value: format!("{}{}", profile.inject.prefix, v.token),
                }
            });
        if let Ok(mut snapshots) = self.snapshots.try_borrow_mut() {
            if snapshots.len() != self.config.profiles.len() {
                snapshots.resize_with(self.config.profiles.len(), || None);
            }
            if let Some(slot) = snapshots.get_mut(profile_index) {
                *slot = snapshot;
            }
        }
        bytes
    }
}
