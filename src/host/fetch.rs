//! Token requests (and discovery requests) sent from a root context, and what their answers do
//! to the shared cache entry.
//!
//! A fetch starts only after this VM won the profile's lease (`core::cache::claim_fetch`). With
//! `issuer` configured, the first fetch reads the issuer's metadata for the token endpoint and
//! keeps it in shared data for every VM, then sends the token request under the same lease.

use std::collections::HashMap;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

use crate::core::assertion::{self, AssertionError};
use crate::core::cache::{self, Claim, FetchRules};
use crate::core::config::{ClientAuth, JwtAssertion, Profile, TokenEndpoint};
use crate::core::discovery::{self, DiscoveryError};
use crate::core::token_request::{self, RequestExtras};
use crate::core::token_response::{self, FailureClass, TokenError};
use crate::core::url::HttpUrl;
use crate::host::vm::VmState;
use crate::host::{clock, shared};

/// Queue message: a token changed, re-check paused requests.
pub const WAKE: &[u8] = b"w";

enum Step {
    /// Reading the issuer's metadata document number `attempt` (see `discovery::metadata_urls`).
    Discovery {
        attempt: usize,
    },
    Token,
}

struct Pending {
    profile: usize,
    sent_at_ms: u64,
    step: Step,
}

/// A failure to record against a profile.
struct Failure {
    class: FailureClass,
    /// Metric suffix: `TokenError::label`, or `discovery`.
    label: String,
    message: String,
}

impl From<&TokenError> for Failure {
    fn from(error: &TokenError) -> Self {
        Failure { class: error.class(), label: error.label().to_string(), message: error.to_string() }
    }
}

/// One VM's fetching: its lease identity and the callouts it has in flight.
pub struct Fetcher {
    holder_id: u64,
    vm_id: String,
    pending: HashMap<u32, Pending>,
    /// Token endpoints found by discovery, by profile index (also kept in shared data).
    discovered: HashMap<usize, HttpUrl>,
}

impl Fetcher {
    pub fn new(holder_id: u64) -> Self {
        Fetcher { holder_id, vm_id: String::new(), pending: HashMap::new(), discovered: HashMap::new() }
    }

    /// The VM id used to resolve other VMs' wake queues; endpoints found under an older
    /// configuration are forgotten.
    pub fn configure(&mut self, vm_id: String) {
        self.vm_id = vm_id;
        self.discovered.clear();
    }

    /// Claims the fetch lease for a profile if a fetch is due, and starts it.
    pub fn maybe_fetch(&mut self, vm: &VmState, profile_index: usize, now_ms: u64) {
        let Some(profile) = vm.config.profiles.get(profile_index) else { return };
        let rules = FetchRules {
            holder: self.holder_id,
            lease_ms: profile.timeout_ms.saturating_mul(2) + 2_000,
            defer_refresh: vm.serves_requests.get(),
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
            Claim::NotNeeded => {}
            Claim::BudgetExhausted(entry) => {
                log::warn!(
                    "profile {:?}: max_fetches_per_hour ({}) reached; no token request for {} s",
                    profile.name,
                    profile.max_fetches_per_hour.unwrap_or(0),
                    entry.retry_at_ms.saturating_sub(now_ms) / 1000
                );
                vm.metrics.budget_refused(profile_index);
                shared::broadcast(&self.vm_id, WAKE);
            }
            Claim::Claimed(_) => match self.token_url(profile, profile_index) {
                Some(url) => self.send_token_request(vm, profile_index, &url, now_ms),
                None => self.send_discovery(vm, profile_index, 0, now_ms),
            },
        }
    }

    /// The token endpoint, if known: fixed, or discovered by this or another VM.
    fn token_url(&mut self, profile: &Profile, profile_index: usize) -> Option<HttpUrl> {
        match &profile.endpoint {
            TokenEndpoint::Fixed(url) => Some(url.clone()),
            TokenEndpoint::Discovered { .. } => {
                if let Some(url) = self.discovered.get(&profile_index) {
                    return Some(url.clone());
                }
                let stored = shared::read(&endpoint_key(profile)).0?;
                let url = HttpUrl::parse(std::str::from_utf8(&stored).ok()?).ok()?;
                self.discovered.insert(profile_index, url.clone());
                Some(url)
            }
        }
    }

