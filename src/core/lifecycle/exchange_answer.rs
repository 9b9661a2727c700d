//! Token exchange in the driver, continued: the answer to an exchange (the subject's entry gets
//! the token, its expiry capped by the subject token's own, or the failure), and an upstream's
//! rejection of an exchanged token.

use super::exchange::exchange_profile;
use super::fetch::{Failure, Pending, PendingExchange};
use super::{Action, Answer, Driver, Environment, LogLevel, Metric, Update, log, store};
use crate::cache;
use crate::config::{Profile, TokenExchange};
use crate::entry::Entry;
use crate::exchange::SubjectKey;
use crate::exchange::set::{SubjectEntry, SubjectSet, purges_key, set_key};
use crate::token_response::TokenGrant;

impl Driver {
    /// The answer to an exchange: the subject's entry gets the token (its expiry capped by the
    /// subject token's own) or the failure; the permit goes back either way.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn exchange_answer(
        &mut self,
        profile: &Profile,
        index: usize,
        pending: &Pending,
        exchange: &PendingExchange,
        status: u32,
        answer: Answer<'_>,
        now_ms: u64,
        env: &mut dyn Environment,
        actions: &mut Vec<Action>,
    ) {
        let result = super::parse_answer(profile, status, answer.body);
        let grant = match result {
            Ok(grant) => grant,
            Err(error) => {
                let retry_after =
                    answer.retry_after.and_then(|value| crate::retry_after::retry_after_ms(value, now_ms));
                let failure = Failure::from(&error);
                return self.record_subject_failure(
                    index,
                    exchange,
                    failure,
                    retry_after,
                    pending.lease_until_ms,
                    now_ms,
                    env,
                    actions,
                );
            }
        };
        let Some(te) = profile.exchange.as_ref() else { return };
        self.give_back_permit(profile, te, exchange.permit_until_ms, now_ms, env);
        let stored = self.store_exchanged(profile, te, exchange, pending, &grant, now_ms, env);
        actions.push(Action::Count { profile: index, metric: Metric::FetchOk });
        match stored {
            Update::Written(_) => log(
                actions,
                LogLevel::Debug,
                format!(
                    "profile {:?}: token exchanged in {} ms",
                    profile.name,
                    now_ms.saturating_sub(pending.sent_at_ms)
                ),
            ),
            _ => log(
                actions,
                LogLevel::Error,
                format!("profile {:?}: token exchanged but the cache could not be written", profile.name),
            ),
        }
        self.wanted.remove(&(index, exchange.subject));
        actions.push(Action::BroadcastWake);
    }

    #[allow(clippy::too_many_arguments)]
    fn store_exchanged(
        &mut self,
        profile: &Profile,
        te: &TokenExchange,
        exchange: &PendingExchange,
        pending: &Pending,
        grant: &TokenGrant,
        now_ms: u64,
        env: &mut dyn Environment,
    ) -> Update {
        let key = exchange.subject;
        let holder = self.holder;
        let mut stored = None;
        let written = store::update_bytes(env, &set_key(&profile.cache_key, key.set_index(te.cache.sets)), |bytes| {
            let mut set = SubjectSet::decode(bytes);
            let mut subject_entry = set.find(&key).cloned().unwrap_or_else(|| SubjectEntry::new(key));
            let lease_holder = super::fetch::lease_of(&subject_entry.entry, holder, pending.lease_until_ms);
            let mut next =
                cache::after_success(&subject_entry.entry, lease_holder, grant, pending.sent_at_ms, &profile.lifetime);
            cap_by_subject(&mut next, exchange.subject_exp_ms, pending.sent_at_ms);
            subject_entry.entry = next.clone();
            subject_entry.rejected = false;
            subject_entry.last_used_ms = now_ms;
            stored = Some(next);
            set.put(subject_entry, now_ms, te.cache.set_bytes).then(|| set.encode())
        });
        match (written, stored) {
            (Ok(Some(_)), Some(entry)) => {
                let index = self.config.profiles.iter().position(|p| p.cache_key == profile.cache_key);
                if let Some(index) = index
                    && let Some(token) = self.wanted_token(index, key)
                {
                    self.keep_subject_copy(index, token.as_bytes(), key, &entry, now_ms);
                }
                Update::Written(entry)
            }
            (Ok(_), _) => Update::Unchanged,
            (Err(failure), _) => failure,
        }
    }

    /// A failed exchange: recorded against the subject's entry (its backoff); an IdP that refuses
    /// the subject token marks the subject rejected (RFC 8693 §2.2.2 says `invalid_request`, some
    /// IdPs `invalid_grant`); the permit goes back.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_subject_failure(
        &mut self,
        index: usize,
        exchange: &PendingExchange,
        failure: Failure,
        retry_after_ms: Option<u64>,
        lease_until_ms: u64,
        now_ms: u64,
        env: &mut dyn Environment,
        actions: &mut Vec<Action>,
    ) {
        let config = std::sync::Arc::clone(&self.config);
        let Some((profile, te)) = exchange_profile(&config.profiles, index) else { return };
        self.give_back_permit(profile, te, exchange.permit_until_ms, now_ms, env);
        let holder = self.holder;
        let jitter = (env.random_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let key = exchange.subject;
        let rejected = matches!(&*failure.label, "invalid_request" | "invalid_grant");
        let _ = store::update_bytes(env, &set_key(&profile.cache_key, key.set_index(te.cache.sets)), |bytes| {
            let mut set = SubjectSet::decode(bytes);
            let mut subject_entry = set.find(&key).cloned().unwrap_or_else(|| SubjectEntry::new(key));
            let lease_holder = super::fetch::lease_of(&subject_entry.entry, holder, lease_until_ms);
            subject_entry.entry = cache::after_failure(
                &subject_entry.entry,
                lease_holder,
                failure.class,
                now_ms,
                retry_after_ms,
                &profile.backoff,
                jitter,
            );
            subject_entry.rejected = rejected;
            subject_entry.last_used_ms = now_ms;
            set.put(subject_entry, now_ms, te.cache.set_bytes).then(|| set.encode())
        });
        actions.push(Action::Count { profile: index, metric: Metric::FetchFailed(failure.label.clone()) });
        // The subject is never named: not its token, not its digest.
        log(
            actions,
            LogLevel::Warn,
            format!("profile {:?}: token exchange failed: {} [{}]", profile.name, failure.message, failure.label),
        );
        self.wanted.remove(&(index, key));
        actions.push(Action::BroadcastWake);
    }

    /// The upstream answered `status` to a request that carried token `generation` exchanged for
    /// `subject`: drop it if the status is one that means "rejected", and have every VM drop its
    /// copies of the profile's tokens (the purge counter moves).
    pub fn on_subject_status(
        &mut self,
        profile: usize,
        subject: &SubjectKey,
        generation: u64,
        status: Option<&[u8]>,
        now_ms: u64,
        env: &mut dyn Environment,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let config = std::sync::Arc::clone(&self.config);
        let Some((p, te)) = exchange_profile(&config.profiles, profile) else { return actions };
        let Some(status) = super::requests::rejection(p, status) else { return actions };
        let key = *subject;
        let update = store::update_bytes(env, &set_key(&p.cache_key, key.set_index(te.cache.sets)), |bytes| {
            let mut set = SubjectSet::decode(bytes);
            let mut subject_entry = set.find(&key).cloned()?;
            subject_entry.entry = cache::purge(&subject_entry.entry, generation)?;
            set.put(subject_entry, now_ms, te.cache.set_bytes).then(|| set.encode())
        });
        if let Ok(Some(_)) = update {
            let _ = store::update_bytes(env, &purges_key(&p.cache_key), |bytes| {
                let count = bytes.and_then(|b| b.first_chunk::<8>()).map_or(0, |b| u64::from_le_bytes(*b));
                Some(count.wrapping_add(1).to_le_bytes().to_vec())
            });
            self.subject_copies.remove_subject(profile, &key);
            actions.push(Action::Count { profile, metric: Metric::Purged });
            actions.push(Action::BroadcastWake);
            log(
                &mut actions,
                LogLevel::Info,
                format!("profile {:?}: upstream answered {status} to an exchanged token; dropped it", p.name),
            );
        }
        actions
    }
}

/// Caps a stored exchanged token's times by the subject token's JWS `exp`
/// ([`crate::exchange::subject_usable_until_ms`]).
fn cap_by_subject(entry: &mut Entry, subject_exp_ms: Option<u64>, sent_at_ms: u64) {
    let Some(exp_ms) = subject_exp_ms else { return };
    if entry.token.is_empty() || entry.token_sent_at_ms != sent_at_ms {
        return; // a newer token was kept: its own request capped it
    }
    entry.expires_at_ms = entry.expires_at_ms.min(crate::exchange::subject_usable_until_ms(exp_ms));
    entry.refresh_at_ms = entry.refresh_at_ms.min(entry.expires_at_ms);
}
