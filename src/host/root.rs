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
use proxy_wasm::types::{BufferType, ContextType, MapType};

use crate::core::assertion::{self, AssertionError};
use crate::core::cache::{self, Claim, Entry, EntryView, FetchRules, RequestDecision};
use crate::core::config::{self, ClientAuth, Config, JwtAssertion, Profile};
use crate::core::token_request::{self, RequestExtras};
use crate::core::token_response::{self, TokenError};
use crate::host::http::{TokenInjector, send_failure_reply};
use crate::host::vm::{VmState, Waiter};
use crate::host::{abi, clock, shared};

/// How often each VM looks at its profiles and its paused requests.
const TICK: Duration = Duration::from_millis(100);
/// The first tick after configuration, which prefetches tokens.
const FIRST_TICK: Duration = Duration::from_millis(1);
/// How often the remaining-lifetime gauges are set.
const GAUGE_PERIOD_MS: u64 = 1_000;
/// Largest token response body read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Queue message: a token changed, re-check paused requests.
const WAKE: &[u8] = b"w";
/// Queue message prefix: an http context asks for a fetch of the profile whose index follows.
const KICK: u8 = b'k';

struct PendingFetch {
    profile: usize,
    sent_at_ms: u64,
}

pub struct FilterRoot {
    context_id: u32,
    /// This VM's identity in fetch leases; random so VMs never collide.
    holder_id: u64,
    vm_id: String,
    queue_name: String,
    state: Option<Rc<VmState>>,
    pending: HashMap<u32, PendingFetch>,
    next_heartbeat_ms: u64,
    next_gauge_ms: u64,
    first_tick_pending: bool,
}

impl FilterRoot {
    pub fn new(context_id: u32) -> Self {
        let holder_id = clock::random_u64().max(1);
        FilterRoot {
            context_id,
            holder_id,
            vm_id: String::new(),
            queue_name: format!("oauth2_cc.wake.{holder_id:016x}.{context_id}"),
            state: None,
            pending: HashMap::new(),
            next_heartbeat_ms: 0,
            next_gauge_ms: 0,
            first_tick_pending: false,
        }
    }

    fn config(&self) -> Option<Rc<Config>> {
        self.state.as_ref().map(|s| Rc::clone(&s.config))
    }

    /// Claims the fetch lease for `profile` if a fetch is due, and sends the token request.
    fn maybe_fetch(&mut self, profile_index: usize, now_ms: u64) {
        let Some(config) = self.config() else { return };
        let Some(profile) = config.profiles.get(profile_index) else { return };
        let rules = FetchRules {
            holder: self.holder_id,
            lease_ms: profile.timeout_ms + 2_000,
            defer_refresh: self.state.as_ref().is_some_and(|s| s.serves_requests.get()),
            max_fetches_per_hour: profile.max_fetches_per_hour,
        };
        let mut outcome = Claim::NotNeeded;
        shared::update(&profile.cache_key, |entry| {
            outcome = cache::claim_fetch(entry, now_ms, &rules);
            match &outcome {
                Claim::Claimed(next) | Claim::BudgetExhausted(next) => Some(next.clone()),
                Claim::NotNeeded => None,
            }
        });
        match outcome {
            Claim::NotNeeded => return,
            Claim::BudgetExhausted(entry) => {
                log::warn!(
                    "profile {:?}: max_fetches_per_hour ({}) reached; no token request for {} s",
                    profile.name,
                    profile.max_fetches_per_hour.unwrap_or(0),
                    entry.retry_at_ms.saturating_sub(now_ms) / 1000
                );
                if let Some(state) = &self.state {
                    state.metrics.budget_refused(profile_index);
                }
                shared::broadcast(&self.vm_id, WAKE);
                return;
            }
            Claim::Claimed(_) => {}
        }
        let (client_assertion, grant_assertion) = match sign_assertions(profile, now_ms) {
            Ok(signed) => signed,
            Err(error) => {
                log::error!("profile {:?}: {error}", profile.name);
                self.record_failure(profile_index, &TokenError::AssertionFailed, None, now_ms);
                return;
            }
        };
        let extras = RequestExtras {
            client_assertion: client_assertion.as_deref(),
            grant_assertion: grant_assertion.as_deref(),
        };
        let request = token_request::build(profile, &extras);
        let headers: Vec<(&str, &str)> = request.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        match hostcalls::dispatch_http_call(
            &profile.cluster,
            headers,
            request.body.as_deref(),
            vec![],
            Duration::from_millis(profile.timeout_ms),
        ) {
            Ok(token) => {
                log::debug!("profile {:?}: token request sent to cluster {:?}", profile.name, profile.cluster);
                self.pending.insert(token, PendingFetch { profile: profile_index, sent_at_ms: now_ms });
            }
            Err(status) => {
                log::error!(
                    "profile {:?}: cannot send the token request to cluster {:?} ({status:?}); is the cluster defined?",
                    profile.name,
                    profile.cluster
                );
                self.record_failure(profile_index, &TokenError::NoResponse, None, now_ms);
            }
        }
    }

