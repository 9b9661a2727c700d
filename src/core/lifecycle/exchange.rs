//! Token exchange in the driver: a request of a subject, the subjects this VM wants exchanged (and
//! holds the subject tokens of), the limiter's permit and the subject's lease, the answer, and the
//! upstream's rejection of an exchanged token. See docs/token-exchange.md.
//!
//! The subject token lives only here, in the memory of the VM that has a request of that subject,
//! until the request ends or the exchange lands; the shared store holds its SHA-256 and the
//! exchanged token.

use super::fetch::{ExchangeCall, PendingExchange, lease_ms};
use super::{Action, Driver, Environment, LogLevel, Metric, RequestId, RequestOutcome, log, store};
use crate::cache::{self, Claim, FetchRules, RequestDecision};
use crate::config::{Actor, Profile, TokenEndpoint, TokenExchange};
use crate::entry::Entry;
use crate::exchange::copies::SubjectCopy;
use crate::exchange::limiter::{Limiter, Refused};
use crate::exchange::set::{SubjectEntry, SubjectSet, limit_key, purges_key, set_key};
use crate::exchange::{Refusal, Subject, SubjectKey};
use crate::lifecycle::requests::{Waiter, fail_fast};

/// A subject this VM wants exchanged: its token, until when (its requests' deadlines), and its
/// JWS `exp` (read once, on the miss).
#[derive(Debug, Clone)]
pub(super) struct Wanted {
    /// The subject token (checked: visible ASCII, bounded).
    pub token: crate::secret::Secret,
    pub subject_exp_ms: Option<u64>,
    pub until_ms: u64,
}

/// The wants a driver keeps beyond its paused requests (refreshes on demand).
const EXTRA_WANTS: usize = 1_024;

impl Driver {
    /// A request of `subject` on token-exchange profile `profile` found no copy: decide from the
    /// subject's entry. Like [`Driver::on_request`], plus [`RequestOutcome::Refuse`].
    pub fn on_subject_request(
        &mut self,
        profile: usize,
        request: RequestId,
        subject: &Subject,
        now_ms: u64,
        env: &mut dyn Environment,
    ) -> (RequestOutcome, Vec<Action>) {
        let mut actions = Vec::new();
        let config = std::sync::Arc::clone(&self.config);
        let Some((p, te)) = exchange_profile(&config.profiles, profile) else { return (RequestOutcome::Fail, actions) };
        let Some(subject_token) = subject.token() else {
            // The request path refuses these before asking: fail closed all the same.
            actions.push(Action::Count { profile, metric: Refusal::SubjectMissing.metric() });
            return (RequestOutcome::Refuse(Refusal::SubjectMissing), actions);
        };
        let subject_exp_ms = crate::token_expiry::jws_expiry_ms(subject_token);
        if subject_exp_ms.is_some_and(|exp| crate::exchange::subject_usable_until_ms(exp) <= now_ms) {
            actions.push(Action::Count { profile, metric: Refusal::SubjectRejected.metric() });
            return (RequestOutcome::Refuse(Refusal::SubjectRejected), actions);
        }
        let key = subject.key();
        let set = SubjectSet::decode(env.get(&set_key(&p.cache_key, key.set_index(te.cache.sets))).0.as_deref());
        let found = set.find(&key);
        let entry = found.map(|e| &e.entry);
        let bytes = entry.map(Entry::encode);
        let view = bytes.as_deref().and_then(crate::entry::EntryView::decode);
        let until_ms = now_ms.saturating_add(p.max_wait_ms);
        let want = Wanted { token: crate::secret::Secret::new(subject_token), subject_exp_ms, until_ms };
        let outcome = match cache::decide_request(view.as_ref(), now_ms) {
            RequestDecision::Inject { token, generation } => {
                let value = format!("{}{}", p.inject.prefix, token);
                if let Some(entry) = entry {
                    self.keep_subject_copy(profile, subject_token.as_bytes(), key, entry, now_ms);
                    let leased = entry.lease_holder != 0 && now_ms < entry.lease_until_ms;
                    // Refresh on demand: this request's subject token starts it.
                    if now_ms >= entry.refresh_at_ms && !leased && self.wanted.len() < self.wants_limit() {
                        self.wanted.insert((profile, key), want);
                        actions.push(Action::Kick { profile });
                    }
                }
                RequestOutcome::Inject { value, generation }
            }
            RequestDecision::Fail if found.is_some_and(|e| e.rejected) => {
                actions.push(Action::Count { profile, metric: Refusal::SubjectRejected.metric() });
                RequestOutcome::Refuse(Refusal::SubjectRejected)
            }
            RequestDecision::Fail => fail_fast(
                profile,
                format!("profile {:?}: the last exchange of this subject failed; failing fast", p.name),
                &mut actions,
            ),
            RequestDecision::Wait => {
                let waiter = Waiter { request, profile, deadline_ms: want.until_ms, subject: Some(key) };
                let outcome = self.pause(waiter, &p.name, &mut actions);
                if outcome == RequestOutcome::Wait {
                    self.wanted.insert((profile, key), want);
                }
                outcome
            }
        };
        (outcome, actions)
    }

