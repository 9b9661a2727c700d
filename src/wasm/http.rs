//! The http context: picks the profile for a request and writes the token, or pauses the request
//! until one lands, or answers with the failure reply.
//!
//! The hit path reads no shared data and no clock: the profile selection (compiled; no header
//! read for a `/` prefix), this VM's copy of the token (`Driver::cached`), one header write, an
//! in-VM counter. A request that finds no copy asks the driver (`Driver::on_request`), which may
//! pause it; the root context's driver resumes or fails it later (see `vm`).

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use crate::adapter;
use crate::vm::{RequestState, VmState};
use oauth2_cc_core::lifecycle::{self, Metric, RequestOutcome};
use oauth2_cc_core::route::{RequestFacts, Selection};

/// The context of a VM that has no accepted configuration: requests pass untouched.
pub struct PassThrough;

impl Context for PassThrough {}
impl HttpContext for PassThrough {}

pub struct TokenInjector {
    context_id: u32,
    vm: Rc<VmState>,
    profile: Option<usize>,
    request: Rc<RequestState>,
}

/// What the request path decided before it had to ask the driver.
enum Plan {
    Continue,
    Reply(lifecycle::FailureReply),
    Miss(usize),
    /// The VM's state was borrowed: only possible on re-entry, which no host call here causes.
    Busy,
}

impl TokenInjector {
    pub fn new(context_id: u32, vm: Rc<VmState>) -> Self {
        TokenInjector { context_id, vm, profile: None, request: Rc::new(RequestState::default()) }
    }

    /// Selection and the hit path, under a shared borrow of the VM's state (no host call made
    /// here can re-enter the VM).
    fn plan(&mut self) -> Plan {
        let Ok(configured) = self.vm.configured.try_borrow() else { return Plan::Busy };
        let Some(configured) = configured.as_ref() else { return Plan::Continue };
        let config = configured.driver.config();
        let profile = match config.routes.select_request(&mut HostRequestFacts::default()) {
            Selection::None => return Plan::Continue,
            Selection::Profile(index) => index,
            Selection::UnknownProfile(name) => {
                adapter::log(
                    adapter::Level::Error,
                    &format!("route metadata names profile {name:?}, which is not configured; failing the request"),
                );
                return Plan::Reply(lifecycle::unknown_profile_reply(config));
            }
        };
        let Some(p) = config.profiles.get(profile) else { return Plan::Continue };
        self.profile = Some(profile);
        // Any value counts as present, whatever its bytes.
        if p.inject.keep_existing && adapter::header(MapType::HttpRequestHeaders, &p.inject.header).is_some() {
            return Plan::Continue;
        }
        let Some(snapshot) = configured.driver.cached(profile) else { return Plan::Miss(profile) };
        if !self.request.inject(&p.inject.header, &snapshot.header_value, snapshot.generation) {
            return Plan::Reply(lifecycle::failure_reply(config, profile));
        }
        configured.metrics.count(profile, &Metric::Injected);
        Plan::Continue
    }

    /// No copy of the token: the driver decides from the shared entry.
    fn miss(&mut self, profile: usize) -> Action {
        let now_ms = adapter::now_ms();
        let request = u64::from(self.context_id);
        let mut decided = None;
        // Listed as paused first: the driver's actions may resume it at once.
        if let Ok(mut paused) = self.vm.paused.try_borrow_mut() {
            paused.insert(request, Rc::clone(&self.request));
        }
        self.vm.drive(|driver, env| {
            let (outcome, actions) = driver.on_request(profile, request, now_ms, env);
            decided = Some(outcome);
            actions
        });
        match decided {
            Some(RequestOutcome::Wait) => {
                self.request.waiting.set(true);
                Action::Pause
            }
            Some(RequestOutcome::Inject { value, generation }) => {
                self.forget_paused();
                let header = self.vm.config().and_then(|c| c.profiles.get(profile).map(|p| p.inject.header.clone()));
                match header {
                    Some(header) if self.request.inject(&header, &value, generation) => Action::Continue,
                    _ => self.fail(profile),
                }
            }
            Some(RequestOutcome::Fail) | None => {
                self.forget_paused();
                self.fail(profile)
            }
        }
    }

