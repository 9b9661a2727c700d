//! One VM's state and the executor of the lifecycle's actions.
//!
//! A VM is single-threaded, so `Rc`, `Cell` and `RefCell` are enough; nothing here crosses VMs
//! (shared data and shared queues do). Borrows are always `try_` borrows, and none is held across
//! a host call that can re-enter the VM (resuming a request, a local reply): a re-entered context
//! finds every cell free.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use proxy_wasm::types::MapType;

use crate::adapter::{self, Level};
use crate::metrics::Metrics;
use crate::queue;
use crate::store::SharedData;
use oauth2_cc_core::config::Config;
use oauth2_cc_core::lifecycle::{self, Action, CalloutId, Driver, LogLevel};
use oauth2_cc_core::request::{Delivered, Next, RequestPath, Step};

/// A paused request's place in the request path, shared by its own context and the root
/// context that delivers its outcome (made only when a request pauses).
#[derive(Default)]
pub struct RequestState {
    pub path: Cell<RequestPath>,
}

/// When [`VmState::ask_tick`] replaces the timer Envoy runs for the root context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rearm {
    /// From a tick or a configuration: always (after a tick Envoy re-arms with the last period).
    Always,
    /// After any other event: only when the driver needs a tick before the one asked for.
    IfSooner,
}

/// A configured VM: the driver and what carrying out its actions needs.
pub struct Configured {
    pub driver: Driver,
    pub metrics: Metrics,
}

/// Per-VM state shared by the root context and its http contexts.
pub struct VmState {
    pub root_context_id: u32,
    /// `None` until a configuration is accepted.
    pub configured: RefCell<Option<Configured>>,
    /// This VM's own queue, for kicks from its requests and wakes from every VM.
    pub own_queue: Cell<Option<u32>>,
    /// The VM id other VMs' queues are resolved with.
    pub vm_id: RefCell<String>,
    /// Requests paused on this VM, by context id.
    pub paused: RefCell<HashMap<u64, Rc<RequestState>>>,
    /// Callouts in flight: the host's token → the driver's id.
    pub callouts: RefCell<HashMap<u32, CalloutId>>,
    /// When the root context's next tick comes, as last asked of Envoy (milliseconds since the
    /// epoch).
    pub tick_at_ms: Cell<u64>,
}

impl VmState {
    pub fn new(root_context_id: u32) -> Self {
        VmState {
            root_context_id,
            configured: RefCell::new(None),
            own_queue: Cell::new(None),
            vm_id: RefCell::new(String::new()),
            paused: RefCell::new(HashMap::new()),
            callouts: RefCell::new(HashMap::new()),
            tick_at_ms: Cell::new(0),
        }
    }

    /// The current configuration, if any.
    pub fn config(&self) -> Option<Arc<Config>> {
        self.configured.try_borrow().ok()?.as_ref().map(|c| Arc::clone(c.driver.config()))
    }

    /// Runs `event` on the driver (if configured and free) at `now_ms`, carries out its actions,
    /// and brings the next tick forward if the driver now needs one sooner.
    pub fn drive(&self, now_ms: u64, event: impl FnOnce(&mut Driver, &mut SharedData) -> Vec<Action>) {
        let actions = match self.configured.try_borrow_mut() {
            Ok(mut configured) => match configured.as_mut() {
                Some(c) => event(&mut c.driver, &mut SharedData),
                None => return,
            },
            Err(_) => return,
        };
        self.execute(actions);
        self.ask_tick(now_ms, Rearm::IfSooner);
    }

    /// Asks Envoy for the root context's next tick when the driver next needs one
    /// (`Driver::next_wake`, at most the core's ceiling from now). Envoy's `set_tick_period`
    /// replaces the timer, counting from now, and re-arms it with the same period after every
    /// tick; a period of 0 would stop it (`wake_in_ms` is never 0). Returns the period asked for.
    pub fn ask_tick(&self, now_ms: u64, rearm: Rearm) -> Option<u64> {
        let next = self.configured.try_borrow().ok()?.as_ref()?.driver.next_wake();
        let wake_in = lifecycle::wake_in_ms(next, now_ms);
        let at = now_ms.saturating_add(wake_in);
        // Later than the tick already asked for: that tick comes first and asks again.
        if rearm == Rearm::IfSooner && at >= self.tick_at_ms.get() {
            return None;
        }
        adapter::set_tick_period(Duration::from_millis(wake_in));
        self.tick_at_ms.set(at);
        Some(wake_in)
    }

