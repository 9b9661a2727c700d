//! Every decision about a profile's cache entry (`core::entry`): whether a request gets the token,
//! waits or fails; whether a VM should fetch (the lease, the budget); when a token is refreshed
//! and stops being usable; what a success, a failure or a rejection does to the entry.
//!
//! One entry per profile holds the token, when to refresh it and when it stops being usable, the
//! fetch lease (which VM is fetching, until when), and the failure state (count, no retry before).
//! All VMs of the Envoy process read and write it with compare-and-swap; the functions here take an
//! entry and the time and return what to do or the entry to write.

use crate::config::{BackoffPolicy, LifetimePolicy};
use crate::token_response::{FailureClass, TokenGrant};

/// The window of the per-profile fetch budget.
pub(crate) const BUDGET_WINDOW_MS: u64 = 3_600_000;
/// How long a worker leaves a due background refresh to the main-thread VMs (capped at half the
/// time between refresh and expiry), so refreshes and their signing stay off the request threads.
pub(crate) const WORKER_REFRESH_GRACE_MS: u64 = 1_000;

pub(crate) use crate::entry::{Entry, EntryView};

/// What to do with a request that needs a token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestDecision<'a> {
    /// Inject this token now.
    Inject { token: &'a str, generation: u64 },
    /// No usable token yet, a fetch is or may be under way: pause the request.
    Wait,
    /// No usable token and the last fetch failed recently: reply with the failure now.
    Fail,
}

impl std::fmt::Debug for RequestDecision<'_> {
    /// The token is a credential: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestDecision::Inject { generation, .. } => write!(f, "Inject(generation {generation}, [redacted])"),
            RequestDecision::Wait => f.write_str("Wait"),
            RequestDecision::Fail => f.write_str("Fail"),
        }
    }
}

/// How long before the cached expiry a VM's copy of a token stops being valid.
///
/// The request path reads the copy without reading the clock (that is a host call per request),
/// so the copy carries its own end ([`vm_copy_valid_until`]) and the driver asks its host to wake
/// it then ([`crate::lifecycle::Driver::next_wake`]), when it drops the copy. What this margin
/// covers is how late that wake may come (a busy main thread or worker, timer slack): up to a
/// second, and the cached expiry already lies `refresh.skew_s` before the IdP's. In the last
/// second the request path reads shared data and the clock, as on any miss.
pub(crate) const VM_COPY_MARGIN_MS: u64 = 1_000;

/// Until when a VM may serve this entry's token from its own copy, without looking at the store
/// or the clock again (`None`: no token to copy).
pub(crate) fn vm_copy_valid_until(entry: &EntryView<'_>) -> Option<u64> {
    (!entry.token.is_empty()).then(|| entry.expires_at_ms.saturating_sub(VM_COPY_MARGIN_MS))
}

/// Whether a VM may keep a copy of this entry's token for its request path.
pub(crate) fn keep_vm_copy(entry: &EntryView<'_>, now_ms: u64) -> bool {
    vm_copy_valid_until(entry).is_some_and(|until| now_ms < until)
}

/// The request path's decision from the cached entry (`None`: nothing cached yet).
pub(crate) fn decide_request<'a>(entry: Option<&EntryView<'a>>, now_ms: u64) -> RequestDecision<'a> {
    match entry {
        Some(view) if !view.token.is_empty() && now_ms < view.expires_at_ms => {
            RequestDecision::Inject { token: view.token, generation: view.generation }
        }
        Some(view) if now_ms < view.retry_at_ms => RequestDecision::Fail,
        _ => RequestDecision::Wait,
    }
}

/// How one VM takes part in fetching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FetchRules {
    /// This VM's identity in leases (never 0).
    pub holder: u64,
    /// How long a lease lasts: longer than a token request may take.
    pub lease_ms: u64,
    /// A worker VM: it leaves background refreshes to the main thread for a short grace.
    pub defer_refresh: bool,
    /// Token requests allowed per hour, if limited.
    pub max_fetches_per_hour: Option<u32>,
}

/// The outcome of asking whether this VM should fetch now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Nothing to do: the token is fresh, a backoff runs, or another VM holds the lease.
    NotNeeded,
    /// Write this entry (it holds our lease), then send the token request.
    Claimed(Entry),
    /// A fetch is due but the hourly budget is spent: write this entry (no attempt before the
    /// window ends), log and count it once.
    BudgetExhausted(Entry),
}

