//! The http context: picks the profile for a request and writes the token, or pauses the request
//! until one lands, or answers with the failure reply.
//!
//! The hit path is one shared-data read and one header write. A request that must wait is listed
//! with the VM's root context, which resumes it when a token lands (see `root`).

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use crate::core::cache::{self, EntryView, RequestDecision};
use crate::core::route::{RequestFacts, Selection};
use crate::host::fetch::WAKE;
use crate::host::root::kick_message;
use crate::host::vm::{RequestState, VmState, Waiter};
use crate::host::{abi, clock, shared};

pub struct TokenInjector {
    context_id: u32,
    vm: Rc<VmState>,
    profile: Option<usize>,
    request: Rc<RequestState>,
}

impl TokenInjector {
    pub fn new(context_id: u32, vm: Rc<VmState>) -> Self {
        TokenInjector { context_id, vm, profile: None, request: Rc::new(RequestState::default()) }
    }

    fn pause_until_token(&mut self, profile_index: usize, now_ms: u64) -> Action {
        let config = &self.vm.config;
        let Some(profile) = config.profiles.get(profile_index) else { return Action::Continue };
        let Ok(mut waiters) = self.vm.waiters.try_borrow_mut() else {
            send_failure_reply(&self.vm, profile_index);
            return Action::Pause;
        };
        if waiters.len() >= config.max_paused_requests {
            drop(waiters);
            log::warn!(
                "profile {:?}: {} requests already wait for a token on this worker (max_paused_requests); failing this one",
                profile.name,
                config.max_paused_requests
            );
            send_failure_reply(&self.vm, profile_index);
            return Action::Pause;
        }
        self.request.waiting.set(true);
        self.vm.metrics.waited(profile_index);
        waiters.push(Waiter {
            context_id: self.context_id,
            profile: profile_index,
            deadline_ms: now_ms.saturating_add(profile.max_wait_ms),
            shared: Rc::clone(&self.request),
        });
        drop(waiters);
        // Ask this VM's root context to fetch now rather than at its next tick.
        if let Some(queue) = self.vm.own_queue.get() {
            let _ = hostcalls::enqueue_shared_queue(queue, Some(&kick_message(profile_index)));
        }
        Action::Pause
    }

    fn forget_waiter(&self) {
        if self.request.waiting.get()
            && let Ok(mut waiters) = self.vm.waiters.try_borrow_mut()
        {
            waiters.retain(|w| w.context_id != self.context_id);
        }
    }
}

