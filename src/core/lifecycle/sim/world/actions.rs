//! Carrying out a driver's actions in the simulated world, with the checks each one allows:
//! a fetch that starts (invariants 1 and 4), a request resumed or failed (2, 3, 5), and what the
//! simulated IdP answers.

use super::super::super::Callout;
use super::exchange;
use super::*;

impl World {
    pub(super) fn apply(&mut self, vm: usize, origin: Origin, actions: Vec<Action>) {
        let incarnation = self.vms[vm].incarnation;
        for action in actions {
            if !matches!(action, Action::Count { .. } | Action::Gauge { .. } | Action::Kick { .. }) {
                self.note(|| format!("      vm{vm} {action:?}"));
            }
            match action {
                Action::Send(callout) => self.send(vm, origin, callout),
                Action::BroadcastWake => {
                    for other in 0..self.vms.len() {
                        // Delivered later, sometimes much later; a tick covers a lost one.
                        if self.rng.chance(2) {
                            continue;
                        }
                        let delay = if self.rng.chance(90) { self.rng.below(20) } else { self.rng.below(800) };
                        let incarnation = self.vms[other].incarnation;
                        self.schedule(delay, Ev::Wake { vm: other, incarnation, kicked: None });
                    }
                }
                Action::Kick { profile } => {
                    let delay = self.rng.below(5);
                    self.schedule(delay, Ev::Wake { vm, incarnation, kicked: Some(profile) });
                }
                Action::Resume { request, profile, value, .. } => {
                    self.stats.resumed += 1;
                    match self.requests.remove(&request) {
                        Some(paused) if paused.vm == vm && paused.incarnation == incarnation => {
                            let current = self.key_of(vm, profile).unwrap_or_default();
                            if current != paused.key {
                                self.violate(format!("invariant 5: request {request} paused under {} resumed under {current}", paused.key));
                            }
                            let what = format!("Resume of request {request} on vm{vm}");
                            match paused.subject.as_deref() {
                                Some(subject) => self.served_subject(&value, &paused.key, subject, &what),
                                None => self.served(&value, &paused.key, None, &what),
                            }
                        }
                        _ => self.violate(format!("request {request} resumed on vm{vm} but it is not paused there (settled, gone, or another VM's)")),
                    }
                }
                Action::Fail { request, .. } | Action::Refuse { request, .. } => {
                    self.stats.failed += 1;
                    match self.requests.remove(&request) {
                        Some(paused) if paused.vm == vm && paused.incarnation == incarnation => {}
                        _ => self.violate(format!("request {request} failed on vm{vm} but it is not paused there")),
                    }
                }
                Action::Count { metric: Metric::BudgetRefused, .. } => self.stats.budget_refusals += 1,
                Action::Log { .. } | Action::Count { .. } | Action::Gauge { .. } => {}
            }
        }
    }

    /// A callout the driver sends: a new fetch (after a claim) or the next request of one.
    fn send(&mut self, vm: usize, origin: Origin, callout: Callout) {
        let config = Arc::clone(&self.configs[self.vms[vm].variant]);
        let Some(profile) = config.profiles.iter().find(|p| p.cluster == callout.cluster) else {
            return self.violate(format!("vm{vm} sent to cluster {:?} of no profile", callout.cluster));
        };
        let key = profile.cache_key.clone();
        let subject = exchange::subject_of(&callout);
        let chain = match origin {
            Origin::Continue(chain) => chain,
            Origin::Claim => match &subject {
                Some(subject) => match self.start_exchange_chain(vm, &config, &key, subject) {
                    Some(chain) => chain,
                    None => return,
                },
                None => match self.start_chain(vm, &key) {
                    Some(chain) => chain,
                    None => return,
                },
            },
        };
        let incarnation = self.vms[vm].incarnation;
        self.callouts.insert((vm, incarnation, callout.id), chain);
        if self.rng.chance_per_mille(10) {
            // Envoy refuses to dispatch (no such cluster): the host reports it at once.
            self.note(|| format!("    callout {} on vm{vm}: dispatch refused", callout.id));
            self.callouts.remove(&(vm, incarnation, callout.id));
            let actions = self.call(vm, |d, now, env| d.on_send_failed(callout.id, now, env));
            self.after_failure_recorded(vm, &key, &actions, None);
            return self.apply(vm, Origin::Continue(chain), actions);
        }
        self.chains[chain].outstanding += 1;
        let discovery = callout.headers.iter().any(|(name, value)| name == ":path" && value.contains(".well-known"));
        let processing =
            if self.rng.chance(90) { self.rng.range(1, 300) } else { self.rng.range(1, 2 * callout.timeout_ms) };
        let (reply, delay) = if processing > callout.timeout_ms {
            (idp::timeout(&mut self.rng), callout.timeout_ms)
        } else if discovery {
            (idp::metadata(&mut self.rng), processing)
        } else if self.rng.chance(self.params.ok_percent) {
            let serial = self.next_token;
            self.next_token += 1;
            let issue_ms = self.now + processing / 2;
            let (reply, issued) = idp::success(&mut self.rng, serial, issue_ms);
            self.tokens.insert(issued.token, (key.clone(), issued.expiry_ms, subject.clone()));
            (reply, processing)
        } else {
            let reply = idp::failure(&mut self.rng, self.now + processing);
            (reply, processing)
        };
        // A host that handles the answer late (after the callout's timeout, even after the lease).
        let delay = if self.rng.chance(2) { callout.timeout_ms + self.rng.below(4_000) } else { delay };
        let id = callout.id;
        self.schedule(delay, Ev::Answer { vm, incarnation, id, reply: Box::new(reply.clone()), first: true });
        if self.rng.chance(3) {
            let again = delay + 1 + self.rng.below(500);
            self.schedule(again, Ev::Answer { vm, incarnation, id, reply: Box::new(reply), first: false });
        }
    }

