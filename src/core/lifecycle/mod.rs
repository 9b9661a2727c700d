//! The token lifecycle of one VM, as a sans-I/O state machine: every decision about fetching,
//! caching, waiting requests and reconfiguration, none of the doing.
//!
//! A host (the proxy-wasm root context, the Envoy dynamic module) owns one [`Driver`] per VM (or
//! per thread that plays that part), feeds it events — a tick, a wake, a kick, a request that
//! needs a token, the answer to a callout, a reconfiguration — with the time, and carries out the
//! [`Action`]s it returns in order: send this request, wake every VM, resume or fail this paused
//! request, log this line, count this metric. The only synchronous reads are the shared store and
//! randomness, through [`Environment`], whose compare-and-swap outcome the driver sees (a lost race
//! is never a silent send).
//!
//! Single flight: a fetch starts only after this VM wrote a lease into the profile's shared entry
//! with CAS; the lease lasts for the whole chain of requests the fetch needs (discovery documents,
//! then the token request), so no other VM takes over mid-chain unless the chain outlives it.

mod exchange;
mod exchange_answer;
mod fetch;
mod requests;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::config::Config;
pub use crate::metrics::Metric;
use crate::url::HttpUrl;
pub use requests::{FailureReply, RequestOutcome, Snapshot};
pub(crate) use requests::{failure_reply, unknown_profile_reply};
pub use store::{Environment, Update, Written};

/// Identifies a callout this driver asked for; the host maps its own handle to it.
pub type CalloutId = u64;
/// Identifies a paused request; chosen by the host (the proxy-wasm context id, a stream handle).
pub type RequestId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// An HTTP request to send to a cluster from the context that outlives requests (a root context,
/// the main thread). If the host cannot dispatch it, it calls [`Driver::on_send_failed`].
#[derive(Clone, PartialEq, Eq)]
pub struct Callout {
    pub id: CalloutId,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u64,
}

impl std::fmt::Debug for Callout {
    /// Headers and body carry client credentials: only their size is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callout")
            .field("id", &self.id)
            .field("cluster", &self.cluster)
            .field("headers", &self.headers.len())
            .field("body_bytes", &self.body.as_ref().map_or(0, Vec::len))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// What the host must do, in the order given.
#[derive(Clone, PartialEq, Eq)]
pub enum Action {
    Send(Callout),
    /// Wake every VM (this one included): a token changed or a fetch ended.
    BroadcastWake,
    /// Ask the fetching context of this VM to look at `profile` now (an http context cannot send
    /// callouts that outlive its request).
    Kick {
        profile: usize,
    },
    /// Write `header: value` on the paused request and let it continue.
    Resume {
        request: RequestId,
        profile: usize,
        header: String,
        value: String,
        generation: u64,
    },
    /// Answer the paused request with the failure reply of `profile`.
    Fail {
        request: RequestId,
        profile: usize,
    },
    /// Answer the paused request with the reply of `refusal` (a token-exchange profile).
    Refuse {
        request: RequestId,
        profile: usize,
        refusal: crate::exchange::Refusal,
    },
    Log {
        level: LogLevel,
        message: String,
    },
    Count {
        profile: usize,
        metric: Metric,
    },
    /// Set the profile's gauges: `token_remaining_s` and `token_lifetime_s`.
    Gauge {
        profile: usize,
        remaining_s: u64,
        lifetime_s: u64,
    },
}

impl std::fmt::Debug for Action {
    /// A resumed request's header value is the token: never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Send(callout) => write!(f, "Send({callout:?})"),
            Action::BroadcastWake => write!(f, "BroadcastWake"),
            Action::Kick { profile } => write!(f, "Kick({profile})"),
            Action::Resume { request, profile, generation, .. } => {
                write!(f, "Resume(request {request}, profile {profile}, generation {generation})")
            }
            Action::Fail { request, profile } => write!(f, "Fail(request {request}, profile {profile})"),
            Action::Refuse { request, profile, refusal } => {
                write!(f, "Refuse(request {request}, profile {profile}, {refusal:?})")
            }
            Action::Log { level, message } => write!(f, "Log({level:?}, {message:?})"),
            Action::Count { profile, metric } => write!(f, "Count({profile}, {metric:?})"),
            Action::Gauge { profile, remaining_s, lifetime_s } => {
                write!(f, "Gauge({profile}, {remaining_s} s of {lifetime_s} s)")
            }
        }
    }
}

