//! Fetching: claiming a profile's lease, the chain of requests a fetch sends (discovery
//! documents, then the token request), and what each answer does to the shared entry.

use super::{
    Action, Answer, AnswerBody, Callout, CalloutId, Driver, Environment, LogLevel, Metric, Update, log, store,
};
use crate::assertion::{self, AssertionError};
use crate::cache::{self, Claim, FetchRules};
use crate::config::{ClientAuth, JwtAssertion, Profile, TokenEndpoint};
use crate::discovery::{self, DiscoveryError};
use crate::retry_after::retry_after_ms;
use crate::token_request::{self, RequestExtras};
use crate::token_response::{FailureClass, TokenError};
use crate::url::HttpUrl;

/// The most requests one fetch sends: two discovery documents, then the token request.
const DISCOVERY_CHAIN: u64 = 3;
/// Slack on top of the callout timeouts a lease covers (dispatch and tick lateness).
const LEASE_SLACK_MS: u64 = 2_000;

#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub(crate) cache_key: String,
    /// The subject of a token exchange (its token stays with the driver's wants).
    pub(crate) exchange: Option<PendingExchange>,
    pub(crate) sent_at_ms: u64,
    /// The lease this fetch holds (with this VM's holder): a VM can hold a newer lease while an
    /// older fetch of its own answers late, and only the fetch that holds the lease releases it.
    pub(crate) lease_until_ms: u64,
    step: Step,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Reading the issuer's metadata document number `attempt` (see `discovery::metadata_urls`).
    Discovery {
        attempt: usize,
    },
    Token,
}

/// The exchange a token request makes: whose subject, its JWS `exp`, and the limiter permit it holds.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingExchange {
    pub subject: crate::exchange::SubjectKey,
    pub subject_exp_ms: Option<u64>,
    pub permit_until_ms: u64,
}

/// What a token request of a token-exchange profile sends besides the profile's parameters.
pub(super) struct ExchangeCall<'a> {
    pub subject_token: &'a str,
    /// The actor token and its type.
    pub actor: Option<(&'a str, &'a str)>,
    pub pending: PendingExchange,
}

/// A failure to record against a profile.
pub(super) struct Failure {
    pub class: FailureClass,
    /// Metric label: `TokenError::label`, `discovery`, `no_cluster`, `assertion_failed`.
    pub label: String,
    pub message: String,
}

impl From<&TokenError> for Failure {
    fn from(error: &TokenError) -> Self {
        Failure { class: error.class(), label: error.label().to_string(), message: error.to_string() }
    }
}

/// How long a lease lasts for a fetch of `chain` requests of `timeout_ms` each.
pub(crate) fn lease_ms(timeout_ms: u64, chain: u64) -> u64 {
    timeout_ms.saturating_mul(chain).saturating_add(LEASE_SLACK_MS)
}

impl Driver {
    /// The largest answer body the host should read for callout `id` (0 when unknown).
    pub fn answer_limit(&self, id: CalloutId) -> usize {
        self.pending
            .get(&id)
            .and_then(|p| self.profile_index(&p.cache_key))
            .and_then(|i| self.config.profiles.get(i))
            .map_or(0, |p| p.max_response_bytes)
    }

    fn profile_index(&self, cache_key: &str) -> Option<usize> {
        self.config.profiles.iter().position(|p| p.cache_key == cache_key)
    }

