//! Requests that need a token: the VM's copy of each token for the hit path, the decision for a
//! request that finds no copy, the requests paused until a token lands, and the upstream's
//! rejection of a token (purge).

use super::{Action, Driver, Environment, LogLevel, Metric, RequestId, Update, log, store};
use crate::cache::{self, EntryView, RequestDecision};
use crate::config::Config;

/// A VM's copy of a profile's token as the shared store held it at the last tick or wake.
///
/// The store stays the source of truth: the copy is refreshed on every tick and wake, and every
/// write that changes the token (a fetch, a purge) wakes all VMs. A copy is valid until
/// `valid_until_ms` (`cache::vm_copy_valid_until`); the driver's [`Driver::next_wake`] asks its
/// host for a tick by then, which drops it, so the request path uses it without reading the clock.
#[derive(Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub(crate) generation: u64,
    /// Prefix and token, ready for the header.
    pub header_value: String,
    /// The copy may be served until then (milliseconds since the epoch), and not after.
    pub(crate) valid_until_ms: u64,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Snapshot(generation {}, valid until {}, [redacted])", self.generation, self.valid_until_ms)
    }
}

/// What to do with a request that found no copy of its token.
#[derive(Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Write this header value and continue.
    Inject { value: String, generation: u64 },
    /// Pause the request; the driver resumes or fails it later.
    Wait,
    /// Answer with the failure reply now.
    Fail,
    /// Answer with the reply of this refusal now (a token-exchange profile).
    Refuse(crate::exchange::Refusal),
}

impl std::fmt::Debug for RequestOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestOutcome::Inject { generation, .. } => write!(f, "Inject(generation {generation})"),
            RequestOutcome::Wait => write!(f, "Wait"),
            RequestOutcome::Fail => write!(f, "Fail"),
            RequestOutcome::Refuse(refusal) => write!(f, "Refuse({refusal:?})"),
        }
    }
}

/// A request paused until its profile has a token.
#[derive(Debug, Clone)]
pub(super) struct Waiter {
    pub(crate) request: RequestId,
    pub(crate) profile: usize,
    pub(crate) deadline_ms: u64,
    /// The subject of a token-exchange profile's request.
    pub(crate) subject: Option<crate::exchange::SubjectKey>,
}

/// The local reply for a request that gets no token: never the IdP's body, never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureReply {
    pub status: u32,
    /// Envoy's response-code details.
    pub details: &'static str,
    pub body: String,
}

