//! The simulated world: VMs, the shared store, the clock, the event queue, and the bookkeeping
//! that checks the invariants after every step:
//! 1. single flight: a fetch starts only under this VM's lease, and while another fetch for the
//!    same cache key is still in flight only once that fetch's lease deadline has passed;
//! 2. no request is given a token (hit path, `Inject`, `Resume`) at or after its true expiry;
//! 3. every paused request is resumed or failed by its `max_wait_ms` deadline plus the largest
//!    tick lateness and 100 ms (the deadline is a wake of its own: `Driver::next_wake`);
//! 4. the hourly budget (fixed windows from the first fetch) and the backoff floor (the entry's
//!    `retry_at_ms`, the IdP's Retry-After, the least backoff delay) hold;
//! 5. a token fetched for one cache key is never served under another, and a request is settled
//!    at most once and never after it went away;
//! 6. a VM's copy of a token is served on the hit path no later than its `valid_until_ms` plus the
//!    largest tick lateness (the host ticks when `Driver::next_wake` says, which drops it);
//! 7. with a token-exchange profile (`exchange.rs`): a request is only ever given a token the IdP
//!    exchanged for its own subject, never past the subject's own `exp` nor past the copy's
//!    `use_until_ms` plus the largest tick lateness; single flight per (cache key, subject); no
//!    more exchanges in flight than `max_in_flight`; the store holds a fixed number of keys per
//!    profile, each set within its byte share.
//!
//! Ticks come as a host gives them: when the driver's `next_wake` says (at most
//! `MAX_WAKE_INTERVAL_MS` later), asked again after every driver call and brought forward when a
//! call needs one sooner, each up to `MAX_LATENESS_MS` late.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use super::super::store::memory::MemoryStore;
use super::super::{
    Action, Answer, AnswerBody, CalloutId, Driver, Environment, MAX_WAKE_INTERVAL_MS, Metric, RequestId,
    RequestOutcome, Written, read_entry, wake_in_ms,
};
use super::Rng;
use super::idp::{self, Reply, RetryFloor};
use crate::cache::{BUDGET_WINDOW_MS, LAST_CHANCE_MIN_MS};
use crate::config::{self, Config};

const MAX_LATENESS_MS: u64 = 900;
const START_MS: u64 = 1_764_000_000_000;

#[derive(Debug, Clone)]
pub(super) struct Params {
    vms: usize,
    mains: usize,
    horizon_ms: u64,
    timeout_ms: u64,
    base_ms: u64,
    max_fetches: Option<u32>,
    max_paused: u32,
    request_gap_ms: u64,
    discovery: bool,
    ok_percent: u64,
    interfere_per_mille: u64,
    reconfigs: u64,
    restarts: u64,
    /// Profile p exchanges subject tokens (RFC 8693) instead of client credentials.
    pub(super) exchange: Option<exchange::ExchangeParams>,
}

impl Params {
    pub(crate) fn random(rng: &mut Rng) -> Params {
        let vms = match rng.below(10) {
            0..=5 => rng.range(1, 4),
            6..=8 => rng.range(5, 8),
            _ => rng.range(9, 32),
        } as usize;
        let mains = if vms == 1 { 0 } else { rng.range(1, 2.min(vms as u64 - 1)) as usize };
        let horizon_ms = rng.range(2_000, 30_000).min(100_000 / vms as u64 + 1_000);
        let exchange = rng.chance(30).then(|| exchange::ExchangeParams::random(rng));
        Params {
            vms,
            mains,
            horizon_ms,
            timeout_ms: rng.range(200, 2_000),
            base_ms: rng.range(500, 2_000),
            max_fetches: if exchange.is_none() && rng.chance(30) { Some(rng.range(1, 6) as u32) } else { None },
            max_paused: if rng.chance(20) { rng.range(1, 3) as u32 } else { 1_000 },
            request_gap_ms: rng.range(1, 300),
            discovery: exchange.is_none() && rng.chance(20),
            ok_percent: rng.range(30, 95),
            interfere_per_mille: rng.range(0, 300),
            reconfigs: rng.below(3),
            restarts: rng.below(3),
            exchange,
        }
    }