    fn record_failure(&self, profile_index: usize, error: &TokenError, retry_after_ms: Option<u64>, now_ms: u64) {
        let Some(config) = self.config() else { return };
        let Some(profile) = config.profiles.get(profile_index) else { return };
        let holder = self.holder_id;
        let class = error.class();
        let jitter = clock::random_unit();
        let written = shared::update(&profile.cache_key, |entry| {
            Some(cache::after_failure(entry, holder, class, now_ms, retry_after_ms, &profile.backoff, jitter))
        });
        let retry_in_ms = written.map(|e| e.retry_at_ms.saturating_sub(now_ms)).unwrap_or(0);
        if let Some(state) = &self.state {
            state.metrics.fetch_failed(profile_index, error.label());
        }
        log::warn!(
            "profile {:?}: token request failed: {error} [{}]; next attempt in {} ms",
            profile.name,
            error.label(),
            retry_in_ms
        );
        shared::broadcast(&self.vm_id, WAKE);
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
        let Some(fetch) = self.pending.remove(&token_id) else { return };
        let Some(config) = self.config() else { return };
        let Some(profile) = config.profiles.get(fetch.profile) else { return };
        let now_ms = clock::now_ms();
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        let result = if body_size > MAX_RESPONSE_BYTES {
            Err(TokenError::TooLarge { limit: MAX_RESPONSE_BYTES })
        } else {
            let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
            token_response::parse(status, &body, &profile.token_field, &profile.expires_in_field, MAX_RESPONSE_BYTES)
        };
        match result {
            Ok(grant) => {
                let holder = self.holder_id;
                let written = shared::update(&profile.cache_key, |entry| {
                    Some(cache::after_success(entry, holder, &grant, fetch.sent_at_ms, &profile.lifetime))
                });
                if let Some(state) = &self.state {
                    state.metrics.fetch_ok(fetch.profile);
                }
                match written {
                    Some(entry) => log::info!(
                        "profile {:?}: token fetched in {} ms, lifetime {} s, usable for {} s",
                        profile.name,
                        now_ms.saturating_sub(fetch.sent_at_ms),
                        grant.expires_in_s.unwrap_or(profile.lifetime.default_ttl_s),
                        entry.expires_at_ms.saturating_sub(now_ms) / 1000
                    ),
                    None => log::error!("profile {:?}: token fetched but the cache could not be written", profile.name),
                }
                shared::broadcast(&self.vm_id, WAKE);
            }
            Err(error) => {
                let retry_after_ms = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, "retry-after")
                    .ok()
                    .flatten()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| s.saturating_mul(1000));
                self.record_failure(fetch.profile, &error, retry_after_ms, now_ms);
            }
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
        self.vm_id = hostcalls::get_property(vec!["plugin_vm_id"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
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
        if now_ms >= self.next_heartbeat_ms {
            shared::register_wake_queue(&self.queue_name, now_ms);
            self.next_heartbeat_ms = now_ms + crate::core::wake_registry::HEARTBEAT_MS;
        }
        let count = self.config().map_or(0, |c| c.profiles.len());
        for index in 0..count {
            self.maybe_fetch(index, now_ms);
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
        kicks.extend(self.profiles_with_waiters());
        kicks.sort_unstable();
        kicks.dedup();
        for index in kicks {
            self.maybe_fetch(index, now_ms);
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

/// Fresh RFC 7523 assertions for one token request: the client assertion and the grant assertion,
/// each with its own `jti`. Signing happens here, in a root context, never on a request.
fn sign_assertions(profile: &Profile, now_ms: u64) -> Result<(Option<String>, Option<String>), AssertionError> {
    let sign = |jwt: &JwtAssertion| {
        let jti = assertion::jti_from_random(&clock::random_128());
        assertion::sign_assertion(&jwt.signer, &jwt.template, now_ms / 1000, &jti)
    };
    let client = match &profile.client_auth {
        ClientAuth::Jwt { assertion, .. } => Some(sign(assertion)?),
        _ => None,
    };
    let grant = profile.grant_assertion.as_ref().map(sign).transpose()?;
    Ok((client, grant))
}

/// The message an http context enqueues on its own VM's queue to ask for a fetch now.
pub fn kick_message(profile_index: usize) -> [u8; 5] {
    let index = (profile_index as u32).to_le_bytes();
    [KICK, index[0], index[1], index[2], index[3]]
}