/// The failure reply for `profile`: the configured status and a small JSON body naming it.
pub(crate) fn failure_reply(config: &Config, profile: usize) -> FailureReply {
    let name = config.profiles.get(profile).map_or("", |p| p.name.as_str());
    // Profile names are restricted to [A-Za-z0-9._-] at configuration time: safe inside JSON.
    FailureReply {
        status: config.failure_status,
        details: "oauth2_cc_token_unavailable",
        body: format!(r#"{{"error":"token_unavailable","profile":"{name}"}}"#),
    }
}

/// The reply for a route whose metadata names a profile that is not configured.
pub(crate) fn unknown_profile_reply(config: &Config) -> FailureReply {
    FailureReply {
        status: config.failure_status,
        details: "oauth2_cc_unknown_profile",
        body: r#"{"error":"token_unavailable"}"#.to_string(),
    }
}

/// The upstream's `status` (bytes of `:status`) if it is one that means `profile`'s token was
/// rejected (`purge_on_status`).
pub(super) fn rejection(profile: &crate::config::Profile, status: Option<&[u8]>) -> Option<u32> {
    status.and_then(crate::request::parse_status).filter(|s| profile.purge_on_status.contains(s))
}

/// A request failed at once because the last fetch of its token failed (`why` says which one).
pub(super) fn fail_fast(profile: usize, why: String, actions: &mut Vec<Action>) -> RequestOutcome {
    log(actions, LogLevel::Debug, why);
    actions.push(Action::Count { profile, metric: Metric::FailedRequest });
    RequestOutcome::Fail
}

impl Driver {
    /// Pauses `waiter` until its token arrives or its deadline passes, for a client-credentials
    /// and an exchange profile alike; a request that would wait while `max_paused_requests`
    /// already wait on this driver is failed now instead.
    pub(super) fn pause(&mut self, waiter: Waiter, name: &str, actions: &mut Vec<Action>) -> RequestOutcome {
        let profile = waiter.profile;
        if self.waiters.len() >= self.config.max_paused_requests {
            log(
                actions,
                LogLevel::Warn,
                format!(
                    "profile {name:?}: {} requests already wait for a token on this worker (max_paused_requests); failing this one",
                    self.config.max_paused_requests
                ),
            );
            actions.push(Action::Count { profile, metric: Metric::FailedRequest });
            return RequestOutcome::Fail;
        }
        debug_assert!(
            self.waiters.iter().all(|w| w.request != waiter.request),
            "a request paused twice would be resumed twice"
        );
        self.waiters.push(waiter);
        debug_assert!(self.waiters.len() <= self.config.max_paused_requests);
        actions.push(Action::Count { profile, metric: Metric::Waited });
        actions.push(Action::Kick { profile });
        RequestOutcome::Wait
    }

    /// The hit path: this VM's copy of the profile's token, if it has one (no store read, no clock).
    pub fn cached(&self, profile: usize) -> Option<&Snapshot> {
        self.snapshots.get(profile)?.as_ref()
    }

    /// Moves whenever one of this driver's token copies ([`Driver::cached`]) changes, and only
    /// then: a host that keeps its own copies (per worker) needs to re-read them only when this
    /// moved, not after every event (a tick that changed nothing leaves it where it was).
    pub fn copies_generation(&self) -> u64 {
        self.copies_generation
    }

    /// A request needs a token and found no copy: decide from the shared entry itself (another VM
    /// may have stored one since the last tick).
    pub fn on_request(
        &mut self,
        profile: usize,
        request: RequestId,
        now_ms: u64,
        env: &mut dyn Environment,
    ) -> (RequestOutcome, Vec<Action>) {
        let mut actions = Vec::new();
        let config = std::sync::Arc::clone(&self.config);
        let Some(p) = config.profiles.get(profile) else { return (RequestOutcome::Fail, actions) };
        if p.exchange.is_some() {
            // A host that reads no subject: fail closed, never a token of another caller.
            actions.push(Action::Count { profile, metric: Metric::FailedRequest });
            return (RequestOutcome::Fail, actions);
        }
        let bytes = self.refresh_snapshot(profile, now_ms, env);
        let view = bytes.as_deref().and_then(EntryView::decode);
        let outcome = match cache::decide_request(view.as_ref(), now_ms) {
            // Counted by the request path once the header is written (`crate::request`).
            RequestDecision::Inject { token, generation } => {
                RequestOutcome::Inject { value: format!("{}{}", p.inject.prefix, token), generation }
            }
            RequestDecision::Fail => fail_fast(
                profile,
                format!("profile {:?}: no token and the last fetch failed; failing fast", p.name),
                &mut actions,
            ),
            RequestDecision::Wait => {
                let deadline_ms = now_ms.saturating_add(p.max_wait_ms);
                self.pause(Waiter { request, profile, deadline_ms, subject: None }, &p.name, &mut actions)
            }
        };
        (outcome, actions)
    }

    /// A paused request went away (client gone, stream reset): forget it.
    pub fn on_request_gone(&mut self, request: RequestId) {
        let before = self.waiters.len();
        self.waiters.retain(|w| w.request != request);
        debug_assert!(before - self.waiters.len() <= 1, "request ids are unique among waiters");
    }

    /// Requests paused on this VM.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// The upstream answered a request that carried token `generation` of `profile` with
    /// `status` (bytes of `:status`): drop that token if the status is one that means "rejected".
    pub fn on_response_status(
        &mut self,
        profile: usize,
        generation: u64,
        status: Option<&[u8]>,
        now_ms: u64,
        env: &mut dyn Environment,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let config = std::sync::Arc::clone(&self.config);
        let Some(p) = config.profiles.get(profile) else { return actions };
        let Some(status) = rejection(p, status) else { return actions };
        let purged = store::update_entry(env, &p.cache_key, |entry| cache::purge(entry, generation));
        // This VM drops its copy of the rejected token now, even when another VM purged it first
        // and this VM's wake is still to come.
        let _ = self.refresh_snapshot(profile, now_ms, env);
        if let Update::Written(_) = purged {
            let name = p.name.clone();
            actions.push(Action::Count { profile, metric: Metric::Purged });
            // Every VM drops its copy of the rejected token now, not at its next tick.
            actions.push(Action::BroadcastWake);
            log(
                &mut actions,
                LogLevel::Info,
                format!(
                    "profile {name:?}: upstream answered {status} to the token; dropped it, a new one will be fetched"
                ),
            );
        }
        actions
    }

    /// Resumes or fails the paused requests, as their profile's entry now allows.
    pub(super) fn settle_waiters(&mut self, now_ms: u64, env: &mut dyn Environment, actions: &mut Vec<Action>) {
        if self.waiters.is_empty() {
            return;
        }
        let config = std::sync::Arc::clone(&self.config);
        let mut entries: Vec<Option<Option<Vec<u8>>>> = vec![None; config.profiles.len()];
        let mut sets: std::collections::HashMap<(usize, usize), crate::exchange::set::SubjectSet> =
            std::collections::HashMap::new();
        let waiters = std::mem::take(&mut self.waiters);
        let before = waiters.len();
        for waiter in waiters {
            let Some(p) = config.profiles.get(waiter.profile) else { continue };
            if let (Some(key), Some(te)) = (waiter.subject, p.exchange.as_ref()) {
                let index = key.set_index(te.cache.sets);
                let set = sets.entry((waiter.profile, index)).or_insert_with(|| {
                    let bytes = env.get(&crate::exchange::set::set_key(&p.cache_key, index)).0;
                    crate::exchange::set::SubjectSet::decode(bytes.as_deref())
                });
                let set = set.clone();
                self.settle_subject_waiter(waiter, key, &set, now_ms, actions);
                continue;
            }
            let Some(slot) = entries.get_mut(waiter.profile) else { continue };
            let bytes = slot.get_or_insert_with(|| env.get(&p.cache_key).0);
            let view = bytes.as_deref().and_then(EntryView::decode);
            match cache::decide_request(view.as_ref(), now_ms) {
                // Counted by the request path once the header is written (`crate::request`).
                RequestDecision::Inject { token, generation } => {
                    actions.push(Action::Resume {
                        request: waiter.request,
                        profile: waiter.profile,
                        header: p.inject.header.clone(),
                        value: format!("{}{}", p.inject.prefix, token),
                        generation,
                    });
                }
                RequestDecision::Wait if now_ms < waiter.deadline_ms => self.waiters.push(waiter),
                decision => {
                    if decision == RequestDecision::Wait {
                        log(
                            actions,
                            LogLevel::Warn,
                            format!(
                                "profile {:?}: no token within max_wait_ms ({} ms); failing the request",
                                p.name, p.max_wait_ms
                            ),
                        );
                    }
                    actions.push(Action::Count { profile: waiter.profile, metric: Metric::FailedRequest });
                    actions.push(Action::Fail { request: waiter.request, profile: waiter.profile });
                }
            }
        }
        // Settling only ever removes waiters; each one removed got exactly one Resume or Fail.
        debug_assert!(self.waiters.len() <= before);
    }

    /// After a reconfiguration: wants whose profile kept its cache key follow it; the others go.
    pub(super) fn rekey_wants(&mut self, old: &Config) {
        let wanted = std::mem::take(&mut self.wanted);
        for ((profile, key), want) in wanted {
            let cache_key = old.profiles.get(profile).map(|p| p.cache_key.as_str());
            if let Some(index) = self.config.profiles.iter().position(|p| Some(p.cache_key.as_str()) == cache_key) {
                self.wanted.insert((index, key), want);
            }
        }
    }

    /// After a reconfiguration: waiters whose profile kept its cache key follow it to its new
    /// index; the others get the failure reply of the old profile.
    pub(super) fn rekey_waiters(&mut self, old: &Config, actions: &mut Vec<Action>) {
        let waiters = std::mem::take(&mut self.waiters);
        for mut waiter in waiters {
            let key = old.profiles.get(waiter.profile).map(|p| p.cache_key.as_str());
            match self.config.profiles.iter().position(|p| Some(p.cache_key.as_str()) == key) {
                Some(index) => {
                    waiter.profile = index;
                    self.waiters.push(waiter);
                }
                None => {
                    actions.push(Action::Count { profile: waiter.profile, metric: Metric::FailedRequest });
                    actions.push(Action::Fail { request: waiter.request, profile: waiter.profile });
                }
            }
        }
    }

    /// Records when a fetch of `profile` could next start (`cache::next_claim_ms`).
    pub(super) fn note_claim_at(&mut self, profile: usize, at_ms: u64) {
        if self.claim_at_ms.len() != self.config.profiles.len() {
            self.claim_at_ms.resize(self.config.profiles.len(), 0);
        }
        if let Some(slot) = self.claim_at_ms.get_mut(profile) {
            *slot = at_ms;
        }
    }

    pub(super) fn refresh_snapshots(&mut self, now_ms: u64, env: &mut dyn Environment) {
        for index in 0..self.config.profiles.len() {
            let _ = self.refresh_snapshot(index, now_ms, env);
        }
        self.refresh_subject_copies(now_ms, env);
    }

    /// Re-reads one profile's entry into this VM's copy (and when a fetch could start); returns
    /// the entry's bytes.
    pub(super) fn refresh_snapshot(&mut self, profile: usize, now_ms: u64, env: &dyn Environment) -> Option<Vec<u8>> {
        let p = self.config.profiles.get(profile)?;
        if p.exchange.is_some() {
            return None; // its tokens are per subject (`refresh_subject_copies`)
        }
        let bytes = env.get(&p.cache_key).0;
        let view = bytes.as_deref().and_then(EntryView::decode);
        let snapshot = view.filter(|v| cache::keep_vm_copy(v, now_ms)).map(|v| Snapshot {
            generation: v.generation,
            header_value: format!("{}{}", p.inject.prefix, v.token),
            valid_until_ms: cache::vm_copy_valid_until(&v).unwrap_or(0),
        });
        let claim_at = view.map_or(0, |v| cache::next_claim_ms(&v, self.serves_requests));
        if self.snapshots.len() != self.config.profiles.len() {
            self.snapshots.resize(self.config.profiles.len(), None);
        }
        self.note_claim_at(profile, claim_at);
        if let Some(slot) = self.snapshots.get_mut(profile)
            && *slot != snapshot
        {
            *slot = snapshot;
            self.copies_generation = self.copies_generation.wrapping_add(1);
        }
        bytes
    }
}