    /// Configuration variants: 0 and 1 share p's cache key (1 changes max_wait_ms), 2 changes p's
    /// scope (a new key), 3 adds profile q before p.
    fn config(&self, variant: usize) -> Arc<Config> {
        let endpoint =
            if self.discovery { r#""issuer": "http://idp.test""# } else { r#""token_url": "http://idp.test/token""# };
        let budget = self.max_fetches.map(|n| format!(r#", "max_fetches_per_hour": {n}"#)).unwrap_or_default();
        let profile = |name: &str, scope: &str, wait: u64| {
            let exchange = match &self.exchange {
                Some(x) if name == "p" => x.profile_fields(),
                _ => String::new(),
            };
            format!(
                r#""{name}": {{"cluster": "idp-{name}", {endpoint}, "client_id": "svc", "client_secret": "s3cret",
                "timeout_ms": {}, "max_wait_ms": {wait}, "scopes": ["{scope}"], "backoff": {{"base_ms": {}, "max_ms": 8000}} {budget} {exchange}}}"#,
                self.timeout_ms, self.base_ms
            )
        };
        let wait = self.timeout_ms + 1_000;
        let profiles = match variant {
            0 => profile("p", "a", wait),
            1 => profile("p", "a", wait * 2),
            2 => profile("p", "b", wait),
            _ => format!("{}, {}", profile("a0", "x", wait), profile("p", "a", wait)),
        };
        let json = format!(
            r#"{{"max_paused_requests": {}, "profiles": {{{profiles}}}, "routes": [{{"match": {{"path_prefix": "/"}}, "profile": "p"}}]}}"#,
            self.max_paused
        );
        match config::parse(json.as_bytes(), &|_| None) {
            Ok(config) => Arc::new(config),
            Err(error) => panic!("simulation config refused: {error}"),
        }
    }
}

#[derive(Debug, Clone)]
enum Ev {
    /// The tick armed `arm`-th for this VM (a later arming replaces it).
    Tick {
        vm: usize,
        arm: u64,
    },
    Wake {
        vm: usize,
        incarnation: u32,
        kicked: Option<usize>,
    },
    Arrival,
    Gone {
        request: RequestId,
    },
    Answer {
        vm: usize,
        incarnation: u32,
        id: CalloutId,
        reply: Box<Reply>,
        first: bool,
    },
    RolloutConfig {
        variant: usize,
    },
    Reconfigure {
        vm: usize,
        variant: usize,
    },
    Restart {
        vm: usize,
    },
}

struct Queued {
    at: u64,
    seq: u64,
    ev: Ev,
}
impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Vm {
    driver: Option<Driver>,
    holder: u64,
    incarnation: u32,
    worker: bool,
    serving: bool,
    variant: usize,
    /// The tick the host asked for: its arming number and when it is due.
    arm: u64,
    tick_at: u64,
}

/// One fetch (discovery chain and token request) as seen from outside.
struct Chain {
    key: String,
    lease_until: u64,
    /// Callouts sent and not yet ended (answered, timed out, or delivered to a VM that is gone).
    outstanding: u32,
}

struct Paused {
    vm: usize,
    incarnation: u32,
    key: String,
    bound_ms: u64,
    /// The subject token of a token-exchange profile's request.
    subject: Option<String>,
}

/// Where a driver call came from: a claim may start a fetch; an answer continues one.
#[derive(Clone, Copy)]
enum Origin {
    Claim,
    Continue(usize),
}

pub(super) struct World {
    pub(crate) params: Params,
    rng: Rng,
    now: u64,
    store: MemoryStore,
    configs: Vec<Arc<Config>>,
    vms: Vec<Vm>,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    next_holder: u64,
    next_request: RequestId,
    /// Every token the IdP issued: its cache key, true expiry, and the subject it was exchanged for.
    tokens: HashMap<String, (String, u64, Option<String>)>,
    next_token: u64,
    callouts: HashMap<(usize, u32, CalloutId), usize>,
    chains: Vec<Chain>,
    requests: HashMap<RequestId, Paused>,
    floors: HashMap<String, u64>,
    budgets: HashMap<String, (u64, u32)>,
    /// Driver calls under way (2: another VM's wake runs inside a CAS write).
    depth: u32,
    pub(crate) trace: Option<Vec<String>>,
    pub(crate) violation: Option<String>,
    pub(crate) stats: Stats,
}

/// The store as one VM sees it during a driver call. Between reading and writing (at a CAS
/// point) another VM's whole wake may run: the interleaving threads produce in Envoy.
struct Env<'w> {
    world: &'w mut World,
    me: usize,
}