    /// Carries out the driver's actions in order.
    pub fn execute(&self, actions: Vec<Action>) {
        let mut work: std::collections::VecDeque<Action> = actions.into();
        let mut moved_context = false;
        while let Some(action) = work.pop_front() {
            match action {
                Action::Send(callout) => {
                    let timeout = Duration::from_millis(callout.timeout_ms);
                    match adapter::dispatch(&callout.cluster, &callout.headers, callout.body.as_deref(), timeout) {
                        Ok(token) => {
                            if let Ok(mut callouts) = self.callouts.try_borrow_mut() {
                                callouts.insert(token, callout.id);
                            }
                        }
                        Err(_) => {
                            let now_ms = adapter::now_ms();
                            let more = self.with_driver(|d, env| d.on_send_failed(callout.id, now_ms, env));
                            work.extend(more);
                        }
                    }
                }
                Action::BroadcastWake => queue::broadcast_wake(&self.vm_id.borrow()),
                Action::Kick { profile } => {
                    if let Some(own) = self.own_queue.get() {
                        queue::kick(own, profile);
                    }
                }
                Action::Resume { request, profile, header, value, generation } => {
                    moved_context = true;
                    self.deliver(request, Delivered::Token { profile, header: &header, value: &value, generation });
                }
                Action::Fail { request, profile } => {
                    moved_context = true;
                    self.deliver(request, Delivered::Fail { profile });
                }
                Action::Refuse { request, profile, refusal } => {
                    moved_context = true;
                    self.deliver(request, Delivered::Refused { profile, refusal });
                }
                Action::Log { level, message } => adapter::log(level_of(level), &message),
                Action::Count { profile, metric } => self.with_metrics(|m| m.count(profile, &metric)),
                Action::Gauge { profile, remaining_s, lifetime_s } => {
                    self.with_metrics(|m| m.gauges(profile, remaining_s, lifetime_s))
                }
            }
        }
        if moved_context {
            let _ = adapter::set_effective_context(self.root_context_id);
        }
    }

    /// Carries out a paused request's outcome on its own context, as the request path says.
    fn deliver(&self, request: u64, delivered: Delivered<'_>) {
        let Some(state) = self.take_paused(request) else { return };
        if adapter::set_effective_context(request as u32).is_err() {
            return; // the request is gone
        }
        let Some(config) = self.config() else { return };
        let mut path = state.path.get();
        let next = path.on_delivered(&config, Some(delivered));
        let next = self.write_header(&config, &mut path, next);
        state.path.set(path);
        self.carry_out(next);
    }

    /// Writes the header a step asks for on the effective context's request and gives the path
    /// the answer; any other step is returned as it is.
    pub fn write_header(&self, config: &Config, path: &mut RequestPath, next: Next<'_>) -> Next<'static> {
        match next.step {
            Step::WriteHeader { name, value } => {
                let written = adapter::set_request_header(name, value).is_ok();
                path.on_header_written(config, written)
            }
            Step::Continue => Next { step: Step::Continue, count: next.count },
            Step::Resume => Next { step: Step::Resume, count: next.count },
            Step::Pause => Next { step: Step::Pause, count: next.count },
            Step::AskDriver { profile } => Next { step: Step::AskDriver { profile }, count: next.count },
            Step::Reply { reply, error } => Next { step: Step::Reply { reply, error }, count: next.count },
            _ => Next { step: Step::Nothing, count: next.count },
        }
    }

    /// Counts what the request path says and carries out its final step on the effective
    /// context's request: `true` when the request is held (paused or answered).
    pub fn carry_out(&self, next: Next<'_>) -> bool {
        if let Some((profile, metric)) = &next.count {
            self.with_metrics(|m| m.count(*profile, metric));
        }
        match next.step {
            Step::Resume => {
                let _ = adapter::resume_request();
                false
            }
            Step::Reply { reply, error } => {
                if let Some(error) = error {
                    adapter::log(Level::Error, &error);
                }
                let _ = adapter::send_local_response(
                    reply.status,
                    reply.details,
                    &[("content-type", "application/json")],
                    reply.body.as_bytes(),
                );
                true
            }
            Step::Pause => true,
            _ => false,
        }
    }

    fn take_paused(&self, request: u64) -> Option<Rc<RequestState>> {
        self.paused.try_borrow_mut().ok()?.remove(&request)
    }

    fn with_driver(&self, f: impl FnOnce(&mut Driver, &mut SharedData) -> Vec<Action>) -> Vec<Action> {
        match self.configured.try_borrow_mut() {
            Ok(mut configured) => configured.as_mut().map(|c| f(&mut c.driver, &mut SharedData)).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    pub fn with_metrics(&self, f: impl FnOnce(&Metrics)) {
        if let Ok(configured) = self.configured.try_borrow()
            && let Some(c) = configured.as_ref()
        {
            f(&c.metrics);
        }
    }

    /// The answer to callout `token`: its status, Retry-After and (size permitting) body.
    pub fn on_callout_answer(&self, token: u32, body_size: usize) {
        let Some(id) = self.callouts.try_borrow_mut().ok().and_then(|mut c| c.remove(&token)) else { return };
        let limit = match self.configured.try_borrow() {
            Ok(configured) => configured.as_ref().map_or(0, |c| c.driver.answer_limit(id)),
            Err(_) => return,
        };
        let status = adapter::header(MapType::HttpCallResponseHeaders, ":status");
        let retry_after = adapter::header(MapType::HttpCallResponseHeaders, "retry-after");
        let body = if body_size > limit {
            None
        } else {
            Some(adapter::buffer(proxy_wasm::types::BufferType::HttpCallResponseBody, body_size).unwrap_or_default())
        };
        let answer = lifecycle::Answer {
            status: status.as_deref(),
            retry_after: retry_after.as_deref(),
            body: match &body {
                Some(bytes) => lifecycle::AnswerBody::Bytes(bytes),
                None => lifecycle::AnswerBody::TooLarge,
            },
        };
        let now_ms = adapter::now_ms();
        self.drive(now_ms, |driver, env| driver.on_answer(id, answer, now_ms, env));
    }
}

fn level_of(level: LogLevel) -> Level {
    match level {
        LogLevel::Debug => Level::Debug,
        LogLevel::Info => Level::Info,
        LogLevel::Warn => Level::Warn,
        LogLevel::Error => Level::Error,
    }
}