    /// Claims the profile's lease if a fetch is due, and starts the fetch.
    pub(super) fn maybe_fetch(
        &mut self,
        index: usize,
        now_ms: u64,
        env: &mut dyn Environment,
        actions: &mut Vec<Action>,
    ) {
        let config = std::sync::Arc::clone(&self.config);
        let Some(profile) = config.profiles.get(index) else { return };
        if profile.exchange.is_some() {
            // No profile-wide fetch: each subject's comes from a request (`maybe_exchange_all`).
            self.note_claim_at(index, u64::MAX);
            return self.maybe_exchange_all(index, now_ms, env, actions);
        }
        if self.superseded.contains(&profile.cache_key) {
            return; // a newer configuration owns this key's fetches
        }
        let url = self.token_url(profile, env);
        let chain = if url.is_some() { 1 } else { DISCOVERY_CHAIN };
        let rules = FetchRules {
            holder: self.holder,
            lease_ms: lease_ms(profile.timeout_ms, chain),
            defer_refresh: self.serves_requests,
            max_fetches_per_hour: profile.max_fetches_per_hour,
        };
        let mut claim = Claim::NotNeeded;
        let mut claim_at = 0;
        let update = store::update_entry(env, &profile.cache_key, |entry| {
            claim = cache::claim_fetch(entry, now_ms, &rules);
            claim_at = cache::next_claim_ms(&entry.view(), rules.defer_refresh);
            match &claim {
                Claim::Claimed(next) | Claim::BudgetExhausted(next) => Some(next.clone()),
                Claim::NotNeeded => None,
            }
        });
        if let Update::Written(entry) = &update {
            claim_at = cache::next_claim_ms(&entry.view(), rules.defer_refresh);
        }
        self.note_claim_at(index, claim_at);
        match (claim, update) {
            (Claim::NotNeeded, _) | (_, Update::Unchanged) => {}
            (_, Update::Contended) => log(
                actions,
                LogLevel::Warn,
                format!("profile {:?}: token cache stayed contended; no token request this time", profile.name),
            ),
            (_, Update::Failed) => log(
                actions,
                LogLevel::Error,
                format!("profile {:?}: writing the token cache failed; no token request this time", profile.name),
            ),
            (Claim::BudgetExhausted(entry), Update::Written(_)) => {
                log(
                    actions,
                    LogLevel::Warn,
                    format!(
                        "profile {:?}: max_fetches_per_hour ({}) reached; no token request for {} s",
                        profile.name,
                        profile.max_fetches_per_hour.unwrap_or(0),
                        entry.retry_at_ms.saturating_sub(now_ms) / 1000
                    ),
                );
                actions.push(Action::Count { profile: index, metric: Metric::BudgetRefused });
                actions.push(Action::BroadcastWake);
            }
            (Claim::Claimed(_), Update::Written(entry)) => match url {
                Some(url) => {
                    self.send_token_request(profile, index, &url, entry.lease_until_ms, now_ms, env, actions, None)
                }
                None => self.send_discovery(profile, index, 0, entry.lease_until_ms, now_ms, env, actions),
            },
        }
    }

    /// The token endpoint, if known: fixed, or discovered by this or another VM.
    fn token_url(&mut self, profile: &Profile, env: &dyn Environment) -> Option<HttpUrl> {
        match &profile.endpoint {
            TokenEndpoint::Fixed(url) => Some(url.clone()),
            TokenEndpoint::Discovered { .. } => {
                if let Some(url) = self.discovered.get(&profile.cache_key) {
                    return Some(url.clone());
                }
                let stored = env.get(&endpoint_key(profile)).0?;
                let url = HttpUrl::parse(std::str::from_utf8(&stored).ok()?).ok()?;
                self.discovered.insert(profile.cache_key.clone(), url.clone());
                Some(url)
            }
        }
    }

    fn next_id(&mut self) -> CalloutId {
        let id = self.next_callout;
        self.next_callout = self.next_callout.wrapping_add(1).max(1);
        id
    }