    /// Invariants 1 and 4 when a fetch starts; the chain's index.
    fn start_chain(&mut self, vm: usize, key: &str) -> Option<usize> {
        self.stats.fetches += 1;
        let now = self.now;
        let entry = read_entry(&self.store, key);
        if entry.lease_holder != self.vms[vm].holder || entry.lease_until_ms <= now {
            self.violate(format!("invariant 1: vm{vm} started a fetch without holding the lease: {entry:?}"));
            return None;
        }
        let live: Vec<u64> =
            self.chains.iter().filter(|c| c.key == key && c.outstanding > 0).map(|c| c.lease_until).collect();
        if let Some(until) = live.iter().find(|&&until| until > now) {
            self.violate(format!(
                "invariant 1: vm{vm} started a second fetch for {key} while one is in flight under a lease until t=+{}",
                until - START_MS
            ));
        }
        if !live.is_empty() {
            self.stats.takeovers += 1;
        }
        let floor = self.floors.get(key).copied().unwrap_or(0);
        if now < floor.max(entry.retry_at_ms) {
            self.violate(format!(
                "invariant 4: vm{vm} fetched {} ms before the backoff floor",
                floor.max(entry.retry_at_ms) - now
            ));
        }
        if let Some(max) = self.params.max_fetches {
            let (start, used) = self.budgets.get(key).copied().unwrap_or((now, 0));
            let (start, used) = if used == 0 || now - start >= BUDGET_WINDOW_MS { (now, 1) } else { (start, used + 1) };
            self.budgets.insert(key.to_string(), (start, used));
            if used > max {
                self.violate(format!(
                    "invariant 4: fetch {used} for {key} in the hour window from t=+{}, max_fetches_per_hour {max}",
                    start - START_MS
                ));
            }
        }
        self.chains.push(Chain { key: key.to_string(), lease_until: entry.lease_until_ms, outstanding: 0 });
        Some(self.chains.len() - 1)
    }

    pub(super) fn answer(&mut self, vm: usize, incarnation: u32, id: CalloutId, reply: &Reply, first: bool) {
        let chain = if first {
            self.callouts.remove(&(vm, incarnation, id))
        } else {
            self.callouts.get(&(vm, incarnation, id)).copied()
        };
        let Some(chain) = chain else { return };
        if first {
            self.chains[chain].outstanding = self.chains[chain].outstanding.saturating_sub(1);
        }
        if self.vms[vm].incarnation != incarnation {
            return self.note(|| format!("    answer {id} for a VM that restarted: lost"));
        }
        self.note(|| format!("    vm{vm} callout {id}: {}{}", reply.label, if first { "" } else { " (duplicate)" }));
        let body = match &reply.body {
            Some(bytes) => AnswerBody::Bytes(bytes),
            None => AnswerBody::TooLarge,
        };
        let answer = Answer { status: reply.status.as_deref(), retry_after: reply.retry_after.as_deref(), body };
        let actions = self.call(vm, |d, now, env| d.on_answer(id, answer, now, env));
        if !first && !actions.is_empty() {
            self.violate(format!("a duplicate answer to callout {id} on vm{vm} was acted on: {actions:?}"));
        }
        let key = self.chains[chain].key.clone();
        self.after_failure_recorded(vm, &key, &actions, reply.retry_floor_ms);
        if actions.iter().any(|a| matches!(a, Action::Count { metric: Metric::FetchOk, .. })) {
            let entry = read_entry(&self.store, &key);
            if entry.retry_at_ms == 0 {
                self.floors.remove(&key);
            }
        }
        self.apply(vm, Origin::Continue(chain), actions);
    }

    /// After a failure the driver recorded in the store: the least backoff delay and the IdP's
    /// Retry-After are in the entry, and become the floor for the next fetch.
    fn after_failure_recorded(&mut self, vm: usize, key: &str, actions: &[Action], retry: Option<RetryFloor>) {
        let failed = actions.iter().any(|a| matches!(a, Action::Count { metric: Metric::FetchFailed(_), .. }));
        let written =
            actions.iter().any(|a| matches!(a, Action::Log { message, .. } if message.contains("next attempt in")));
        if !failed || !written {
            return;
        }
        let now = self.now;
        let entry = read_entry(&self.store, key);
        let least = now + (self.params.base_ms / 2).min(LAST_CHANCE_MIN_MS);
        let told = match retry {
            Some(RetryFloor::AfterMs(ms)) => now + ms,
            Some(RetryFloor::At(at)) => at,
            None => 0,
        };
        if entry.retry_at_ms < least.max(told) {
            self.violate(format!(
                "invariant 4: vm{vm} recorded a failure with retry at t=+{}, below the floor t=+{}",
                entry.retry_at_ms.saturating_sub(START_MS),
                least.max(told) - START_MS
            ));
        }
        self.note(|| format!("      backoff floor now t=+{}", least.max(told) - START_MS));
        let floor = self.floors.entry(key.to_string()).or_insert(0);
        *floor = (*floor).max(least.max(told));
    }
}