    /// The hit path of a token-exchange profile: this VM's copy of the token exchanged for the
    /// subject token `subject_token` (found by its bytes: no SHA-256; no store read, no clock:
    /// copies are pruned on ticks). A host that keeps its own copies (the dynamic module's
    /// workers) takes this one after an `Inject`.
    pub fn cached_subject(&self, profile: usize, subject_token: &[u8]) -> Option<&SubjectCopy> {
        self.subject_copies.get(profile, subject_token, None)
    }

    fn wants_limit(&self) -> usize {
        self.config.max_paused_requests.saturating_add(EXTRA_WANTS)
    }

    pub(super) fn keep_subject_copy(
        &mut self,
        profile: usize,
        token: &[u8],
        key: SubjectKey,
        entry: &Entry,
        now_ms: u64,
    ) {
        let config = std::sync::Arc::clone(&self.config);
        let Some((p, te)) = exchange_profile(&config.profiles, profile) else { return };
        if let Some(copy) = SubjectCopy::of(entry, &p.inject.prefix, key, now_ms) {
            self.subject_copies.insert(profile, token, copy, &te.cache);
        }
    }

    /// The subject token of `key` this VM holds (it wants it exchanged), if any.
    pub(super) fn wanted_token(&self, profile: usize, key: SubjectKey) -> Option<String> {
        self.wanted.get(&(profile, key)).map(|w| w.token.expose().to_string())
    }

    /// Tries every subject of `profile` this VM wants exchanged.
    pub(super) fn maybe_exchange_all(
        &mut self,
        profile: usize,
        now_ms: u64,
        env: &mut dyn Environment,
        actions: &mut Vec<Action>,
    ) {
        let keys: Vec<SubjectKey> = self.wanted.keys().filter(|(p, _)| *p == profile).map(|(_, k)| *k).collect();
        for key in keys {
            self.maybe_exchange(profile, key, now_ms, env, actions);
        }
    }

