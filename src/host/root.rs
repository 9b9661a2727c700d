//! The root context: configuration, token fetches, and waking paused requests.
//!
//! Every VM (Envoy's main-thread VMs and one per worker) runs one. On each tick and on each wake it
//! asks the core whether a profile needs a token and, if this VM wins the fetch lease, sends the
//! token request from here: a callout from a root context outlives any request, where one from an
//! http context would be cancelled with its request. When a token lands it is written to shared
//! data and every VM is woken through its shared queue to resume the requests it paused.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use crate::core::cache::{self, Entry, EntryView, RequestDecision};
use crate::core::config::{self, Config};
use crate::host::fetch::Fetcher;
use crate::host::http::{TokenInjector, send_failure_reply};
use crate::host::vm::{VmState, Waiter};
use crate::host::{abi, clock, shared};

/// How often each VM looks at its profiles and its paused requests.
const TICK: Duration = Duration::from_millis(100);
/// The first tick after configuration, which prefetches tokens.
const FIRST_TICK: Duration = Duration::from_millis(1);
/// How often the remaining-lifetime gauges are set.
const GAUGE_PERIOD_MS: u64 = 1_000;
/// Queue message prefix: an http context asks for a fetch of the profile whose index follows.
const KICK: u8 = b'k';

pub struct FilterRoot {
    context_id: u32,
    fetcher: Fetcher,
    queue_name: String,
    state: Option<Rc<VmState>>,
    next_heartbeat_ms: u64,
    next_gauge_ms: u64,
    first_tick_pending: bool,
}

impl FilterRoot {
    pub fn new(context_id: u32) -> Self {
        let holder_id = clock::random_u64().max(1);
        FilterRoot {
            context_id,
            fetcher: Fetcher::new(holder_id),
            queue_name: format!("oauth2_cc.wake.{holder_id:016x}.{context_id}"),
            state: None,
            next_heartbeat_ms: 0,
            next_gauge_ms: 0,
            first_tick_pending: false,
        }
    }

    fn config(&self) -> Option<Rc<Config>> {
        self.state.as_ref().map(|s| Rc::clone(&s.config))
    }

    /// Resumes or fails the requests this VM paused, as their profile's entry now allows.
    fn settle_waiters(&self, now_ms: u64) {
        let Some(state) = &self.state else { return };
        // Take the list out: resuming a request or answering it can re-enter this VM's http
        // contexts synchronously, and they must find the list free.
        let waiters = match state.waiters.try_borrow_mut() {
            Ok(mut list) if !list.is_empty() => std::mem::take(&mut *list),
            _ => return,
        };
        let config = &state.config;
        let mut entries: HashMap<usize, Option<Vec<u8>>> = HashMap::new();
        let mut still_waiting = Vec::new();
        for waiter in waiters {
            let Some(profile) = config.profiles.get(waiter.profile) else { continue };
            let bytes = entries.entry(waiter.profile).or_insert_with(|| shared::read(&profile.cache_key).0);
            let view = bytes.as_deref().and_then(EntryView::decode);
            let decision = cache::decide_request(view.as_ref(), now_ms);
            if decision == RequestDecision::Wait && now_ms < waiter.deadline_ms {
                still_waiting.push(waiter);
                continue;
            }
            if abi::set_effective_context(waiter.context_id).is_err() {
                continue; // the request is gone
            }
            waiter.shared.waiting.set(false);
            match decision {
                RequestDecision::Inject { token, generation } => {
                    let value = format!("{}{}", profile.inject.prefix, token);
                    if abi::set_request_header(&profile.inject.header, &value).is_ok() {
                        waiter.shared.injected.set(Some(generation));
                        state.metrics.injected(waiter.profile);
                        let _ = abi::resume_request();
                    } else {
                        send_failure_reply(state, waiter.profile);
                    }
                }
                RequestDecision::Fail => send_failure_reply(state, waiter.profile),
                RequestDecision::Wait => {
                    log::warn!(
                        "profile {:?}: no token within max_wait_ms ({} ms); failing the request",
                        profile.name,
                        profile.max_wait_ms
                    );
                    send_failure_reply(state, waiter.profile);
                }
            }
        }
        let _ = abi::set_effective_context(self.context_id);
        if let Ok(mut list) = state.waiters.try_borrow_mut() {
            still_waiting.append(&mut list);
            *list = still_waiting;
        }
    }

    /// Flushes the locally counted injections and, once a second on VMs that serve no requests
    /// (the main thread), sets each profile's remaining-lifetime gauge.
    fn report_gauges(&mut self, now_ms: u64) {
        let Some(state) = &self.state else { return };
        state.metrics.flush();
        if state.serves_requests.get() || now_ms < self.next_gauge_ms {
            return;
        }
        self.next_gauge_ms = now_ms + GAUGE_PERIOD_MS;
        for (index, profile) in state.config.profiles.iter().enumerate() {
            let entry = shared::read(&profile.cache_key).0.as_deref().and_then(Entry::decode).unwrap_or_default();
            let remaining_ms = if entry.token.is_empty() { 0 } else { entry.expires_at_ms.saturating_sub(now_ms) };
            state.metrics.token_remaining(index, remaining_ms / 1000);
        }
    }