/// Whether this VM should fetch a token now. A fetch is due when there is no usable token or its
/// refresh time has come; it is not started while a backoff runs or another VM holds a live lease.
pub(crate) fn claim_fetch(entry: &Entry, now_ms: u64, rules: &FetchRules) -> Claim {
    let usable = entry.has_usable_token(now_ms);
    let grace = if usable && rules.defer_refresh {
        WORKER_REFRESH_GRACE_MS.min(entry.expires_at_ms.saturating_sub(entry.refresh_at_ms) / 2)
    } else {
        0
    };
    let due = !usable || now_ms >= entry.refresh_at_ms.saturating_add(grace);
    let backing_off = now_ms < entry.retry_at_ms;
    let leased = entry.lease_holder != 0 && now_ms < entry.lease_until_ms;
    if !due || backing_off || leased {
        return Claim::NotNeeded;
    }
    let window_over = now_ms.saturating_sub(entry.budget_window_start_ms) >= BUDGET_WINDOW_MS;
    let (window_start, used) = if entry.budget_used == 0 || window_over {
        (now_ms, 0)
    } else {
        (entry.budget_window_start_ms, entry.budget_used)
    };
    if let Some(max) = rules.max_fetches_per_hour
        && used >= max
    {
        return Claim::BudgetExhausted(Entry {
            retry_at_ms: window_start.saturating_add(BUDGET_WINDOW_MS),
            budget_window_start_ms: window_start,
            budget_used: used,
            ..entry.clone()
        });
    }
    // A lease of holder 0 would read as no lease: two VMs would fetch.
    debug_assert_ne!(rules.holder, 0, "a lease needs a holder");
    Claim::Claimed(Entry {
        lease_holder: rules.holder,
        lease_until_ms: now_ms.saturating_add(rules.lease_ms),
        budget_window_start_ms: window_start,
        budget_used: used.saturating_add(1),
        ..entry.clone()
    })
}

/// The earliest time [`claim_fetch`] may claim this entry for a VM that follows `defer_refresh`:
/// when a fetch comes due (no token: at once; a token: its refresh time, after a worker's grace,
/// or its expiry), but not before a backoff or another VM's lease ends. A time at or before now
/// means a fetch is due now. The hourly budget is not looked at: when it refuses a claim, it moves
/// `retry_at_ms` to the end of its window.
pub(crate) fn next_claim_ms(entry: &EntryView<'_>, defer_refresh: bool) -> u64 {
    let due_at = if entry.token.is_empty() {
        0
    } else {
        let grace = if defer_refresh {
            WORKER_REFRESH_GRACE_MS.min(entry.expires_at_ms.saturating_sub(entry.refresh_at_ms) / 2)
        } else {
            0
        };
        entry.refresh_at_ms.saturating_add(grace).min(entry.expires_at_ms)
    };
    let leased_until = if entry.lease_holder != 0 { entry.lease_until_ms } else { 0 };
    due_at.max(entry.retry_at_ms).max(leased_until)
}

/// The least margin taken off a lifetime, where it leaves a usable token: IdPs that stamp `exp` in
/// whole seconds issue tokens that die up to a second before `expires_in` says.
pub(crate) const MIN_MARGIN_MS: u64 = 1_000;

/// The safety margin taken off a lifetime: `skew_s`, shrunk to a tenth of the lifetime so
/// short-lived tokens stay usable, but never under [`MIN_MARGIN_MS`] unless that would leave nothing.
pub(crate) fn expiry_margin_ms(lifetime_ms: u64, policy: &LifetimePolicy) -> u64 {
    let margin = policy.skew_s.saturating_mul(1000).min(lifetime_ms / 10);
    if lifetime_ms > MIN_MARGIN_MS { margin.max(MIN_MARGIN_MS) } else { margin }
}