    /// Exchanges `key`'s subject token if its entry needs it and nobody fetches it: a permit from
    /// the limiter, the subject's lease, then the token request.
    fn maybe_exchange(
        &mut self,
        index: usize,
        key: SubjectKey,
        now_ms: u64,
        env: &mut dyn Environment,
        actions: &mut Vec<Action>,
    ) {
        let config = std::sync::Arc::clone(&self.config);
        let Some((profile, te)) = exchange_profile(&config.profiles, index) else { return };
        let Some(want) = self.wanted.get(&(index, key)).cloned() else { return };
        if want.subject_exp_ms.is_some_and(|exp| crate::exchange::subject_usable_until_ms(exp) <= now_ms) {
            // The subject token expired while its requests waited: never sent to the IdP.
            self.wanted.remove(&(index, key));
            return self.refuse_waiters(index, key, Refusal::SubjectRejected, actions);
        }
        if self.superseded.contains(&profile.cache_key) {
            return; // a newer configuration owns this key's fetches
        }
        let TokenEndpoint::Fixed(url) = &profile.endpoint else { return };
        let lease = lease_ms(profile.timeout_ms, 1);
        let rules =
            FetchRules { holder: self.holder, lease_ms: lease, defer_refresh: false, max_fetches_per_hour: None };
        let set_key = set_key(&profile.cache_key, key.set_index(te.cache.sets));
        let current = SubjectSet::decode(env.get(&set_key).0.as_deref()).find(&key).cloned();
        let entry = current.as_ref().map(|e| e.entry.clone()).unwrap_or_default();
        if !matches!(cache::claim_fetch(&entry, now_ms, &rules), Claim::Claimed(_)) {
            return;
        }
        let actor_token = match &te.actor {
            None => None,
            Some(Actor::Static { token, token_type }) => Some((token.expose().to_string(), token_type.clone())),
            Some(Actor::Profile { index: actor, token_type, .. }) => {
                let Some(token) = self.actor_token(*actor, now_ms, env, actions) else { return };
                Some((token, token_type.clone()))
            }
        };
        let until_ms = now_ms.saturating_add(lease);
        if let Err(refused) = self.take_permit(profile, te, until_ms, now_ms, env) {
            return self.on_limited(index, key, refused, entry.has_usable_token(now_ms), actions);
        }
        let mut claimed = None;
        let update = store::update_bytes(env, &set_key, |bytes| {
            let mut set = SubjectSet::decode(bytes);
            let mut subject_entry = set.find(&key).cloned().unwrap_or_else(|| SubjectEntry::new(key));
            let Claim::Claimed(next) = cache::claim_fetch(&subject_entry.entry, now_ms, &rules) else { return None };
            claimed = Some(next.lease_until_ms);
            subject_entry.entry = next;
            subject_entry.last_used_ms = now_ms;
            set.put(subject_entry, now_ms, te.cache.set_bytes).then(|| set.encode())
        });
        let lease_until_ms = match (update, claimed) {
            (Ok(Some(_)), Some(lease_until_ms)) => lease_until_ms,
            _ => {
                // Another VM claimed it meanwhile, or the store refused: the permit goes back.
                self.give_back_permit(profile, te, until_ms, now_ms, env);
                return;
            }
        };
        let call = ExchangeCall {
            subject_token: want.token.expose(),
            actor: actor_token.as_ref().map(|(t, ty)| (t.as_str(), ty.as_str())),
            pending: PendingExchange { subject: key, subject_exp_ms: want.subject_exp_ms, permit_until_ms: until_ms },
        };
        self.send_token_request(profile, index, url, lease_until_ms, now_ms, env, actions, Some(call));
    }

    /// The actor profile's current token; when it has none, its fetch is started and the exchange
    /// waits for it (a wake or the next tick tries again).
    fn actor_token(
        &mut self,
        actor: usize,
        now_ms: u64,
        env: &mut dyn Environment,
        actions: &mut Vec<Action>,
    ) -> Option<String> {
        let p = self.config.profiles.get(actor)?;
        let entry = super::read_entry(env, &p.cache_key);
        if entry.has_usable_token(now_ms) {
            return Some(entry.token);
        }
        self.maybe_fetch(actor, now_ms, env, actions);
        None
    }

    fn take_permit(
        &self,
        p: &Profile,
        te: &TokenExchange,
        until_ms: u64,
        now_ms: u64,
        env: &mut dyn Environment,
    ) -> Result<(), Refused> {
        let mut outcome = Ok(());
        let holder = self.holder;
        let written = store::update_bytes(env, &limit_key(&p.cache_key), |bytes| {
            let mut limiter = Limiter::decode(bytes, &te.limits, now_ms);
            outcome = limiter.acquire(&te.limits, holder, now_ms, until_ms);
            outcome.is_ok().then(|| limiter.encode())
        });
        match (outcome, written) {
            (Ok(()), Ok(Some(_))) => Ok(()),
            // A store that stays contended or refuses: no exchange this time, counted as in flight.
            (Ok(()), _) => Err(Refused::InFlight),
            (Err(refused), _) => Err(refused),
        }
    }

    pub(super) fn give_back_permit(
        &self,
        p: &Profile,
        te: &TokenExchange,
        until_ms: u64,
        now_ms: u64,
        env: &mut dyn Environment,
    ) {
        let holder = self.holder;
        let _ = store::update_bytes(env, &limit_key(&p.cache_key), |bytes| {
            let mut limiter = Limiter::decode(bytes, &te.limits, now_ms);
            limiter.release(holder, until_ms).then(|| limiter.encode())
        });
    }

    /// The limiter refused `key`'s exchange: a subject with a usable token keeps it (no refresh
    /// now); the paused requests of one without get 429 at once.
    fn on_limited(&mut self, index: usize, key: SubjectKey, refused: Refused, usable: bool, actions: &mut Vec<Action>) {
        self.wanted.remove(&(index, key));
        if usable {
            return;
        }
        let name = self.config.profiles.get(index).map(|p| p.name.clone()).unwrap_or_default();
        let what = match refused {
            Refused::Rate => "exchanges_per_second",
            Refused::InFlight => "max_in_flight",
        };
        log(actions, LogLevel::Warn, format!("profile {name:?}: token exchange refused by limits.{what}"));
        self.refuse_waiters(index, key, Refusal::ExchangeLimited, actions);
    }