    fn send_discovery(&mut self, vm: &VmState, profile_index: usize, attempt: usize, now_ms: u64) {
        let Some(profile) = vm.config.profiles.get(profile_index) else { return };
        let TokenEndpoint::Discovered { issuer_url, .. } = &profile.endpoint else { return };
        let Some(url) = discovery::metadata_urls(issuer_url).into_iter().nth(attempt) else { return };
        let headers = vec![
            (":method", "GET"),
            (":path", url.path_and_query.as_str()),
            (":authority", url.authority.as_str()),
            (":scheme", url.scheme),
            ("accept", "application/json"),
        ];
        let timeout = Duration::from_millis(profile.timeout_ms);
        match hostcalls::dispatch_http_call(&profile.cluster, headers, None, vec![], timeout) {
            Ok(token) => {
                self.pending.insert(
                    token,
                    Pending { profile: profile_index, sent_at_ms: now_ms, step: Step::Discovery { attempt } },
                );
            }
            Err(status) => self.dispatch_failed(vm, profile_index, status, now_ms),
        }
    }

    fn send_token_request(&mut self, vm: &VmState, profile_index: usize, url: &HttpUrl, now_ms: u64) {
        let Some(profile) = vm.config.profiles.get(profile_index) else { return };
        let (client_assertion, grant_assertion) = match sign_assertions(profile, now_ms) {
            Ok(signed) => signed,
            Err(error) => {
                log::error!("profile {:?}: {error}", profile.name);
                self.record_failure(vm, profile_index, (&TokenError::AssertionFailed(error)).into(), None, now_ms);
                return;
            }
        };
        let extras = RequestExtras {
            client_assertion: client_assertion.as_deref(),
            grant_assertion: grant_assertion.as_deref(),
        };
        let request = token_request::build(profile, url, &extras);
        let headers: Vec<(&str, &str)> = request.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let timeout = Duration::from_millis(profile.timeout_ms);
        match hostcalls::dispatch_http_call(&profile.cluster, headers, request.body.as_deref(), vec![], timeout) {
            Ok(token) => {
                log::debug!("profile {:?}: token request sent to cluster {:?}", profile.name, profile.cluster);
                self.pending.insert(token, Pending { profile: profile_index, sent_at_ms: now_ms, step: Step::Token });
            }
            Err(status) => self.dispatch_failed(vm, profile_index, status, now_ms),
        }
    }

    fn dispatch_failed(&self, vm: &VmState, profile_index: usize, status: proxy_wasm::types::Status, now_ms: u64) {
        let Some(profile) = vm.config.profiles.get(profile_index) else { return };
        log::error!(
            "profile {:?}: cannot send a request to cluster {:?} ({status:?}); is the cluster defined?",
            profile.name,
            profile.cluster
        );
        self.record_failure(vm, profile_index, (&TokenError::NoResponse).into(), None, now_ms);
    }

    /// Handles the answer to one of this VM's callouts.
    pub fn on_response(&mut self, vm: &VmState, token_id: u32, body_size: usize) {
        let Some(pending) = self.pending.remove(&token_id) else { return };
        let now_ms = clock::now_ms();
        let status = response_header(":status").and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        let limit = vm.config.profiles.get(pending.profile).map_or(0, |p| p.max_response_bytes);
        let body = if body_size > limit {
            None
        } else {
            Some(
                hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            )
        };
        match pending.step {
            Step::Token => self.token_answer(vm, &pending, status, body.as_deref(), now_ms),
            Step::Discovery { attempt } => {
                self.discovery_answer(vm, &pending, attempt, status, body.as_deref(), now_ms)
            }
        }
    }