    #[allow(clippy::too_many_arguments)]
    fn send_discovery(
        &mut self,
        profile: &Profile,
        index: usize,
        attempt: usize,
        lease_until_ms: u64,
        now_ms: u64,
        env: &mut dyn Environment,
        actions: &mut Vec<Action>,
    ) {
        let TokenEndpoint::Discovered { issuer_url, .. } = &profile.endpoint else { return };
        let Some(url) = discovery::metadata_urls(issuer_url).into_iter().nth(attempt) else {
            let failure = Failure {
                class: FailureClass::ConfigurationFault,
                label: "discovery".into(),
                message: "no metadata document left to try".into(),
            };
            return self.record_failure(index, failure, None, lease_until_ms, now_ms, env, actions, None);
        };
        let headers = vec![
            (":method".to_string(), "GET".to_string()),
            (":path".to_string(), url.path_and_query.clone()),
            (":authority".to_string(), url.authority.clone()),
            (":scheme".to_string(), url.scheme.to_string()),
            ("accept".to_string(), "application/json".to_string()),
        ];
        let id = self.next_id();
        self.pending.insert(
            id,
            Pending {
                cache_key: profile.cache_key.clone(),
                exchange: None,
                sent_at_ms: now_ms,
                lease_until_ms,
                step: Step::Discovery { attempt },
            },
        );
        actions.push(Action::Send(Callout {
            id,
            cluster: profile.cluster.clone(),
            headers,
            body: None,
            timeout_ms: profile.timeout_ms,
        }));
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_token_request(
        &mut self,
        profile: &Profile,
        index: usize,
        url: &HttpUrl,
        lease_until_ms: u64,
        now_ms: u64,
        env: &mut dyn Environment,
        actions: &mut Vec<Action>,
        exchange: Option<ExchangeCall<'_>>,
    ) {
        let pending_exchange = exchange.as_ref().map(|call| call.pending);
        let (client_assertion, grant_assertion) = match sign_assertions(profile, now_ms, env) {
            Ok(signed) => signed,
            Err(error) => {
                return self.record_failure(
                    index,
                    (&TokenError::AssertionFailed(error)).into(),
                    None,
                    lease_until_ms,
                    now_ms,
                    env,
                    actions,
                    pending_exchange.as_ref(),
                );
            }
        };
        let exchange_params = match (&exchange, &profile.exchange) {
            (Some(call), Some(te)) => Some(token_request::ExchangeParams {
                subject_token: call.subject_token,
                subject_token_type: &te.subject_token_type,
                actor: call.actor,
                requested_token_type: te.requested_token_type.as_deref(),
            }),
            _ => None,
        };
        let extras = RequestExtras {
            client_assertion: client_assertion.as_deref(),
            grant_assertion: grant_assertion.as_deref(),
            exchange: exchange_params,
        };
        let request = token_request::build(profile, url, &extras);
        let id = self.next_id();
        self.pending.insert(
            id,
            Pending {
                cache_key: profile.cache_key.clone(),
                exchange: pending_exchange,
                sent_at_ms: now_ms,
                lease_until_ms,
                step: Step::Token,
            },
        );
        log(
            actions,
            LogLevel::Debug,
            format!("profile {:?}: token request sent to cluster {:?}", profile.name, profile.cluster),
        );
        actions.push(Action::Send(Callout {
            id,
            cluster: profile.cluster.clone(),
            headers: request.headers,
            body: request.body,
            timeout_ms: profile.timeout_ms,
        }));
    }

    /// This VM goes away with fetches in flight (a filter configuration destroyed while its token
    /// request is out): their answers will never reach it, so it gives their leases back now and
    /// wakes every VM. Whoever needs the token next (the configuration that replaces this one)
    /// fetches at once instead of waiting for the lease to run out.
    pub fn on_shut_down(&mut self, env: &mut dyn Environment) -> Vec<Action> {
        let mut actions = Vec::new();
        let holder = self.holder;
        for pending in std::mem::take(&mut self.pending).into_values() {
            let update = store::update_entry(env, &pending.cache_key, |entry| {
                (lease_of(entry, holder, pending.lease_until_ms) == holder).then(|| cache::Entry {
                    lease_holder: 0,
                    lease_until_ms: 0,
                    ..entry.clone()
                })
            });
            if let Update::Written(_) = update {
                let name = self.profile_index(&pending.cache_key).and_then(|i| self.config.profiles.get(i));
                log(
                    &mut actions,
                    LogLevel::Debug,
                    format!(
                        "profile {:?}: configuration going away with its token request in flight; lease released",
                        name.map_or("", |p| p.name.as_str())
                    ),
                );
                if !actions.contains(&Action::BroadcastWake) {
                    actions.push(Action::BroadcastWake);
                }
            }
        }
        actions
    }

    /// The host could not dispatch callout `id` (Envoy knows no such cluster).
    pub fn on_send_failed(&mut self, id: CalloutId, now_ms: u64, env: &mut dyn Environment) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(pending) = self.pending.remove(&id) else { return actions };
        let Some(index) = self.profile_index(&pending.cache_key) else { return actions };
        let cluster = self.config.profiles.get(index).map(|p| p.cluster.clone()).unwrap_or_default();
        let failure = Failure {
            class: FailureClass::ConfigurationFault,
            label: "no_cluster".into(),
            message: format!("Envoy refused to send to cluster {cluster:?}: is it defined in Envoy's configuration?"),
        };
        self.record_failure(
            index,
            failure,
            None,
            pending.lease_until_ms,
            now_ms,
            env,
            &mut actions,
            pending.exchange.as_ref(),
        );
        actions
    }

