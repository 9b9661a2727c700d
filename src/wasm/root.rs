//! The root context: configuration, the tick, the queue, and callout answers, each handed to the
//! VM's lifecycle driver (`core::lifecycle`), whose actions `vm` carries out.
//!
//! Every VM (Envoy's main-thread VMs and one per worker) runs one. Token requests are sent from
//! here: a callout from a root context outlives any request, where one from an http context would
//! be cancelled with its request.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use crate::adapter::{self, Level};
use crate::http::{PassThrough, TokenInjector};
use crate::metrics::Metrics;
use crate::queue;
use crate::store::SharedData;
use crate::vm::{Configured, Rearm, VmState};
use oauth2_cc_core::config;
use oauth2_cc_core::lifecycle::Driver;
use oauth2_cc_core::wake_registry::HEARTBEAT_MS;

/// The largest plugin configuration read.
const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

pub struct FilterRoot {
    holder_id: u64,
    queue_name: String,
    vm: Rc<VmState>,
    next_heartbeat_ms: u64,
}

impl FilterRoot {
    pub fn new(context_id: u32) -> Self {
        let holder_id = adapter::random_u64().max(1);
        FilterRoot {
            holder_id,
            queue_name: format!("oauth2_cc.wake.{holder_id:016x}.{context_id}"),
            vm: Rc::new(VmState::new(context_id)),
            next_heartbeat_ms: 0,
        }
    }

    fn on_wake(&self, kicked: &[usize]) {
        let now_ms = adapter::now_ms();
        self.vm.drive(now_ms, |driver, env| driver.on_wake(kicked, now_ms, env));
    }
}

impl Context for FilterRoot {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        self.vm.on_callout_answer(token_id, body_size);
    }
}

impl RootContext for FilterRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = adapter::buffer(BufferType::PluginConfiguration, MAX_CONFIG_BYTES).unwrap_or_default();
        let config::Loaded { config, log_line } = match config::load(&bytes, &|name| std::env::var(name).ok()) {
            Ok(loaded) => loaded,
            Err(error) => {
                adapter::log(Level::Error, &error);
                return false;
            }
        };
        let vm_id = adapter::property(&["plugin_vm_id"]).and_then(|b| String::from_utf8(b).ok()).unwrap_or_default();
        if let Ok(mut own) = self.vm.vm_id.try_borrow_mut() {
            *own = vm_id;
        }
        let now_ms = adapter::now_ms();
        if self.vm.own_queue.get().is_none() {
            match queue::register(&self.queue_name, now_ms) {
                Some(queue) => self.vm.own_queue.set(Some(queue)),
                None => {
                    adapter::log(Level::Warn, "cannot register a wake queue; paused requests wait for the next tick")
                }
            }
            self.next_heartbeat_ms = now_ms.saturating_add(HEARTBEAT_MS);
        }
        adapter::log(Level::Info, &log_line);
        let metrics = Metrics::define(&config);
        let actions = match self.vm.configured.try_borrow_mut() {
            Ok(mut configured) => match configured.as_mut() {
                Some(existing) => {
                    existing.metrics = metrics;
                    existing.driver.reconfigure(config, now_ms, &mut SharedData)
                }
                None => {
                    let (driver, actions) = Driver::new(config, self.holder_id, now_ms, &mut SharedData);
                    *configured = Some(Configured { driver, metrics });
                    actions
                }
            },
            Err(_) => return false,
        };
        self.vm.execute(actions);
        // A new driver wants its first tick at once: it prefetches every profile, so the first
        // request finds a token.
        self.vm.ask_tick(now_ms, Rearm::Always);
        true
    }

    /// Envoy's timer, set to when the driver next needs a tick (`VmState::ask_tick`).
    fn on_tick(&mut self) {
        let now_ms = adapter::now_ms();
        self.vm.with_metrics(|m| m.flush());
        if now_ms >= self.next_heartbeat_ms {
            queue::heartbeat(&self.queue_name, now_ms);
            self.next_heartbeat_ms = now_ms.saturating_add(HEARTBEAT_MS);
        }
        self.vm.drive(now_ms, |driver, env| driver.on_tick(now_ms, env));
        if let Some(wake_in) = self.vm.ask_tick(now_ms, Rearm::Always) {
            adapter::log(Level::Debug, &format!("tick; next tick in {wake_in} ms"));
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let messages = queue::drain(queue_id);
        if messages.woken || !messages.kicked.is_empty() {
            self.on_wake(&messages.kicked);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Always a context: the SDK panics on `None`. Before a configuration is accepted, requests
        // pass through untouched (Envoy does not route traffic to a plugin that failed to load).
        match self.vm.configured.try_borrow_mut() {
            Ok(mut configured) => match configured.as_mut() {
                Some(c) => c.driver.set_serves_requests(),
                None => return Some(Box::new(PassThrough)),
            },
            Err(_) => return Some(Box::new(PassThrough)),
        }
        Some(Box::new(TokenInjector::new(context_id, Rc::clone(&self.vm))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