/// Refresh and expiry times for a token whose request was sent at `sent_at_ms`.
///
/// Counted from when the request was sent, not when the answer came: the IdP stamps `exp` from its
/// own clock. When the token carries its own `exp` (`jws_expiry_ms`), the token is usable until the
/// earlier of the two, each less its margin. A background refresh starts at `ahead_ratio` of the
/// lifetime, but no later than [`MIN_MARGIN_MS`] (or the share `ahead_ratio` leaves of a short
/// usable life) before the token stops being usable, so a short-lived token, whose margin is a
/// large part of its life, is still refreshed before requests would have to wait. An IdP's
/// `refresh_in` (seconds), when sent, replaces the `ahead_ratio` rule.
pub(crate) fn token_times(
    sent_at_ms: u64,
    lifetime_s: u64,
    refresh_in_s: Option<u64>,
    jws_expiry_ms: Option<u64>,
    policy: &LifetimePolicy,
) -> (u64, u64) {
    let lifetime_ms = lifetime_s.saturating_mul(1000);
    let mut expires_at = sent_at_ms.saturating_add(lifetime_ms - expiry_margin_ms(lifetime_ms, policy));
    if let Some(exp_ms) = jws_expiry_ms {
        let claimed_ms = exp_ms.saturating_sub(sent_at_ms);
        expires_at = expires_at.min(exp_ms.saturating_sub(expiry_margin_ms(claimed_ms, policy)));
    }
    let refresh_at = match refresh_in_s {
        Some(seconds) => sent_at_ms.saturating_add(seconds.saturating_mul(1000)),
        None => {
            let usable_ms = expires_at.saturating_sub(sent_at_ms);
            let lead_ms = MIN_MARGIN_MS.min((usable_ms as f64 * (1.0 - policy.ahead_ratio)).round() as u64);
            let by_ratio = sent_at_ms.saturating_add((lifetime_ms as f64 * policy.ahead_ratio).round() as u64);
            by_ratio.min(expires_at.saturating_sub(lead_ms))
        }
    };
    let refresh_at = refresh_at.min(expires_at);
    (refresh_at, expires_at)
}

/// The entry after a successful fetch by `holder`.
pub(crate) fn after_success(
    entry: &Entry,
    holder: u64,
    grant: &TokenGrant,
    sent_at_ms: u64,
    policy: &LifetimePolicy,
) -> Entry {
    let mut next = entry.clone();
    if entry.lease_holder == holder {
        next.lease_holder = 0;
        next.lease_until_ms = 0;
    }
    if !entry.token.is_empty() && entry.token_sent_at_ms > sent_at_ms {
        // A newer token landed meanwhile (this fetch's lease had been taken over): keep it.
        return next;
    }
    let lifetime_s = grant.expires_in_s.unwrap_or(policy.default_ttl_s);
    let jws_expiry_ms = crate::token_expiry::jws_expiry_ms(&grant.access_token);
    let (refresh_at_ms, expires_at_ms) = token_times(sent_at_ms, lifetime_s, grant.refresh_in_s, jws_expiry_ms, policy);
    debug_assert!(refresh_at_ms <= expires_at_ms, "a refresh after the token's usable end");
    debug_assert!(next.lease_holder != holder || holder == 0, "the fetch's own lease outlives it");
    Entry {
        generation: entry.generation.wrapping_add(1),
        token_sent_at_ms: sent_at_ms,
        refresh_at_ms,
        expires_at_ms,
        failures: 0,
        retry_at_ms: 0,
        failing_while_usable: false,
        token: grant.access_token.clone(),
        ..next
    }
}