    /// The answer to callout `id`. Late, duplicate and orphaned answers are ignored.
    pub fn on_answer(
        &mut self,
        id: CalloutId,
        answer: Answer<'_>,
        now_ms: u64,
        env: &mut dyn Environment,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(pending) = self.pending.remove(&id) else { return actions };
        let Some(index) = self.profile_index(&pending.cache_key) else { return actions };
        let config = std::sync::Arc::clone(&self.config);
        let Some(profile) = config.profiles.get(index) else { return actions };
        let status = answer.status.and_then(crate::request::parse_status).unwrap_or(0);
        match pending.step {
            Step::Token => self.token_answer(profile, index, &pending, status, answer, now_ms, env, &mut actions),
            Step::Discovery { attempt } => self.discovery_answer(
                profile,
                index,
                (attempt, pending.lease_until_ms),
                status,
                answer.body,
                now_ms,
                env,
                &mut actions,
            ),
        }
        actions
    }

    // Out of line: one caller must not absorb it into a large wasm function (docs/memory.md, "Function shape").
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn token_answer(
        &mut self,
        profile: &Profile,
        index: usize,
        pending: &Pending,
        status: u32,
        answer: Answer<'_>,
        now_ms: u64,
        env: &mut dyn Environment,
        actions: &mut Vec<Action>,
    ) {
        if let Some(exchange) = &pending.exchange {
            return self.exchange_answer(profile, index, pending, exchange, status, answer, now_ms, env, actions);
        }
        let result = super::parse_answer(profile, status, answer.body);
        let grant = match result {
            Ok(grant) => grant,
            Err(error) => {
                let retry_after = answer.retry_after.and_then(|value| retry_after_ms(value, now_ms));
                return self.record_failure(
                    index,
                    (&error).into(),
                    retry_after,
                    pending.lease_until_ms,
                    now_ms,
                    env,
                    actions,
                    None,
                );
            }
        };
        let holder = self.holder;
        let update = store::update_entry(env, &profile.cache_key, |entry| {
            let holder = lease_of(entry, holder, pending.lease_until_ms);
            Some(cache::after_success(entry, holder, &grant, pending.sent_at_ms, &profile.lifetime))
        });
        actions.push(Action::Count { profile: index, metric: Metric::FetchOk });
        match update {
            Update::Written(entry)
                if entry.token_sent_at_ms == pending.sent_at_ms && entry.token == grant.access_token =>
            {
                log(
                    actions,
                    LogLevel::Info,
                    format!(
                        "profile {:?}: token fetched in {} ms, lifetime {} s, usable for {:.1} s",
                        profile.name,
                        now_ms.saturating_sub(pending.sent_at_ms),
                        grant.expires_in_s.unwrap_or(profile.lifetime.default_ttl_s),
                        entry.expires_at_ms.saturating_sub(now_ms) as f64 / 1000.0
                    ),
                )
            }
            Update::Written(_) | Update::Unchanged => log(
                actions,
                LogLevel::Info,
                format!("profile {:?}: token fetched, but another VM stored a newer one; kept that", profile.name),
            ),
            Update::Contended | Update::Failed => log(
                actions,
                LogLevel::Error,
                format!("profile {:?}: token fetched but the cache could not be written", profile.name),
            ),
        }
        let _ = self.refresh_snapshot(index, now_ms, env);
        actions.push(Action::BroadcastWake);
    }

