//! The simulation's token-exchange side (invariant 7): requests of many subjects on profile p,
//! the checks when an exchange starts (single flight per subject, the in-flight limit, the backoff
//! floor), and the store bound. The simulated IdP mints a token per exchange and the world records
//! whose subject it was for, so a token served to another subject is caught wherever it came from
//! (this VM's copy, an `Inject`, a `Resume`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::super::super::Callout;
use super::*;
use crate::config::TOKEN_EXCHANGE_GRANT_TYPE;
use crate::exchange::set::{SubjectSet, set_key};
use crate::exchange::{Subject, SubjectKey};

/// The shape of profile p as a token exchange.
#[derive(Debug, Clone)]
pub(in super::super) struct ExchangeParams {
    /// Distinct subjects the requests come from.
    subjects: u64,
    max_subjects: u64,
    per_second: u64,
    burst: u64,
    in_flight: u64,
    /// Share of subjects whose token is a JWS that expires during the run.
    jws_percent: u64,
}

impl ExchangeParams {
    pub(crate) fn random(rng: &mut Rng) -> ExchangeParams {
        ExchangeParams {
            subjects: rng.range(1, 40),
            max_subjects: rng.range(8, 24),
            per_second: rng.range(1, 50),
            burst: rng.range(1, 20),
            in_flight: rng.range(1, 4),
            jws_percent: rng.range(0, 50),
        }
    }

    /// The fields that make profile p a token exchange (a tight byte share: eviction happens).
    pub(crate) fn profile_fields(&self) -> String {
        let sets = self.max_subjects.div_ceil(crate::config::SUBJECT_SET_WAYS as u64);
        let max_bytes = sets * crate::config::MIN_SUBJECT_SET_BYTES as u64;
        format!(
            r#", "grant_type": "{TOKEN_EXCHANGE_GRANT_TYPE}", "token_exchange": {{
                "cache": {{"max_subjects": {}, "max_bytes": {max_bytes}}},
                "limits": {{"exchanges_per_second": {}, "burst": {}, "max_in_flight": {}}}}}"#,
            self.max_subjects, self.per_second, self.burst, self.in_flight
        )
    }

    /// Subject `n`'s token: opaque, or a JWS whose `exp` falls within the run (fixed per `n`).
    fn token(&self, n: u64) -> String {
        if (n * 37) % 100 < self.jws_percent {
            let exp_s = START_MS / 1000 + 2 + (n * 7) % 30;
            let payload = URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp_s},"sub":"s{n}"}}"#));
            format!("eyJhbGciOiJub25lIn0.{payload}.c2ln")
        } else {
            format!("subject-{n}")
        }
    }
}

/// The subject token an exchange callout carries (`None`: not an exchange).
pub(super) fn subject_of(callout: &Callout) -> Option<String> {
    let body = callout.body.as_deref()?;
    form_urlencoded::parse(body).find(|(name, _)| name == "subject_token").map(|(_, value)| value.into_owned())
}

impl World {
    /// A request of a random subject on exchange profile `profile`.
    pub(super) fn exchange_arrival(&mut self, vm: usize, profile: usize, key: String) {
        let Some(x) = self.params.exchange.clone() else { return };
        let token = x.token(self.rng.below(x.subjects));
        let request = self.begin_request(vm);
        let hit = self.vms[vm].driver.as_ref().and_then(|d| d.cached_subject(profile, token.as_bytes())).cloned();
        if let Some(copy) = hit {
            self.note(|| format!("    request {request} on vm{vm} hit (subject {})", short(&token)));
            if self.now > copy.use_until_ms + MAX_LATENESS_MS {
                let late = self.now - copy.use_until_ms;
                self.violate(format!(
                    "invariant 7: request {request} on vm{vm} served a subject's copy {late} ms past its end"
                ));
            }
            let value = copy.snapshot.header_value;
            return self.served_subject(&value, &key, &token, &format!("hit path, request {request} on vm{vm}"));
        }
        let subject = Subject::new(&token);
        let mut outcome = RequestOutcome::Fail;
        let actions = self.call(vm, |d, now, env| {
            let (o, actions) = d.on_subject_request(profile, request, &subject, now, env);
            outcome = o;
            actions
        });
        self.note(|| format!("    request {request} on vm{vm} (subject {}): {outcome:?}", short(&token)));
        let config = Arc::clone(&self.configs[self.vms[vm].variant]);
        match outcome {
            RequestOutcome::Inject { value, .. } => {
                self.served_subject(&value, &key, &token, &format!("Inject, request {request}"))
            }
            RequestOutcome::Wait => {
                let bound_ms = self.now + config.profiles[profile].max_wait_ms + MAX_LATENESS_MS + 100;
                let incarnation = self.vms[vm].incarnation;
                let paused = Paused { vm, incarnation, key, bound_ms, subject: Some(token) };
                self.requests.insert(request, paused);
                if self.rng.chance(10) {
                    let delay = self.rng.below(config.profiles[profile].max_wait_ms + 500);
                    self.schedule(delay, Ev::Gone { request });
                }
            }
            RequestOutcome::Fail | RequestOutcome::Refuse(_) => self.stats.failed += 1,
        }
        self.apply(vm, Origin::Claim, actions);
    }

