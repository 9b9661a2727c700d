//! The http context: carries out the core's request path (`oauth2_cc_core::request`) for one
//! request, reading and writing Envoy's headers, pausing and answering as it says.
//!
//! The hit path reads no shared data and no clock and allocates nothing but the context: the
//! profile selection (a request fact is read only when a rule looks at it), this VM's copy of the
//! token borrowed from the driver (`Driver::cached`), one header write, an in-VM counter. A request
//! that finds no copy asks the driver (`Driver::on_request`), which may pause it; the root
//! context's driver resumes or fails it later (see `vm`).
//!
//! A token-exchange profile reads the request's subject token (a header, or dynamic metadata
//! another filter wrote) and, in the jwt_authn-verified mode, jwt_authn's payload in the dynamic
//! metadata, as the request path asks; its copy is this VM's copy for that subject
//! (`Driver::cached_subject`). On a miss the subject goes to the driver
//! (`Driver::on_subject_request`), which keeps its token in this VM's memory until the root
//! context, kicked through this VM's own queue, sends the exchange.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use crate::adapter;
use crate::vm::{RequestState, VmState};
use oauth2_cc_core::exchange::Subject;
use oauth2_cc_core::request::RequestFacts;
use oauth2_cc_core::request::{Next, RequestPath, Step};

/// The context of a VM that has no accepted configuration: requests pass untouched.
pub struct PassThrough;

impl Context for PassThrough {}
impl HttpContext for PassThrough {}

pub struct TokenInjector {
    context_id: u32,
    vm: Rc<VmState>,
    /// This request's place in the path while it is not paused.
    path: RequestPath,
    /// Shared with the root context once the request pauses (the only allocation beyond the
    /// context itself, and only for a request that waits).
    paused: Option<Rc<RequestState>>,
    /// A token-exchange request's subject, kept from the copy lookup for the driver (a miss).
    subject: Option<Subject>,
}

impl TokenInjector {
    pub fn new(context_id: u32, vm: Rc<VmState>) -> Self {
        TokenInjector { context_id, vm, path: RequestPath::new(), paused: None, subject: None }
    }

    /// The request's place in the path, wherever it is kept.
    fn path(&self) -> RequestPath {
        self.paused.as_ref().map_or(self.path, |state| state.path.get())
    }