    fn fail(&self, profile: usize) -> Action {
        self.vm.send_failure_reply(profile);
        Action::Pause
    }

    fn forget_paused(&self) {
        if let Ok(mut paused) = self.vm.paused.try_borrow_mut() {
            paused.remove(&u64::from(self.context_id));
        }
    }
}

impl Context for TokenInjector {}

impl HttpContext for TokenInjector {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.plan() {
            Plan::Continue => Action::Continue,
            Plan::Reply(reply) => {
                if let Some(profile) = self.profile {
                    self.vm.with_metrics(|m| m.count(profile, &Metric::FailedRequest));
                }
                let _ = adapter::send_local_response(
                    reply.status,
                    reply.details,
                    &[("content-type", "application/json")],
                    reply.body.as_bytes(),
                );
                Action::Pause
            }
            // Fail closed: never send the request on without its token.
            Plan::Busy => self.fail(self.profile.unwrap_or(0)),
            Plan::Miss(profile) => self.miss(profile),
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
        let (Some(profile), Some(generation)) = (self.profile, self.request.injected.get()) else {
            return Action::Continue;
        };
        // Reading `:status` costs a host call and an allocation callback on every request.
        if self.vm.config().is_none_or(|c| c.profiles.get(profile).is_none_or(|p| p.purge_on_status.is_empty())) {
            return Action::Continue;
        }
        let status = adapter::header(MapType::HttpResponseHeaders, ":status");
        let now_ms = adapter::now_ms();
        self.vm.drive(|driver, env| driver.on_response_status(profile, generation, status.as_deref(), now_ms, env));
        Action::Continue
    }
}

/// The module does not export `proxy_on_log` or `proxy_on_done` (see the Makefile's
/// `UNUSED_EXPORTS`): Envoy skips callbacks a module does not export, and each one it calls is a
/// crossing into the VM on every request. The SDK drops the context in `proxy_on_delete`, which
/// Envoy calls for every stream, including one whose client went away while it waited.
impl Drop for TokenInjector {
    fn drop(&mut self) {
        if self.request.waiting.get() {
            self.forget_paused();
            let request = u64::from(self.context_id);
            if let Ok(mut configured) = self.vm.configured.try_borrow_mut()
                && let Some(c) = configured.as_mut()
            {
                c.driver.on_request_gone(request);
            }
        }
    }
}

/// Request facts read from the host on first use only, as bytes; a value that is not UTF-8 can
/// never equal a pattern, which is what "absent" means to the authority and path matchers.
#[derive(Default)]
struct HostRequestFacts {
    authority: Option<Option<String>>,
    path: Option<Option<String>>,
    method: Option<Option<String>>,
}

fn text(name: &str) -> Option<String> {
    adapter::header(MapType::HttpRequestHeaders, name).and_then(|b| String::from_utf8(b).ok())
}

impl RequestFacts for HostRequestFacts {
    fn authority(&mut self) -> Option<&str> {
        self.authority.get_or_insert_with(|| text(":authority")).as_deref()
    }
    fn path(&mut self) -> Option<&str> {
        self.path.get_or_insert_with(|| text(":path")).as_deref()
    }
    fn method(&mut self) -> Option<&str> {
        self.method.get_or_insert_with(|| text(":method")).as_deref()
    }
    fn header(&mut self, lower_case_name: &str) -> Option<Vec<u8>> {
        adapter::header(MapType::HttpRequestHeaders, lower_case_name)
    }
    fn route_name(&mut self) -> Option<String> {
        adapter::property(&["xds", "route_name"]).and_then(|b| String::from_utf8(b).ok())
    }
    fn metadata_profile(&mut self) -> Option<String> {
        // A name that is not UTF-8 names no configured profile: it fails closed as unknown.
        adapter::property(&["xds", "route_metadata", "filter_metadata", "oauth2_cc", "profile"])
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }
    fn metadata_disabled(&mut self) -> bool {
        // A protobuf bool comes back as one byte.
        adapter::property(&["xds", "route_metadata", "filter_metadata", "oauth2_cc", "disabled"])
            .is_some_and(|b| b.as_slice() == [1])
    }
}