    /// Answers every request of `key`'s subject paused on this VM with `refusal`'s reply.
    fn refuse_waiters(&mut self, index: usize, key: SubjectKey, refusal: Refusal, actions: &mut Vec<Action>) {
        let waiters = std::mem::take(&mut self.waiters);
        for waiter in waiters {
            if waiter.profile == index && waiter.subject == Some(key) {
                actions.push(Action::Count { profile: index, metric: refusal.metric() });
                actions.push(Action::Refuse { request: waiter.request, profile: index, refusal });
            } else {
                self.waiters.push(waiter);
            }
        }
    }

    /// On ticks and wakes: drop the copies of a profile whose purge counter moved (another VM
    /// dropped one of its tokens), and copies and wants that ran out.
    pub(super) fn refresh_subject_copies(&mut self, now_ms: u64, env: &dyn Environment) {
        let config = std::sync::Arc::clone(&self.config);
        if self.purge_marks.len() != config.profiles.len() {
            self.purge_marks = vec![None; config.profiles.len()];
        }
        for (index, p) in config.profiles.iter().enumerate() {
            if p.exchange.is_none() {
                continue;
            }
            let mark = env.get(&purges_key(&p.cache_key)).0;
            if let Some(seen) = self.purge_marks.get_mut(index)
                && *seen != mark
            {
                *seen = mark;
                self.subject_copies.clear_profile(index);
                self.copies_generation = self.copies_generation.wrapping_add(1);
            }
        }
        self.subject_copies.prune(now_ms);
        let waiting: Vec<(usize, SubjectKey)> =
            self.waiters.iter().filter_map(|w| w.subject.map(|key| (w.profile, key))).collect();
        self.wanted.retain(|id, want| now_ms < want.until_ms || waiting.contains(id));
    }

    /// What a paused request of `subject` gets now, from its set's bytes.
    pub(super) fn settle_subject_waiter(
        &mut self,
        waiter: Waiter,
        key: SubjectKey,
        set: &SubjectSet,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let config = std::sync::Arc::clone(&self.config);
        let Some(p) = config.profiles.get(waiter.profile) else { return };
        let found = set.find(&key);
        let bytes = found.map(|e| e.entry.encode());
        let view = bytes.as_deref().and_then(crate::entry::EntryView::decode);
        match cache::decide_request(view.as_ref(), now_ms) {
            RequestDecision::Inject { token, generation } => {
                actions.push(Action::Resume {
                    request: waiter.request,
                    profile: waiter.profile,
                    header: p.inject.header.clone(),
                    value: format!("{}{}", p.inject.prefix, token),
                    generation,
                });
                if let (Some(found), Some(token)) = (found, self.wanted_token(waiter.profile, key)) {
                    self.keep_subject_copy(waiter.profile, token.as_bytes(), key, &found.entry, now_ms);
                }
            }
            RequestDecision::Wait if now_ms < waiter.deadline_ms => self.waiters.push(waiter),
            RequestDecision::Fail if found.is_some_and(|e| e.rejected) => {
                actions.push(Action::Count { profile: waiter.profile, metric: Refusal::SubjectRejected.metric() });
                actions.push(Action::Refuse {
                    request: waiter.request,
                    profile: waiter.profile,
                    refusal: Refusal::SubjectRejected,
                });
            }
            decision => {
                if decision == RequestDecision::Wait {
                    log(
                        actions,
                        LogLevel::Warn,
                        format!(
                            "profile {:?}: no exchanged token within max_wait_ms ({} ms); failing the request",
                            p.name, p.max_wait_ms
                        ),
                    );
                }
                actions.push(Action::Count { profile: waiter.profile, metric: Metric::FailedRequest });
                actions.push(Action::Fail { request: waiter.request, profile: waiter.profile });
            }
        }
    }
}

/// The profile at `index` and its exchange settings, if it is a token-exchange profile.
pub(super) fn exchange_profile(profiles: &[Profile], index: usize) -> Option<(&Profile, &TokenExchange)> {
    let p = profiles.get(index)?;
    Some((p, p.exchange.as_ref()?))
}