    fn token_answer(&self, vm: &VmState, pending: &Pending, status: u32, body: Option<&[u8]>, now_ms: u64) {
        let Some(profile) = vm.config.profiles.get(pending.profile) else { return };
        let result = match body {
            None => Err(TokenError::TooLarge { limit: profile.max_response_bytes }),
            Some(body) => token_response::parse(
                status,
                body,
                &profile.token_field,
                &profile.expires_in_field,
                profile.max_response_bytes,
            ),
        };
        match result {
            Ok(grant) => {
                let holder = self.holder_id;
                let written = shared::update(&profile.cache_key, |entry| {
                    Some(cache::after_success(entry, holder, &grant, pending.sent_at_ms, &profile.lifetime))
                });
                vm.metrics.fetch_ok(pending.profile);
                match written {
                    Some(entry) => log::info!(
                        "profile {:?}: token fetched in {} ms, lifetime {} s, usable for {:.1} s",
                        profile.name,
                        now_ms.saturating_sub(pending.sent_at_ms),
                        grant.expires_in_s.unwrap_or(profile.lifetime.default_ttl_s),
                        entry.expires_at_ms.saturating_sub(now_ms) as f64 / 1000.0
                    ),
                    None => log::error!("profile {:?}: token fetched but the cache could not be written", profile.name),
                }
                shared::broadcast(&self.vm_id, WAKE);
            }
            Err(error) => {
                let retry_after_ms = response_header("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| s.saturating_mul(1000));
                self.record_failure(vm, pending.profile, (&error).into(), retry_after_ms, now_ms);
            }
        }
    }

    fn discovery_answer(
        &mut self,
        vm: &VmState,
        pending: &Pending,
        attempt: usize,
        status: u32,
        body: Option<&[u8]>,
        now_ms: u64,
    ) {
        let Some(profile) = vm.config.profiles.get(pending.profile) else { return };
        let TokenEndpoint::Discovered { issuer, .. } = &profile.endpoint else { return };
        let result = match body {
            None => Err(DiscoveryError::NotJson),
            Some(body) => discovery::parse_metadata(status, body, issuer, profile.auth_method.name()),
        };
        match result {
            Ok(url) => {
                log::info!(
                    "profile {:?}: discovered token endpoint {}://{}{}",
                    profile.name,
                    url.scheme,
                    url.authority,
                    url.path_and_query
                );
                let text = format!("{}://{}{}", url.scheme, url.authority, url.path_and_query);
                let _ = hostcalls::set_shared_data(&endpoint_key(profile), Some(text.as_bytes()), None);
                self.discovered.insert(pending.profile, url.clone());
                // Still under this VM's lease: go on with the token request.
                self.send_token_request(vm, pending.profile, &url, now_ms);
            }
            Err(DiscoveryError::NotFound) if attempt == 0 => self.send_discovery(vm, pending.profile, 1, now_ms),
            Err(error) => {
                let class = if error.is_configuration_fault() {
                    FailureClass::ConfigurationFault
                } else {
                    FailureClass::Transient
                };
                let failure =
                    Failure { class, label: "discovery".into(), message: format!("discovery of {issuer}: {error}") };
                self.record_failure(vm, pending.profile, failure, None, now_ms);
            }
        }
    }

    fn record_failure(
        &self,
        vm: &VmState,
        profile_index: usize,
        failure: Failure,
        retry_after_ms: Option<u64>,
        now_ms: u64,
    ) {
        let Some(profile) = vm.config.profiles.get(profile_index) else { return };
        let holder = self.holder_id;
        let jitter = clock::random_unit();
        let written = shared::update(&profile.cache_key, |entry| {
            Some(cache::after_failure(entry, holder, failure.class, now_ms, retry_after_ms, &profile.backoff, jitter))
        });
        let retry_in_ms = written.map(|e| e.retry_at_ms.saturating_sub(now_ms)).unwrap_or(0);
        vm.metrics.fetch_failed(profile_index, &failure.label);
        log::warn!(
            "profile {:?}: token request failed: {} [{}]; next attempt in {} ms",
            profile.name,
            failure.message,
            failure.label,
            retry_in_ms
        );
        shared::broadcast(&self.vm_id, WAKE);
    }
}

/// The shared-data key holding a profile's discovered token endpoint.
fn endpoint_key(profile: &Profile) -> String {
    format!("{}.endpoint", profile.cache_key)
}

fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpCallResponseHeaders, name).ok().flatten()
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