    /// Invariant 6 on top of `served`: never sent once the subject token's own `exp` has passed.
    pub(super) fn served_subject(&mut self, header_value: &str, key: &str, subject: &str, what: &str) {
        self.stats.subject_served += 1;
        if let Some(exp_ms) = crate::token_expiry::jws_expiry_ms(subject)
            && self.now >= exp_ms
        {
            self.violate(format!("invariant 7: {what} sent {} ms after its subject's exp", self.now - exp_ms));
        }
        self.served(header_value, key, Some(subject), what);
    }

    /// Invariants 1, 4 and 6 when an exchange starts; the chain's index (one chain per subject).
    pub(super) fn start_exchange_chain(
        &mut self,
        vm: usize,
        config: &Config,
        key: &str,
        subject: &str,
    ) -> Option<usize> {
        self.stats.fetches += 1;
        self.stats.exchanges += 1;
        let now = self.now;
        let te = config.profiles.iter().find(|p| p.cache_key == key).and_then(|p| p.exchange.clone())?;
        let subject_key = SubjectKey::of(subject.as_bytes());
        let bytes = self.store.get(&set_key(key, subject_key.set_index(te.cache.sets))).0;
        let entry =
            SubjectSet::decode(bytes.as_deref()).find(&subject_key).map(|e| e.entry.clone()).unwrap_or_default();
        if entry.lease_holder != self.vms[vm].holder || entry.lease_until_ms <= now {
            self.violate(format!("invariant 1: vm{vm} started an exchange without the subject's lease: {entry:?}"));
            return None;
        }
        let chain_key = format!("{key}#{subject}");
        let live = |c: &&Chain| c.outstanding > 0 && c.lease_until > now;
        if self.chains.iter().filter(live).any(|c| c.key == chain_key) {
            self.violate(format!(
                "invariant 1: vm{vm} started a second exchange for subject {} in flight",
                short(subject)
            ));
        }
        let in_flight = self.chains.iter().filter(live).filter(|c| c.key.starts_with(&format!("{key}#"))).count();
        if in_flight as u32 >= te.limits.max_in_flight {
            self.violate(format!(
                "invariant 7: exchange {} in flight, max_in_flight {}",
                in_flight + 1,
                te.limits.max_in_flight
            ));
        }
        if now < entry.retry_at_ms {
            self.violate(format!(
                "invariant 4: vm{vm} exchanged {} ms before the backoff floor",
                entry.retry_at_ms - now
            ));
        }
        self.chains.push(Chain { key: chain_key, lease_until: entry.lease_until_ms, outstanding: 0 });
        Some(self.chains.len() - 1)
    }

    /// Invariant 6: per exchange profile, a fixed number of keys, each set within its byte share.
    pub(super) fn check_store_bound(&mut self) {
        let configs = self.configs.clone();
        for config in &configs {
            for profile in config.profiles.iter().filter(|p| p.exchange.is_some()) {
                let Some(te) = &profile.exchange else { continue };
                let prefix = format!("{}.x.", profile.cache_key);
                let keys: Vec<(String, usize)> = self
                    .store
                    .map
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, (v, _))| (k.clone(), v.len()))
                    .collect();
                if keys.len() > te.cache.sets + 2 {
                    self.violate(format!("invariant 7: {} keys for a profile of {} sets", keys.len(), te.cache.sets));
                }
                for (key, len) in keys {
                    let is_set = key.strip_prefix(&prefix).is_some_and(|rest| rest.parse::<usize>().is_ok());
                    if is_set && len > te.cache.set_bytes {
                        self.violate(format!("invariant 7: set {key} holds {len} bytes, share {}", te.cache.set_bytes));
                    }
                }
            }
        }
    }
}

/// A subject token as the trace shows it: its end (the simulation's tokens are not secrets).
fn short(token: &str) -> &str {
    token.get(token.len().saturating_sub(10)..).unwrap_or(token)
}