/// The answer to a callout, as the host read it. The host reads the body only when it is no
/// larger than [`Driver::answer_limit`]; otherwise it passes [`AnswerBody::TooLarge`].
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// The `:status` header's bytes (`None`: absent).
    pub status: Option<&'a [u8]>,
    /// The `retry-after` header's bytes.
    pub retry_after: Option<&'a [u8]>,
    pub body: AnswerBody<'a>,
}

#[derive(Debug, Clone, Copy)]
pub enum AnswerBody<'a> {
    Bytes(&'a [u8]),
    TooLarge,
}

/// What an IdP's answer says, for a client-credentials fetch and an exchange alike: the grant, or
/// why there is none.
fn parse_answer(
    profile: &crate::config::Profile,
    status: u32,
    body: AnswerBody<'_>,
) -> Result<crate::token_response::TokenGrant, crate::token_response::TokenError> {
    match body {
        AnswerBody::TooLarge => Err(crate::token_response::TokenError::TooLarge { limit: profile.max_response_bytes }),
        AnswerBody::Bytes(body) => crate::token_response::parse(
            status,
            body,
            &profile.token_field,
            &profile.expires_in_field,
            profile.max_response_bytes,
        ),
    }
}

/// How often the main-thread VM sets the token gauges.
const GAUGE_PERIOD_MS: u64 = 1_000;

/// The longest a host sleeps between two events, whatever [`Driver::next_wake`] says (see
/// [`wake_in_ms`]): a wake the driver could not foresee (a lost wake message, a clock that jumped)
/// costs at most this. The gauge period, so a main-thread VM, which sets its gauges that often
/// anyway, wakes no more for it; and counts a worker batches reach Envoy within it.
pub const MAX_WAKE_INTERVAL_MS: u64 = 1_000;

/// After a tick that could not do what was due (the store refused or stayed contended), when it
/// is tried again: the period hosts used to tick at, so a stuck store never makes a busy loop.
const STALLED_RETRY_MS: u64 = 100;

/// How long a host waits, from `now_ms`, before it gives its driver the next tick: until
/// `next_wake` ([`Driver::next_wake`]; a time already past: 1 ms, at once but never a period of
/// 0, which stops a proxy-wasm tick), and never longer than [`MAX_WAKE_INTERVAL_MS`].
pub fn wake_in_ms(next_wake: Option<u64>, now_ms: u64) -> u64 {
    next_wake.map_or(MAX_WAKE_INTERVAL_MS, |at| at.saturating_sub(now_ms)).clamp(1, MAX_WAKE_INTERVAL_MS)
}

/// One VM's lifecycle state. See the module doc.
pub struct Driver {
    config: Arc<Config>,
    /// This VM's identity in fetch leases (never 0).
    holder: u64,
    /// Whether this VM serves requests (a worker): it leaves background refreshes to the
    /// main-thread VMs for a grace, so signing stays off request threads.
    serves_requests: bool,
    next_callout: CalloutId,
    /// Callouts in flight, keyed by the id the host reports; by cache key, so a reconfiguration
    /// that keeps a profile's cache key keeps its fetch, and one that changes it orphans it.
    pending: BTreeMap<CalloutId, fetch::Pending>,
    waiters: Vec<requests::Waiter>,
    /// Token endpoints found by discovery, by cache key (also kept in the shared store).
    discovered: HashMap<String, HttpUrl>,
    /// Per profile, this VM's copy of the cached token for the request path.
    snapshots: Vec<Option<Snapshot>>,
    /// Moves whenever a copy in `snapshots` changes (see [`Driver::copies_generation`]).
    copies_generation: u64,
    /// Per profile, the earliest time a fetch could start, as this VM last saw the entry
    /// (`cache::next_claim_ms`; for [`Driver::next_wake`]).
    claim_at_ms: Vec<u64>,
    next_gauge_ms: u64,
    /// Cache keys a newer configuration of this process owns (see [`Driver::set_superseded`]).
    superseded: Vec<String>,
    /// Per profile, the usable lifetime in seconds of the last token this VM saw in the store:
    /// kept after the token expires or is purged, for the `token_lifetime_s` gauge.
    lifetimes_s: Vec<u64>,
    /// Token exchange: the subjects this VM wants exchanged, with their tokens (ordered, so
    /// every run tries them in the same order).
    wanted: BTreeMap<(usize, crate::exchange::SubjectKey), exchange::Wanted>,
    /// Token exchange: this VM's copies of exchanged tokens for the hit path.
    subject_copies: crate::exchange::copies::SubjectCopies,
    /// Token exchange: per profile, the purge counter last seen (its copies are dropped when it moves).
    purge_marks: Vec<Option<Vec<u8>>>,
}