impl Environment for Env<'_> {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.world.store.get(key)
    }
    fn set(&mut self, key: &str, value: &[u8], expected: Option<u32>) -> Written {
        if self.world.depth == 1 && self.world.rng.chance_per_mille(self.world.params.interfere_per_mille) {
            self.world.interfere(self.me);
        }
        if self.world.rng.chance_per_mille(2) {
            return Written::Failed;
        }
        self.world.store.set(key, value, expected)
    }
    fn random_u64(&mut self) -> u64 {
        self.world.rng.next()
    }
}

impl World {
    pub(crate) fn new(seed: u64, mut rng: Rng, params: Params, trace: bool) -> World {
        let configs: Vec<Arc<Config>> = (0..4).map(|v| params.config(v)).collect();
        let mut world = World {
            now: START_MS + rng.below(1_000),
            rng,
            store: MemoryStore { random_state: seed, ..MemoryStore::default() },
            configs,
            vms: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            next_holder: 1,
            next_request: 1,
            tokens: HashMap::new(),
            next_token: 1,
            callouts: HashMap::new(),
            chains: Vec::new(),
            requests: HashMap::new(),
            floors: HashMap::new(),
            budgets: HashMap::new(),
            depth: 0,
            trace: trace.then(Vec::new),
            violation: None,
            stats: Stats::default(),
            params,
        };
        for vm in 0..world.params.vms {
            let worker = vm >= world.params.mains;
            world.vms.push(Vm {
                driver: None,
                holder: 0,
                incarnation: 0,
                worker,
                serving: false,
                variant: 0,
                arm: 0,
                tick_at: 0,
            });
            world.start_vm(vm);
        }
        let first = world.rng.below(50);
        world.schedule(first, Ev::Arrival);
        for _ in 0..world.params.reconfigs {
            let at = world.rng.below(world.params.horizon_ms);
            let variant = world.rng.below(4) as usize;
            world.schedule(at, Ev::RolloutConfig { variant });
        }
        for _ in 0..world.params.restarts {
            let at = world.rng.below(world.params.horizon_ms);
            let vm = world.rng.below(world.params.vms as u64) as usize;
            world.schedule(at, Ev::Restart { vm });
        }
        world
    }