    fn profiles_with_waiters(&self) -> Vec<usize> {
        let Some(state) = &self.state else { return Vec::new() };
        let Ok(list) = state.waiters.try_borrow() else { return Vec::new() };
        let mut profiles: Vec<usize> = list.iter().map(|w| w.profile).collect();
        profiles.sort_unstable();
        profiles.dedup();
        profiles
    }

    fn fail_all_waiters(&self, state: &VmState) {
        let waiters: Vec<Waiter> =
            state.waiters.try_borrow_mut().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default();
        for waiter in waiters {
            if abi::set_effective_context(waiter.context_id).is_ok() {
                send_failure_reply(state, waiter.profile);
            }
        }
        let _ = abi::set_effective_context(self.context_id);
    }
}

impl Context for FilterRoot {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        if let Some(state) = self.state.clone() {
            self.fetcher.on_response(&state, token_id, body_size);
        }
    }
}

impl RootContext for FilterRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        let config = match config::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok(config) => config,
            Err(error) => {
                log::error!("configuration rejected: {error}");
                return false;
            }
        };
        for profile in &config.profiles {
            shared::ensure_entry(&profile.cache_key);
        }
        let vm_id = hostcalls::get_property(vec!["plugin_vm_id"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        self.fetcher.configure(vm_id.clone());
        let state = VmState::new(Rc::new(config));
        match hostcalls::register_shared_queue(&self.queue_name) {
            Ok(queue) => state.own_queue.set(Some(queue)),
            Err(status) => {
                log::warn!("cannot register a wake queue ({status:?}); paused requests wait for the next tick")
            }
        }
        shared::register_wake_queue(&self.queue_name, clock::now_ms());
        self.next_heartbeat_ms = clock::now_ms() + crate::core::wake_registry::HEARTBEAT_MS;
        if let Some(old) = self.state.take() {
            self.fail_all_waiters(&old);
        }
        log::info!(
            "configured {} profile(s): {}",
            state.config.profiles.len(),
            state.config.profiles.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        *state.vm_id.borrow_mut() = vm_id;
        state.refresh_snapshots(clock::now_ms());
        self.state = Some(Rc::new(state));
        // The first tick comes at once: it prefetches every profile, so the first request finds a token.
        let _ = hostcalls::set_tick_period(FIRST_TICK);
        self.first_tick_pending = true;
        true
    }

    fn on_tick(&mut self) {
        if self.first_tick_pending {
            self.first_tick_pending = false;
            let _ = hostcalls::set_tick_period(TICK);
        }
        let now_ms = clock::now_ms();
        self.report_gauges(now_ms);
        if let Some(state) = &self.state {
            state.refresh_snapshots(now_ms);
        }
        if now_ms >= self.next_heartbeat_ms {
            shared::register_wake_queue(&self.queue_name, now_ms);
            self.next_heartbeat_ms = now_ms + crate::core::wake_registry::HEARTBEAT_MS;
        }
        let count = self.config().map_or(0, |c| c.profiles.len());
        if let Some(state) = self.state.clone() {
            for index in 0..count {
                self.fetcher.maybe_fetch(&state, index, now_ms);
            }
        }
        // Fetches first: settling may re-enter http contexts, after which nothing is dispatched.
        self.settle_waiters(now_ms);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let mut kicks = Vec::new();
        while let Ok(Some(message)) = hostcalls::dequeue_shared_queue(queue_id) {
            if let [KICK, index @ ..] = message.as_slice()
                && let Ok(bytes) = <[u8; 4]>::try_from(index)
            {
                kicks.push(u32::from_le_bytes(bytes) as usize);
            }
        }
        let now_ms = clock::now_ms();
        // A wake means some VM changed a token: take the new copies now.
        if let Some(state) = &self.state {
            state.refresh_snapshots(now_ms);
        }
        kicks.extend(self.profiles_with_waiters());
        kicks.sort_unstable();
        kicks.dedup();
        if let Some(state) = self.state.clone() {
            for index in kicks {
                self.fetcher.maybe_fetch(&state, index, now_ms);
            }
        }
        self.settle_waiters(now_ms);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let state = self.state.as_ref()?;
        state.serves_requests.set(true);
        Some(Box::new(TokenInjector::new(context_id, Rc::clone(state))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The message an http context enqueues on its own VM's queue to ask for a fetch now.
pub fn kick_message(profile_index: usize) -> [u8; 5] {
    let index = (profile_index as u32).to_le_bytes();
    [KICK, index[0], index[1], index[2], index[3]]
}