    /// Selection and the hit path under a shared borrow of the VM's state (no host call made here
    /// re-enters the VM): the copy is borrowed from the driver, never cloned. Returns the step to
    /// carry out once the borrow is released (`None`: the state was borrowed, which only a
    /// re-entry could cause).
    fn plan(&mut self) -> Option<Next<'static>> {
        let configured = self.vm.configured.try_borrow().ok()?;
        let Some(configured) = configured.as_ref() else { return Some(Next { step: Step::Continue, count: None }) };
        let config = configured.driver.config();
        let mut next = self.path.on_request_headers(config, &mut HostRequestFacts::default());
        match next.step {
            Step::LookUpCopy { profile } => next = self.path.on_copy(config, configured.driver.cached(profile)),
            Step::LookUpSubjectCopy { profile, subject } => {
                let copy = configured.driver.cached_subject(profile, subject.bytes());
                next = self.path.on_subject_copy(config, &subject, copy);
                if matches!(next.step, Step::AskDriver { .. }) {
                    self.subject = Some(subject);
                }
            }
            _ => {}
        }
        Some(self.vm.write_header(config, &mut self.path, next))
    }

    /// No copy of the token: the driver decides from the shared entry.
    // Out of line: the miss path must not grow the hit path's function (docs/memory.md, "Function shape").
    #[inline(never)]
    fn miss(&mut self, profile: usize) -> Action {
        let now_ms = adapter::now_ms();
        let request = u64::from(self.context_id);
        let state = Rc::new(RequestState { path: std::cell::Cell::new(self.path) });
        // Listed as paused first: the driver's actions may resume it at once.
        if let Ok(mut paused) = self.vm.paused.try_borrow_mut() {
            paused.insert(request, Rc::clone(&state));
        }
        let mut decided = None;
        let subject = self.subject.take();
        self.vm.drive(now_ms, |driver, env| {
            let (outcome, actions) = match &subject {
                Some(subject) => driver.on_subject_request(profile, request, subject, now_ms, env),
                None => driver.on_request(profile, request, now_ms, env),
            };
            decided = Some(outcome);
            actions
        });
        let config = self.vm.config();
        let next = match (&decided, &config) {
            (Some(outcome), Some(config)) => {
                let next = self.path.on_outcome(config, outcome);
                self.vm.write_header(config, &mut self.path, next)
            }
            // No driver answered: fail closed.
            _ => match &config {
                Some(config) => self.path.on_delivered(config, None),
                None => Next { step: Step::Pause, count: None },
            },
        };
        if self.path.waiting() {
            state.path.set(self.path);
            self.paused = Some(state);
        } else {
            self.forget_paused();
        }
        if self.vm.carry_out(next) { Action::Pause } else { Action::Continue }
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
            Some(Next { step: Step::AskDriver { profile }, .. }) => self.miss(profile),
            Some(next) => {
                if self.vm.carry_out(next) {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
            // Fail closed: never send the request on without its token.
            None => Action::Pause,
        }
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        // Continuing body data would also release the paused headers, without a token.
        if self.path().waiting() { Action::Pause } else { Action::Continue }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.path().waiting() { Action::Pause } else { Action::Continue }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let path = self.path();
        // `:status` is read (a host call and an allocation callback) only when the profile purges
        // on some status, and only a status in its list reaches the driver.
        let (report, status) = match self.vm.configured.try_borrow() {
            Ok(configured) => match configured.as_ref() {
                Some(c) if path.wants_status(c.driver.config()) => {
                    let status = adapter::header(MapType::HttpResponseHeaders, ":status");
                    (path.on_response_status(c.driver.config(), status.as_deref()), status)
                }
                _ => return Action::Continue,
            },
            Err(_) => return Action::Continue,
        };
        if let Step::ReportStatus { profile, generation } = report {
            self.report_status(&path, profile, generation, status.as_deref());
        }
        Action::Continue
    }
}

impl TokenInjector {
    /// A status the profile purges on: the driver drops that token (this request's subject's, on
    /// a token-exchange profile).
    // Out of line: a rare path, kept out of the function every response runs (docs/memory.md).
    #[inline(never)]
    fn report_status(&self, path: &RequestPath, profile: usize, generation: u64, status: Option<&[u8]>) {
        let now_ms = adapter::now_ms();
        match path.subject_key() {
            Some(subject) => self.vm.drive(now_ms, |driver, env| {
                driver.on_subject_status(profile, &subject, generation, status, now_ms, env)
            }),
            None => {
                self.vm.drive(now_ms, |driver, env| driver.on_response_status(profile, generation, status, now_ms, env))
            }
        }
    }
}

/// The module does not export `proxy_on_log` or `proxy_on_done` (see the Makefile's
/// `UNUSED_EXPORTS`): Envoy skips callbacks a module does not export, and each one it calls is a
/// crossing into the VM on every request. The SDK drops the context in `proxy_on_delete`, which
/// Envoy calls for every stream, including one whose client went away while it waited.
impl Drop for TokenInjector {
    fn drop(&mut self) {
        let Some(state) = self.paused.take() else { return };
        let mut path = state.path.get();
        if path.on_gone() {
            state.path.set(path);
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
    fn dynamic_metadata_string(&mut self, namespace: &str, key: &str) -> Option<Vec<u8>> {
        // A string comes back as its bytes; the core refuses anything that is not a token.
        adapter::property(&["metadata", "filter_metadata", namespace, key])
    }
    fn dynamic_metadata_has_key(&mut self, namespace: &str, key: &str) -> bool {
        // Any value: a Struct (jwt_authn's payload) comes back serialized, absent as NotFound.
        adapter::property(&["metadata", "filter_metadata", namespace, key]).is_some()
    }
}