/// The entry after a failed fetch by `holder`: the token (if any, still valid or not) is kept,
/// the next attempt is pushed back. `jitter` is a random number in [0, 1).
pub(crate) fn after_failure(
    entry: &Entry,
    holder: u64,
    class: FailureClass,
    now_ms: u64,
    retry_after_ms: Option<u64>,
    policy: &BackoffPolicy,
    jitter: f64,
) -> Entry {
    let usable = entry.has_usable_token(now_ms);
    // Retries squeezed in before a token ran out do not count against the backoff once it has:
    // the first failure without a usable token starts again from base_ms, so a short IdP outage
    // across an expiry costs requests about as long as the outage, not an 8 s backoff after it.
    let counted = if !usable && entry.failing_while_usable { 0 } else { entry.failures };
    let failures = counted.saturating_add(1);
    let mut delay = backoff_delay_ms(failures, class, policy, jitter);
    if usable {
        // A refresh failed while the token still works: the backoff must not outlast the token,
        // so the next attempt comes at the latest halfway to expiry (never sooner than
        // LAST_CHANCE_MIN_MS): a few more tries before requests would go without a token.
        let halfway = entry.expires_at_ms.saturating_sub(now_ms) / 2;
        delay = delay.min(halfway.max(LAST_CHANCE_MIN_MS));
    }
    // The IdP's Retry-After is a hard floor.
    let delay = delay.max(retry_after_ms.unwrap_or(0));
    let mut next = entry.clone();
    if entry.lease_holder == holder {
        next.lease_holder = 0;
        next.lease_until_ms = 0;
    }
    debug_assert!(next.lease_holder != holder || holder == 0, "the fetch's own lease outlives it");
    Entry {
        failures,
        // Never earlier than a floor already set: answers can land out of order (a fetch whose
        // lease was taken over answers late), and a late 5xx must not cut short the Retry-After
        // a newer answer set (simulation seed 6883480825853751810).
        retry_at_ms: now_ms.saturating_add(delay).max(entry.retry_at_ms),
        failing_while_usable: usable,
        ..next
    }
}

/// The shortest spacing of retries while a still-valid token runs out.
pub(crate) const LAST_CHANCE_MIN_MS: u64 = 250;

/// Exponential backoff with jitter: the ceiling doubles per failure from `base_ms` up to `max_ms`,
/// and the delay is drawn from the upper half of it ("equal jitter"), so retries spread out yet the
/// IdP is never called again sooner than half the ceiling. A configuration fault (the IdP rejects
/// the client) goes straight to the longest ceiling: retrying soon cannot fix it.
pub(crate) fn backoff_delay_ms(failures: u32, class: FailureClass, policy: &BackoffPolicy, jitter: f64) -> u64 {
    let ceiling = match class {
        FailureClass::ConfigurationFault => policy.max_ms,
        FailureClass::Transient => {
            let exponent = failures.saturating_sub(1).min(32);
            policy.base_ms.saturating_mul(1u64 << exponent).min(policy.max_ms)
        }
    };
    let jitter = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.0 };
    ceiling / 2 + ((ceiling - ceiling / 2) as f64 * jitter) as u64
}

