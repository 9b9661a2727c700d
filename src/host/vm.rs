//! State one VM's contexts share: the compiled configuration, the requests paused waiting for a
//! token, and the identity this VM uses for fetch leases.
//!
//! A VM is single-threaded, so `Rc` and `RefCell` are enough; nothing here crosses VMs (that is
//! what shared data and shared queues are for).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::core::config::Config;
use crate::host::metrics::Metrics;

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
}

impl VmState {
    pub fn new(config: Rc<Config>) -> Self {
        VmState {
            metrics: Metrics::define(&config),
            config,
            waiters: RefCell::new(Vec::new()),
            own_queue: Cell::new(None),
            serves_requests: Cell::new(false),
        }
    }
}