impl Driver {
    /// A driver for a freshly configured VM: creates each profile's entry (never overwriting one
    /// another VM made) and takes copies of the tokens already cached.
    pub fn new(config: Arc<Config>, holder: u64, now_ms: u64, env: &mut dyn Environment) -> (Driver, Vec<Action>) {
        let mut driver = Driver {
            config,
            holder: holder.max(1),
            serves_requests: false,
            next_callout: 1,
            pending: BTreeMap::new(),
            waiters: Vec::new(),
            discovered: HashMap::new(),
            snapshots: Vec::new(),
            copies_generation: 1,
            claim_at_ms: Vec::new(),
            next_gauge_ms: 0,
            superseded: Vec::new(),
            lifetimes_s: Vec::new(),
            wanted: BTreeMap::new(),
            subject_copies: Default::default(),
            purge_marks: Vec::new(),
        };
        let mut actions = Vec::new();
        driver.prepare_entries(now_ms, env, &mut actions);
        (driver, actions)
    }

    /// A new configuration for the same VM. Paused requests and callouts in flight whose profile
    /// keeps its cache key carry on under it (re-keyed to the new profile index); the others are
    /// failed or forgotten, so a token of the old configuration is never served under the new one.
    pub fn reconfigure(&mut self, config: Arc<Config>, now_ms: u64, env: &mut dyn Environment) -> Vec<Action> {
        let mut actions = Vec::new();
        let old = std::mem::replace(&mut self.config, config);
        self.rekey_waiters(&old, &mut actions);
        self.rekey_wants(&old);
        let live: Vec<&str> = self.config.profiles.iter().map(|p| p.cache_key.as_str()).collect();
        self.pending.retain(|_, pending| live.contains(&pending.cache_key.as_str()));
        self.discovered.retain(|key, _| live.contains(&key.as_str()));
        self.prepare_entries(now_ms, env, &mut actions);
        actions
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The cache keys a newer configuration in the same process also serves (replacing the last
    /// list). The newest configuration of a key owns its fetches, background refresh included; an
    /// older one (a listener being drained) sends no token request for them and takes their
    /// tokens from the shared store, where the owner's fetch lands and whence a broadcast wake
    /// or its next tick resumes its paused requests.
    pub fn set_superseded(&mut self, cache_keys: Vec<String>) {
        self.superseded = cache_keys;
    }

    /// This VM serves requests (called when its first request context is created).
    pub fn set_serves_requests(&mut self) {
        self.serves_requests = true;
    }

    /// The tick the host gives at [`Driver::next_wake`] (or sooner): refresh copies, fetch what
    /// is due, settle paused requests.
    pub fn on_tick(&mut self, now_ms: u64, env: &mut dyn Environment) -> Vec<Action> {
        let mut actions = Vec::new();
        self.refresh_snapshots(now_ms, env);
        self.report_gauges(now_ms, env, &mut actions);
        for index in 0..self.config.profiles.len() {
            self.maybe_fetch(index, now_ms, env, &mut actions);
            // Still due after trying: the store refused or stayed contended. Try again soon, not
            // at once (that would be a busy loop).
            if let Some(at) = self.claim_at_ms.get_mut(index)
                && *at <= now_ms
            {
                *at = now_ms.saturating_add(STALLED_RETRY_MS);
            }
        }
        self.settle_waiters(now_ms, env, &mut actions);
        actions
    }

    /// When this driver next needs a tick (milliseconds since the epoch; a time already past
    /// means now; `None`: nothing is timed), quinn-proto's `poll_timeout`: the earliest of each
    /// profile's next possible fetch (refresh time, a worker's grace, expiry, the end of a backoff
    /// or of another VM's lease, or at once with no token; not for keys a newer configuration
    /// owns), the end of each token copy (`Snapshot::valid_until_ms`), each paused request's
    /// deadline, and the next gauge report on a VM that sets gauges. Every change another VM makes
    /// that brings one of these closer comes with a broadcast wake, so the host need not ask
    /// sooner; it asks again after every event (any event may move it) and sleeps at most
    /// [`MAX_WAKE_INTERVAL_MS`] ([`wake_in_ms`]).
    pub fn next_wake(&self) -> Option<u64> {
        let fetches = (self.config.profiles.iter().zip(&self.claim_at_ms))
            .filter(|(profile, _)| !self.superseded.contains(&profile.cache_key))
            .map(|(_, at)| *at);
        let copies = self.snapshots.iter().flatten().map(|copy| copy.valid_until_ms);
        let deadlines = self.waiters.iter().map(|waiter| waiter.deadline_ms);
        let gauges = (!self.serves_requests).then_some(self.next_gauge_ms);
        // Exchanged tokens: the end of the first copy (pruned at the tick); wanted subjects are
        // tried again at every tick, at most MAX_WAKE_INTERVAL_MS apart.
        let subject_copies = self.subject_copies.earliest_end();
        fetches.chain(copies).chain(deadlines).chain(gauges).chain(subject_copies).min()
    }

    /// A wake from any VM (a token changed) or a kick from this VM's own requests (`kicked`
    /// profiles): take the new copies, fetch for profiles with waiters or kicks, settle.
    pub fn on_wake(&mut self, kicked: &[usize], now_ms: u64, env: &mut dyn Environment) -> Vec<Action> {
        let mut actions = Vec::new();
        self.refresh_snapshots(now_ms, env);
        let mut profiles: Vec<usize> = self.waiters.iter().map(|w| w.profile).chain(kicked.iter().copied()).collect();
        profiles.sort_unstable();
        profiles.dedup();
        for index in profiles {
            self.maybe_fetch(index, now_ms, env, &mut actions);
        }
        self.settle_waiters(now_ms, env, &mut actions);
        actions
    }

    fn prepare_entries(&mut self, now_ms: u64, env: &mut dyn Environment, actions: &mut Vec<Action>) {
        for profile in &self.config.profiles {
            // An exchange profile's keys are its sets, written when a subject is first exchanged.
            if profile.exchange.is_none() && store::ensure_entry(env, &profile.cache_key) == Written::Failed {
                actions.push(Action::Log {
                    level: LogLevel::Error,
                    message: format!("profile {:?}: cannot create the token cache entry", profile.name),
                });
            }
        }
        self.snapshots = vec![None; self.config.profiles.len()];
        self.claim_at_ms = vec![0; self.config.profiles.len()];
        self.lifetimes_s = vec![0; self.config.profiles.len()];
        self.subject_copies.clear();
        self.purge_marks = Vec::new();
        self.copies_generation = self.copies_generation.wrapping_add(1);
        self.refresh_snapshots(now_ms, env);
    }

    /// Once a second, on VMs that serve no requests (the main thread), each profile's remaining
    /// token lifetime and the lifetime of the last token it had.
    fn report_gauges(&mut self, now_ms: u64, env: &mut dyn Environment, actions: &mut Vec<Action>) {
        if self.serves_requests || now_ms < self.next_gauge_ms {
            return;
        }
        self.next_gauge_ms = now_ms.saturating_add(GAUGE_PERIOD_MS);
        for (profile, p) in self.config.profiles.iter().enumerate() {
            if p.exchange.is_some() {
                continue; // one token per subject: no profile-wide lifetime to report
            }
            let entry = read_entry(env, &p.cache_key);
            let remaining_ms = if entry.token.is_empty() { 0 } else { entry.expires_at_ms.saturating_sub(now_ms) };
            let Some(lifetime_s) = self.lifetimes_s.get_mut(profile) else { continue };
            if !entry.token.is_empty() && entry.expires_at_ms > entry.token_sent_at_ms {
                *lifetime_s = (entry.expires_at_ms - entry.token_sent_at_ms) / 1000;
            }
            actions.push(Action::Gauge { profile, remaining_s: remaining_ms / 1000, lifetime_s: *lifetime_s });
        }
    }
}

/// The decoded entry at `key` (empty when missing or of another layout version).
fn read_entry(env: &dyn Environment, key: &str) -> crate::cache::Entry {
    env.get(key).0.as_deref().and_then(crate::cache::Entry::decode).unwrap_or_default()
}

fn log(actions: &mut Vec<Action>, level: LogLevel, message: String) {
    actions.push(Action::Log { level, message });
}

#[cfg(test)]
mod exchange_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