/// The entry with the token dropped, if `generation` is still the cached token (an upstream
/// rejected it); `None` when there is nothing to drop.
pub(crate) fn purge(entry: &Entry, generation: u64) -> Option<Entry> {
    if entry.token.is_empty() || entry.generation != generation {
        return None;
    }
    // The generation stays: a second purge of the same token finds no token and writes nothing.
    Some(Entry { token: String::new(), refresh_at_ms: 0, expires_at_ms: 0, ..entry.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: LifetimePolicy = LifetimePolicy { ahead_ratio: 0.8, default_ttl_s: 300, skew_s: 5 };
    const BACKOFF: BackoffPolicy = BackoffPolicy { base_ms: 1_000, max_ms: 60_000 };

    fn grant(token: &str, expires_in_s: Option<u64>) -> TokenGrant {
        TokenGrant { access_token: token.into(), expires_in_s, refresh_in_s: None }
    }

    /// The entry to write when `holder` (a main-thread VM, no budget) claims a fetch.
    fn claim(entry: &Entry, now: u64, holder: u64) -> Option<Entry> {
        let rules = FetchRules { holder, lease_ms: 6_000, defer_refresh: false, max_fetches_per_hour: None };
        match claim_fetch(entry, now, &rules) {
            Claim::Claimed(next) => Some(next),
            _ => None,
        }
    }

    fn with_token(now: u64) -> Entry {
        after_success(&Entry::default(), 7, &grant("tok", Some(100)), now, &POLICY)
    }

    #[test]
    fn vm_copy_is_kept_only_with_more_than_the_margin_left() {
        let entry = with_token(1_000);
        let bytes = entry.encode();
        let Some(view) = EntryView::decode(&bytes) else { panic!("entry does not decode") };
        let last_ms = entry.expires_at_ms - VM_COPY_MARGIN_MS;
        assert_eq!(vm_copy_valid_until(&view), Some(last_ms));
        assert!(keep_vm_copy(&view, 1_000));
        assert!(keep_vm_copy(&view, last_ms - 1));
        assert!(!keep_vm_copy(&view, last_ms));
        assert!(!keep_vm_copy(&view, entry.expires_at_ms + 5));
        let purged = purge(&entry, entry.generation).map(|e| e.encode()).unwrap_or_default();
        let Some(view) = EntryView::decode(&purged) else { panic!("purged entry does not decode") };
        assert!(!keep_vm_copy(&view, 1_000), "a purged entry has no token to copy");
    }

    #[test]
    fn next_claim_is_the_first_moment_claim_fetch_claims() {
        let fresh = with_token(0); // refresh at 80 s, expiry at 95 s
        let failed = after_failure(&fresh, 7, FailureClass::Transient, 80_000, Some(3_000), &BACKOFF, 0.0);
        let leased = claim(&Entry::default(), 1_000, 8).expect("due");
        let expired_in_backoff = after_failure(&fresh, 7, FailureClass::Transient, 94_000, Some(9_000), &BACKOFF, 0.0);
        let purged = purge(&fresh, fresh.generation).expect("purged");
        let cases = [
            ("empty", Entry::default(), 0),
            ("fresh", fresh.clone(), 80_000),
            ("backing off while usable", failed, 83_000),
            ("another VM's lease", leased, 7_000),
            ("backoff past expiry", expired_in_backoff, 103_000),
            ("purged", purged, 0),
        ];
        for defer_refresh in [false, true] {
            let rules = FetchRules { holder: 9, lease_ms: 6_000, defer_refresh, max_fetches_per_hour: None };
            for (name, entry, main_at) in &cases {
                let at = next_claim_ms(&entry.view(), defer_refresh);
                if !defer_refresh {
                    assert_eq!(at, *main_at, "{name}");
                }
                assert!(matches!(claim_fetch(entry, at, &rules), Claim::Claimed(_)), "{name}: claims at {at}");
                if at > 0 {
                    assert_eq!(claim_fetch(entry, at - 1, &rules), Claim::NotNeeded, "{name}: not before {at}");
                }
            }
        }
        let worker_at = next_claim_ms(&fresh.view(), true);
        assert_eq!(worker_at, 81_000, "a worker after its grace");
    }

    #[test]
    fn token_times_count_from_send_and_keep_a_whole_second_margin() {
        // 100 s token: margin 5 s (skew), refresh at 0.8 of the lifetime.
        assert_eq!(token_times(1_000, 100, None, None, &POLICY), (81_000, 96_000));
        // 10 s token: margin 1 s; refresh at 8 s, a second before the usable end.
        assert_eq!(token_times(0, 10, None, None, &POLICY), (8_000, 9_000));
        // 3 s token: a tenth would be 0.3 s, but whole-second `exp` stamps need 1 s.
        assert_eq!(token_times(0, 3, None, None, &POLICY), (1_600, 2_000));
        // 1 s token: a 1 s margin would leave nothing, so a tenth it is.
        assert_eq!(token_times(0, 1, None, None, &POLICY), (720, 900));
        // 2 s token: usable 1 s; refresh 0.2 s before its end.
        assert_eq!(token_times(0, 2, None, None, &POLICY), (800, 1_000));
        // ahead_ratio 1: refresh no later than expiry.
        let late = LifetimePolicy { ahead_ratio: 1.0, ..POLICY };
        assert_eq!(token_times(0, 100, None, None, &late), (95_000, 95_000));
        // refresh_in from the IdP wins over ahead_ratio, never past expiry.
        assert_eq!(token_times(0, 100, Some(30), None, &POLICY), (30_000, 95_000));
        assert_eq!(token_times(0, 100, Some(300), None, &POLICY), (95_000, 95_000));
        // A JWS `exp` earlier than expires_in says (whole-second stamp): the earlier one counts,
        // less its own margin.
        assert_eq!(token_times(10_500, 4, None, Some(14_000), &POLICY), (12_500, 13_000));
        // A JWS `exp` later than expires_in: expires_in counts.
        assert_eq!(token_times(0, 4, None, Some(60_000), &POLICY), (2_400, 3_000));
        // A JWS `exp` already past: not usable at all.
        assert_eq!(token_times(10_000, 4, None, Some(9_000), &POLICY), (9_000, 9_000));
    }

    #[test]
    fn request_decisions() {
        let fresh = with_token(0).encode();
        let view = EntryView::decode(&fresh);
        assert_eq!(decide_request(view.as_ref(), 50_000), RequestDecision::Inject { token: "tok", generation: 1 });
        assert_eq!(decide_request(view.as_ref(), 95_000), RequestDecision::Wait, "expired: never injected");
        assert_eq!(decide_request(None, 0), RequestDecision::Wait);
        let failed = after_failure(&Entry::default(), 1, FailureClass::Transient, 1_000, None, &BACKOFF, 0.0).encode();
        let view = EntryView::decode(&failed);
        assert_eq!(decide_request(view.as_ref(), 1_200), RequestDecision::Fail);
        assert_eq!(decide_request(view.as_ref(), 1_500), RequestDecision::Wait, "backoff over: try again");
    }

    #[test]
    fn single_flight_lease() {
        let empty = Entry::default();
        let claimed = claim(&empty, 1_000, 7).expect("due");
        assert_eq!((claimed.lease_holder, claimed.lease_until_ms), (7, 7_000));
        assert_eq!(claim(&claimed, 2_000, 8), None, "someone else holds the lease");
        assert_eq!(claim(&claimed, 7_000, 8).map(|e| e.lease_holder), Some(8), "a stuck lease is taken over");
        let fresh = with_token(0);
        assert_eq!(claim(&fresh, 50_000, 7), None, "not due");
        assert!(claim(&fresh, 80_000, 7).is_some(), "refresh due");
        let backing_off = after_failure(&fresh, 7, FailureClass::Transient, 80_000, Some(10_000), &BACKOFF, 0.0);
        assert_eq!(claim(&backing_off, 85_000, 7), None, "Retry-After honoured");
        assert!(claim(&backing_off, 90_000, 7).is_some());
    }

    #[test]
    fn workers_leave_refreshes_to_the_main_thread_for_a_grace() {
        let fresh = with_token(0); // refresh at 80 s, expiry at 95 s
        let worker = FetchRules { holder: 9, lease_ms: 6_000, defer_refresh: true, max_fetches_per_hour: None };
        assert_eq!(claim_fetch(&fresh, 80_500, &worker), Claim::NotNeeded);
        assert!(matches!(claim_fetch(&fresh, 81_000, &worker), Claim::Claimed(_)));
        let empty = Entry::default();
        assert!(matches!(claim_fetch(&empty, 0, &worker), Claim::Claimed(_)), "no token: no grace");
    }

    #[test]
    fn refresh_failures_retry_before_the_token_runs_out() {
        let fresh = with_token(0); // usable until 95 s
        // The 6th failure would wait 16-32 s; with 10 s of token left, it waits 5 s.
        let failing = Entry { failures: 5, ..fresh.clone() };
        let next = after_failure(&failing, 7, FailureClass::Transient, 85_000, None, &BACKOFF, 0.0);
        assert_eq!(next.retry_at_ms, 90_000);
        let late = after_failure(&failing, 7, FailureClass::ConfigurationFault, 94_900, None, &BACKOFF, 0.0);
        assert_eq!(late.retry_at_ms, 94_900 + LAST_CHANCE_MIN_MS, "never a tight loop");
        let told = after_failure(&failing, 7, FailureClass::Transient, 85_000, Some(20_000), &BACKOFF, 0.0);
        assert_eq!(told.retry_at_ms, 105_000, "Retry-After is never shortened");
        let expired = after_failure(&failing, 7, FailureClass::Transient, 96_000, None, &BACKOFF, 0.0);
        assert_eq!(expired.retry_at_ms, 96_000 + 16_000, "no token to save: plain backoff");
        // Retries squeezed in before expiry, then the first failure after it: back to base_ms.
        let mut entry = fresh;
        for now in [80_000, 88_000, 92_000, 94_000] {
            entry = after_failure(&entry, 7, FailureClass::Transient, now, None, &BACKOFF, 0.0);
        }
        assert_eq!(entry.failures, 4);
        let after_expiry = after_failure(&entry, 7, FailureClass::Transient, 95_100, None, &BACKOFF, 0.0);
        assert_eq!((after_expiry.failures, after_expiry.retry_at_ms), (1, 95_600), "base backoff after expiry");
        let next = after_failure(&after_expiry, 7, FailureClass::Transient, 95_600, None, &BACKOFF, 0.0);
        assert_eq!((next.failures, next.retry_at_ms), (2, 96_600), "then it grows again");
    }

    #[test]
    fn a_late_failure_never_lowers_a_retry_after_floor() {
        // A newer fetch got 429 with Retry-After 29 s; an older fetch's 429 (3 s) lands after it.
        let told = after_failure(&Entry::default(), 7, FailureClass::Transient, 4_000, Some(29_000), &BACKOFF, 0.0);
        let late = after_failure(&told, 8, FailureClass::Transient, 5_000, Some(3_000), &BACKOFF, 0.0);
        assert_eq!(late.retry_at_ms, 33_000, "the 29 s floor stands: {late:?}");
    }

    #[test]
    fn hourly_budget() {
        let rules = FetchRules { holder: 7, lease_ms: 1_000, defer_refresh: false, max_fetches_per_hour: Some(2) };
        let mut entry = Entry::default();
        let mut now = 10_000;
        for _ in 0..2 {
            let Claim::Claimed(next) = claim_fetch(&entry, now, &rules) else { panic!("within budget") };
            entry = after_failure(&next, 7, FailureClass::Transient, now, None, &BACKOFF, 0.0);
            now = entry.retry_at_ms;
        }
        let Claim::BudgetExhausted(refused) = claim_fetch(&entry, now, &rules) else { panic!("budget spent") };
        assert_eq!(refused.retry_at_ms, 10_000 + BUDGET_WINDOW_MS);
        let view_bytes = refused.encode();
        let view = EntryView::decode(&view_bytes);
        assert_eq!(decide_request(view.as_ref(), now), RequestDecision::Fail, "fail fast while the budget is spent");
        assert_eq!(claim_fetch(&refused, now + 1, &rules), Claim::NotNeeded, "refused once, then quiet");
        assert!(matches!(claim_fetch(&refused, 10_000 + BUDGET_WINDOW_MS, &rules), Claim::Claimed(_)), "new window");
    }

    #[test]
    fn success_and_failure_transitions() {
        let claimed = claim(&Entry::default(), 0, 7).expect("due");
        let stored = after_success(&claimed, 7, &grant("t1", None), 0, &POLICY);
        assert_eq!((stored.generation, stored.lease_holder, stored.token.as_str()), (1, 0, "t1"));
        assert_eq!(stored.expires_at_ms, 295_000, "default TTL used");
        let failed = after_failure(&stored, 7, FailureClass::Transient, 240_000, None, &BACKOFF, 0.5);
        assert_eq!(failed.token, "t1", "a still-valid token is kept through failures");
        assert_eq!((failed.failures, failed.retry_at_ms), (1, 240_750));
        let newer = after_success(&stored, 7, &grant("t2", Some(100)), 10_000, &POLICY);
        let stale = after_success(&newer, 9, &grant("t-old", Some(100)), 5_000, &POLICY);
        assert_eq!(stale.token, "t2", "an older fetch never replaces a newer token");
    }

    #[test]
    fn backoff_grows_caps_and_separates_configuration_faults() {
        let delays: Vec<u64> = (1..=8).map(|n| backoff_delay_ms(n, FailureClass::Transient, &BACKOFF, 0.0)).collect();
        assert_eq!(delays, vec![500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]);
        assert_eq!(backoff_delay_ms(1, FailureClass::Transient, &BACKOFF, 0.999_999), 999);
        assert_eq!(backoff_delay_ms(1, FailureClass::ConfigurationFault, &BACKOFF, 0.0), 30_000);
        assert_eq!(backoff_delay_ms(u32::MAX, FailureClass::Transient, &BACKOFF, f64::NAN), 30_000);
    }

    #[test]
    fn purge_only_the_token_that_was_rejected() {
        let fresh = with_token(0);
        let purged = purge(&fresh, fresh.generation).expect("purged");
        assert!(purged.token.is_empty());
        assert!(claim(&purged, 1_000, 7).is_some());
        assert_eq!(purge(&fresh, fresh.generation + 1), None, "a newer token is kept");
        assert_eq!(purge(&purged, fresh.generation), None);
    }
}