    fn schedule(&mut self, delay_ms: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued { at: self.now + delay_ms, seq: self.seq, ev }));
    }

    fn violate(&mut self, message: String) {
        if self.violation.is_none() {
            self.violation = Some(format!("at t=+{} ms: {message}", self.now - START_MS));
        }
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = self.trace.as_mut() {
            trace.push(line());
        }
    }

    pub(crate) fn run(&mut self) {
        let end = START_MS + self.params.horizon_ms;
        // After the horizon only ticks, wakes and answers run, until every paused request is due.
        let drain_until = end + 2 * (self.params.timeout_ms + 1_000) + 2 * (MAX_WAKE_INTERVAL_MS + MAX_LATENESS_MS);
        while let Some(Reverse(queued)) = self.queue.pop() {
            if queued.at > drain_until || self.violation.is_some() {
                break;
            }
            let late = queued.at > end;
            if late && matches!(queued.ev, Ev::Arrival | Ev::RolloutConfig { .. } | Ev::Restart { .. }) {
                continue;
            }
            self.now = queued.at;
            self.stats.steps += 1;
            self.check_deadlines();
            self.step(queued.ev);
            self.check_deadlines();
        }
        self.check_store_bound();
        if self.violation.is_none() && !self.requests.is_empty() {
            let left: Vec<_> = self.requests.keys().collect();
            self.violate(format!("invariant 3: requests {left:?} still paused when the simulation drained"));
        }
    }

    fn step(&mut self, ev: Ev) {
        let t = self.now - START_MS;
        self.note(|| format!("t=+{t} {ev:?}"));
        match ev {
            Ev::Tick { vm, arm } => {
                if self.vms[vm].arm != arm {
                    return; // replaced by a later arming
                }
                self.stats.ticks += 1;
                let actions = self.call(vm, |d, now, env| d.on_tick(now, env));
                self.apply(vm, Origin::Claim, actions);
                self.arm_tick(vm, true);
            }
            Ev::Wake { vm, incarnation, kicked } => {
                if self.vms[vm].incarnation == incarnation {
                    let kicked: Vec<usize> = kicked.into_iter().collect();
                    let actions = self.call(vm, |d, now, env| d.on_wake(&kicked, now, env));
                    self.apply(vm, Origin::Claim, actions);
                }
            }
            Ev::Arrival => {
                self.arrival();
                let gap = self.rng.range(0, 2 * self.params.request_gap_ms);
                self.schedule(gap, Ev::Arrival);
            }
            Ev::Gone { request } => {
                if let Some(paused) = self.requests.remove(&request)
                    && let Some(driver) = self.vms[paused.vm].driver.as_mut()
                {
                    driver.on_request_gone(request);
                }
            }
            Ev::Answer { vm, incarnation, id, reply, first } => self.answer(vm, incarnation, id, &reply, first),
            Ev::RolloutConfig { variant } => {
                for vm in 0..self.vms.len() {
                    let delay = self.rng.below(300);
                    self.schedule(delay, Ev::Reconfigure { vm, variant });
                }
            }
            Ev::Reconfigure { vm, variant } => {
                self.vms[vm].variant = variant;
                let config = Arc::clone(&self.configs[variant]);
                let actions = self.call(vm, |d, now, env| d.reconfigure(config, now, env));
                self.apply(vm, Origin::Claim, actions);
            }
            Ev::Restart { vm } => {
                self.stats.restarts += 1;
                let before = self.requests.len();
                self.requests.retain(|_, p| p.vm != vm);
                self.stats.lost_requests += (before - self.requests.len()) as u64;
                self.start_vm(vm);
            }
        }
    }

    /// A new VM (at start or after a restart): a new driver with a new lease identity; what the
    /// old one had in flight is lost, the store survives.
    fn start_vm(&mut self, vm: usize) {
        let holder = self.next_holder;
        self.next_holder += 1;
        let config = Arc::clone(&self.configs[self.vms[vm].variant]);
        let slot = &mut self.vms[vm];
        slot.incarnation += 1;
        slot.holder = holder;
        slot.serving = false;
        slot.driver = None;
        let now = self.now;
        self.depth += 1;
        let mut env = Env { world: self, me: vm };
        let (driver, actions) = Driver::new(config, holder, now, &mut env);
        self.depth -= 1;
        self.vms[vm].driver = Some(driver);
        self.apply(vm, Origin::Claim, actions);
        self.arm_tick(vm, true);
    }

    /// The host asks for the VM's next tick when its driver's `next_wake` says (at most the
    /// ceiling from now): always after a tick or a start, after another call only when sooner
    /// than the tick already asked for. The tick comes up to `MAX_LATENESS_MS` late.
    fn arm_tick(&mut self, vm: usize, always: bool) {
        let Some(driver) = self.vms[vm].driver.as_ref() else { return };
        let at = self.now + wake_in_ms(driver.next_wake(), self.now);
        if !always && at >= self.vms[vm].tick_at {
            return;
        }
        let lateness = match self.rng.below(100) {
            0..=79 => self.rng.below(10),
            80..=94 => self.rng.below(200),
            _ => self.rng.range(0, MAX_LATENESS_MS),
        };
        let slot = &mut self.vms[vm];
        slot.arm += 1;
        slot.tick_at = at;
        let arm = slot.arm;
        self.schedule(at - self.now + lateness, Ev::Tick { vm, arm });
    }

    /// Calls the VM's driver with the store; `None`-driver (only while nested) yields nothing.
    fn call(&mut self, vm: usize, f: impl FnOnce(&mut Driver, u64, &mut Env<'_>) -> Vec<Action>) -> Vec<Action> {
        let Some(mut driver) = self.vms[vm].driver.take() else { return Vec::new() };
        let now = self.now;
        self.depth += 1;
        let actions = {
            let mut env = Env { world: self, me: vm };
            f(&mut driver, now, &mut env)
        };
        self.depth -= 1;
        self.vms[vm].driver = Some(driver);
        self.arm_tick(vm, false);
        actions
    }

    /// Another VM's wake runs between this VM's read and its compare-and-swap write.
    fn interfere(&mut self, me: usize) {
        let other = self.rng.below(self.vms.len() as u64) as usize;
        if other == me || self.vms[other].driver.is_none() {
            return;
        }
        self.note(|| format!("    (vm{other} wakes between vm{me}'s read and write)"));
        let kicked: Vec<usize> = (0..2).collect();
        let actions = self.call(other, |d, now, env| d.on_wake(&kicked, now, env));
        self.apply(other, Origin::Claim, actions);
    }

    fn key_of(&self, vm: usize, profile: usize) -> Option<String> {
        self.configs[self.vms[vm].variant].profiles.get(profile).map(|p| p.cache_key.clone())
    }

    /// A new request id on `vm`, which now serves requests (its driver is told on the first).
    fn begin_request(&mut self, vm: usize) -> RequestId {
        let request = self.next_request;
        self.next_request += 1;
        if !self.vms[vm].serving {
            self.vms[vm].serving = true;
            if let Some(driver) = self.vms[vm].driver.as_mut() {
                driver.set_serves_requests();
            }
        }
        request
    }

    fn arrival(&mut self) {
        let workers: Vec<usize> = (0..self.vms.len()).filter(|&v| self.vms[v].worker).collect();
        if workers.is_empty() {
            return;
        }
        let vm = workers[self.rng.below(workers.len() as u64) as usize];
        let name = if self.rng.chance(15) { "a0" } else { "p" };
        let config = Arc::clone(&self.configs[self.vms[vm].variant]);
        let Some(profile) = config.profiles.iter().position(|p| p.name == name) else { return };
        let key = config.profiles[profile].cache_key.clone();
        if config.profiles[profile].exchange.is_some() {
            return self.exchange_arrival(vm, profile, key);
        }
        let request = self.begin_request(vm);
        let hit = self.vms[vm].driver.as_ref().and_then(|d| d.cached(profile)).cloned();
        if let Some(copy) = hit {
            self.note(|| format!("    request {request} on vm{vm} hit"));
            if self.now > copy.valid_until_ms + MAX_LATENESS_MS {
                let late = self.now - copy.valid_until_ms;
                self.violate(format!("invariant 6: request {request} on vm{vm} served a copy {late} ms past its end"));
            }
            let value = copy.header_value;
            return self.served(&value, &key, None, &format!("hit path, request {request} on vm{vm}"));
        }
        let mut outcome = RequestOutcome::Fail;
        let actions = self.call(vm, |d, now, env| {
            let (o, actions) = d.on_request(profile, request, now, env);
            outcome = o;
            actions
        });
        self.note(|| format!("    request {request} on vm{vm}: {outcome:?}"));
        match outcome {
            RequestOutcome::Inject { value, .. } => {
                self.served(&value, &key, None, &format!("Inject, request {request}"))
            }
            RequestOutcome::Wait => {
                let bound_ms = self.now + config.profiles[profile].max_wait_ms + MAX_LATENESS_MS + 100;
                let incarnation = self.vms[vm].incarnation;
                self.requests.insert(request, Paused { vm, incarnation, key, bound_ms, subject: None });
                if self.rng.chance(10) {
                    let delay = self.rng.below(config.profiles[profile].max_wait_ms + 500);
                    self.schedule(delay, Ev::Gone { request });
                }
            }
            RequestOutcome::Fail | RequestOutcome::Refuse(_) => self.stats.failed += 1,
        }
        self.apply(vm, Origin::Claim, actions);
    }

    /// Invariants 2, 5 and 6 for a token handed to a request (of `subject`, on an exchange profile).
    fn served(&mut self, header_value: &str, key: &str, subject: Option<&str>, what: &str) {
        self.stats.served += 1;
        let token = header_value.strip_prefix("Bearer ").unwrap_or(header_value);
        match self.tokens.get(token) {
            None => self.violate(format!("{what}: a token the IdP never issued")),
            Some((issued_key, expiry, issued_subject)) => {
                let (issued_key, expiry, issued_subject) = (issued_key.clone(), *expiry, issued_subject.clone());
                if issued_subject.as_deref() != subject {
                    self.violate(format!(
                        "invariant 7: {what} for subject {subject:?} got the token exchanged for {issued_subject:?}"
                    ));
                }
                if self.now >= expiry {
                    self.violate(format!(
                        "invariant 2: {what} got a token {} ms after its true expiry",
                        self.now - expiry
                    ));
                }
                if issued_key != key {
                    self.violate(format!("invariant 5: {what} got a token of cache key {issued_key}, wants {key}"));
                }
            }
        }
    }

    fn check_deadlines(&mut self) {
        let now = self.now;
        if let Some((request, paused)) = self.requests.iter().find(|(_, p)| now > p.bound_ms) {
            let message = format!(
                "invariant 3: request {request} on vm{} still paused {} ms after its bound",
                paused.vm,
                now - paused.bound_ms
            );
            self.violate(message);
        }
    }
}

mod actions;
mod exchange;
mod stats;

pub(super) use stats::Stats;