    // Out of line: one caller must not absorb it into a large wasm function (docs/memory.md, "Function shape").
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn discovery_answer(
        &mut self,
        profile: &Profile,
        index: usize,
        (attempt, lease_until_ms): (usize, u64),
        status: u32,
        body: AnswerBody<'_>,
        now_ms: u64,
        env: &mut dyn Environment,
        actions: &mut Vec<Action>,
    ) {
        let TokenEndpoint::Discovered { issuer, .. } = &profile.endpoint else { return };
        let result = match body {
            AnswerBody::TooLarge => Err(DiscoveryError::TooLarge { limit: profile.max_response_bytes }),
            AnswerBody::Bytes(body) => discovery::parse_metadata(status, body, issuer, profile.auth_method.name()),
        };
        match result {
            Ok(url) => {
                let text = format!("{}://{}{}", url.scheme, url.authority, url.path_and_query);
                log(actions, LogLevel::Info, format!("profile {:?}: discovered token endpoint {text}", profile.name));
                // The same value from any VM: a plain write is enough.
                let _ = env.set(&endpoint_key(profile), text.as_bytes(), None);
                self.discovered.insert(profile.cache_key.clone(), url.clone());
                // Still under this VM's lease, which covers the whole chain.
                self.send_token_request(profile, index, &url, lease_until_ms, now_ms, env, actions, None);
            }
            Err(DiscoveryError::NotFound) if attempt == 0 => {
                self.send_discovery(profile, index, 1, lease_until_ms, now_ms, env, actions)
            }
            Err(error) => {
                let class = if error.is_configuration_fault() {
                    FailureClass::ConfigurationFault
                } else {
                    FailureClass::Transient
                };
                let failure =
                    Failure { class, label: "discovery".into(), message: format!("discovery of {issuer}: {error}") };
                self.record_failure(index, failure, None, lease_until_ms, now_ms, env, actions, None);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record_failure(
        &mut self,
        index: usize,
        failure: Failure,
        retry_after_ms: Option<u64>,
        lease_until_ms: u64,
        now_ms: u64,
        env: &mut dyn Environment,
        actions: &mut Vec<Action>,
        exchange: Option<&PendingExchange>,
    ) {
        if let Some(exchange) = exchange {
            let exchange = *exchange;
            return self.record_subject_failure(
                index,
                &exchange,
                failure,
                retry_after_ms,
                lease_until_ms,
                now_ms,
                env,
                actions,
            );
        }
        let config = std::sync::Arc::clone(&self.config);
        let Some(profile) = config.profiles.get(index) else { return };
        let holder = self.holder;
        let jitter = (env.random_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let update = store::update_entry(env, &profile.cache_key, |entry| {
            let holder = lease_of(entry, holder, lease_until_ms);
            Some(cache::after_failure(entry, holder, failure.class, now_ms, retry_after_ms, &profile.backoff, jitter))
        });
        let next = match update {
            Update::Written(entry) => {
                self.note_claim_at(index, cache::next_claim_ms(&entry.view(), self.serves_requests));
                format!("next attempt in {} ms", entry.retry_at_ms.saturating_sub(now_ms))
            }
            _ => "the cache could not be written; next attempt when the lease runs out".to_string(),
        };
        actions.push(Action::Count { profile: index, metric: Metric::FetchFailed(failure.label.clone()) });
        log(
            actions,
            LogLevel::Warn,
            format!(
                "profile {:?}: token request failed: {} [{}]; {next}",
                profile.name, failure.message, failure.label
            ),
        );
        actions.push(Action::BroadcastWake);
    }
}

/// The holder to pass to `cache::after_success`/`after_failure` for a fetch that took the lease
/// until `lease_until_ms`: this VM's holder if the entry still holds that lease, else 0 (which
/// releases nothing). Without it, a late answer to an older fetch of this VM released the lease of
/// its newer fetch, and another VM started a second one (simulation seed 1730813365953125333).
pub(super) fn lease_of(entry: &crate::cache::Entry, holder: u64, lease_until_ms: u64) -> u64 {
    if entry.lease_holder == holder && entry.lease_until_ms == lease_until_ms { holder } else { 0 }
}

/// The store key holding a profile's discovered token endpoint.
fn endpoint_key(profile: &Profile) -> String {
    format!("{}.endpoint", profile.cache_key)
}

/// Fresh RFC 7523 assertions for one token request: the client assertion and the grant assertion,
/// each with its own `jti`.
fn sign_assertions(
    profile: &Profile,
    now_ms: u64,
    env: &mut dyn Environment,
) -> Result<(Option<String>, Option<String>), AssertionError> {
    let mut sign = |jwt: &JwtAssertion| {
        let mut random = [0u8; 16];
        random[..8].copy_from_slice(&env.random_u64().to_le_bytes());
        random[8..].copy_from_slice(&env.random_u64().to_le_bytes());
        let jti = assertion::jti_from_random(&random);
        assertion::sign_assertion(&jwt.signer, &jwt.template, now_ms / 1000, &jti)
    };
    let client = match &profile.client_auth {
        ClientAuth::Jwt { assertion, .. } => Some(sign(assertion)?),
        _ => None,
    };
    let grant = profile.grant_assertion.as_ref().map(&mut sign).transpose()?;
    Ok((client, grant))
}