/// Answers the effective context's request with the configured failure status and a small JSON
/// body naming the profile; never the IdP's body, never a secret.
pub fn send_failure_reply(vm: &VmState, profile_index: usize) {
    let config = &vm.config;
    vm.metrics.failed_request(profile_index);
    let name = config.profiles.get(profile_index).map_or("", |p| p.name.as_str());
    // Profile names are restricted to [A-Za-z0-9._-] at configuration time: safe inside JSON.
    let body = format!(r#"{{"error":"token_unavailable","profile":"{name}"}}"#);
    let _ = abi::send_local_response(
        config.failure_status,
        "oauth2_cc_token_unavailable",
        &[("content-type", "application/json")],
        body.as_bytes(),
    );
}

impl Context for TokenInjector {}

impl HttpContext for TokenInjector {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let config = Rc::clone(&self.vm.config);
        let mut facts = HostRequestFacts::default();
        let profile_index = match config.routes.select_request(&mut facts) {
            Selection::None => return Action::Continue,
            Selection::Profile(index) => index,
            Selection::UnknownProfile(name) => {
                log::error!("route metadata names profile {name:?}, which is not configured; failing the request");
                let _ = abi::send_local_response(
                    config.failure_status,
                    "oauth2_cc_unknown_profile",
                    &[("content-type", "application/json")],
                    br#"{"error":"token_unavailable"}"#,
                );
                return Action::Pause;
            }
        };
        let Some(profile) = config.profiles.get(profile_index) else {
            return Action::Continue;
        };
        self.profile = Some(profile_index);
        if profile.inject.keep_existing && header(&profile.inject.header).is_some() {
            return Action::Continue;
        }
        // The hit path: this VM's copy of the token; no shared-data read, no clock read (a copy is
        // only kept while it has a margin left, see `cache::keep_vm_copy`).
        if let Ok(snapshots) = self.vm.snapshots.try_borrow()
            && let Some(Some(snapshot)) = snapshots.get(profile_index)
        {
            if abi::set_request_header(&profile.inject.header, &snapshot.header_value).is_err() {
                drop(snapshots);
                send_failure_reply(&self.vm, profile_index);
                return Action::Pause;
            }
            self.request.injected.set(Some(snapshot.generation));
            self.vm.metrics.injected(profile_index);
            return Action::Continue;
        }
        // No usable copy: ask shared data itself (another VM may have stored a token since).
        let now_ms = clock::now_ms();
        let bytes = self.vm.refresh_snapshot(profile_index, now_ms);
        let view = bytes.as_deref().and_then(EntryView::decode);
        match cache::decide_request(view.as_ref(), now_ms) {
            RequestDecision::Inject { token, generation } => {
                let value = format!("{}{}", profile.inject.prefix, token);
                if abi::set_request_header(&profile.inject.header, &value).is_err() {
                    send_failure_reply(&self.vm, profile_index);
                    return Action::Pause;
                }
                self.request.injected.set(Some(generation));
                self.vm.metrics.injected(profile_index);
                Action::Continue
            }
            RequestDecision::Fail => {
                log::debug!("profile {:?}: no token and the last fetch failed; failing fast", profile.name);
                send_failure_reply(&self.vm, profile_index);
                Action::Pause
            }
            RequestDecision::Wait => self.pause_until_token(profile_index, now_ms),
        }
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        // Continuing body data would also release the paused headers, without a token.
        if self.request.waiting.get() { Action::Pause } else { Action::Continue }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.request.waiting.get() { Action::Pause } else { Action::Continue }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (Some(profile_index), Some(generation)) = (self.profile, self.request.injected.get()) else {
            return Action::Continue;
        };
        let Some(profile) = self.vm.config.profiles.get(profile_index) else { return Action::Continue };
        if profile.purge_on_status.is_empty() {
            // Reading `:status` costs a host call and an allocation callback on every request.
            return Action::Continue;
        }
        let status = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u32>().ok());
        if status.is_some_and(|s| profile.purge_on_status.contains(&s))
            && shared::update(&profile.cache_key, |entry| cache::purge(entry, generation)).is_some()
        {
            self.vm.metrics.purged(profile_index);
            // Every VM drops its copy of the rejected token now, not at its next tick.
            let _ = self.vm.refresh_snapshot(profile_index, clock::now_ms());
            shared::broadcast(&self.vm.vm_id.borrow(), WAKE);
            log::info!(
                "profile {:?}: upstream answered {} to the token; dropped it, a new one will be fetched",
                profile.name,
                status.unwrap_or(0)
            );
        }
        Action::Continue
    }
}

/// The module does not export `proxy_on_log` or `proxy_on_done` (see the Makefile's
/// `UNUSED_EXPORTS`): Envoy skips callbacks a module does not export, and each one it calls is a
/// crossing into the VM on every request. The SDK drops the context in `proxy_on_delete`, which
/// Envoy calls for every stream, including one whose client went away while it waited.
impl Drop for TokenInjector {
    fn drop(&mut self) {
        self.forget_waiter();
    }
}

fn header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name).ok().flatten()
}

/// Request facts read from the host on first use only.
#[derive(Default)]
struct HostRequestFacts {
    authority: Option<Option<String>>,
    path: Option<Option<String>>,
    method: Option<Option<String>>,
}

impl RequestFacts for HostRequestFacts {
    fn authority(&mut self) -> Option<&str> {
        self.authority.get_or_insert_with(|| header(":authority")).as_deref()
    }
    fn path(&mut self) -> Option<&str> {
        self.path.get_or_insert_with(|| header(":path")).as_deref()
    }
    fn method(&mut self) -> Option<&str> {
        self.method.get_or_insert_with(|| header(":method")).as_deref()
    }
    fn header(&mut self, lower_case_name: &str) -> Option<String> {
        header(lower_case_name)
    }
    fn route_name(&mut self) -> Option<String> {
        string_property(vec!["xds", "route_name"])
    }
    fn metadata_profile(&mut self) -> Option<String> {
        string_property(vec!["xds", "route_metadata", "filter_metadata", "oauth2_cc", "profile"])
    }
    fn metadata_disabled(&mut self) -> bool {
        // A protobuf bool comes back as one byte.
        hostcalls::get_property(vec!["xds", "route_metadata", "filter_metadata", "oauth2_cc", "disabled"])
            .ok()
            .flatten()
            .is_some_and(|b| b.as_slice() == [1])
    }
}

fn string_property(path: Vec<&str>) -> Option<String> {
    hostcalls::get_property(path).ok().flatten().and_then(|b| String::from_utf8(b).ok())
}
