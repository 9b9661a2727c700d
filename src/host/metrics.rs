//! The filter's metrics, per profile, through proxy-wasm metrics (Envoy `/stats`, `/stats/prometheus`).
//!
//! Names are `oauth2_cc.<profile>.<metric>`; `docs/metrics.md` lists them. Counters bumped on the
//! request path are counted in the VM first and added to Envoy's counters on the root context's
//! tick, so the hit path makes no metric host call.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::core::config::Config;

/// Metric ids of one profile (`None` when the host refused to define one).
struct ProfileMetrics {
    prefix: String,
    fetch_ok: Option<u32>,
    injected: Option<u32>,
    waited: Option<u32>,
    failed_requests: Option<u32>,
    purged: Option<u32>,
    budget_refused: Option<u32>,
    token_remaining_s: Option<u32>,
    fetch_failed: RefCell<HashMap<String, Option<u32>>>,
    /// Injections counted in this VM and not yet added to the counter.
    pending_injected: Cell<u64>,
}

/// The metrics of every profile, for one VM.
pub struct Metrics {
    profiles: Vec<ProfileMetrics>,
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name).ok()
}

fn add(id: Option<u32>, n: u64) {
    if let Some(id) = id
        && n > 0
    {
        let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
    }
}

impl Metrics {
    pub fn define(config: &Config) -> Metrics {
        let profiles = config
            .profiles
            .iter()
            .map(|profile| {
                let prefix = format!("oauth2_cc.{}", profile.name);
                let counter = |name: &str| define(MetricType::Counter, &format!("{prefix}.{name}"));
                ProfileMetrics {
                    fetch_ok: counter("fetch_ok"),
                    injected: counter("injected"),
                    waited: counter("waited"),
                    failed_requests: counter("failed_requests"),
                    purged: counter("purged"),
                    budget_refused: counter("budget_refused"),
                    token_remaining_s: define(MetricType::Gauge, &format!("{prefix}.token_remaining_s")),
                    fetch_failed: RefCell::new(HashMap::new()),
                    pending_injected: Cell::new(0),
                    prefix,
                }
            })
            .collect();
        Metrics { profiles }
    }

    /// A token was written on a request (counted locally; see [`Metrics::flush`]).
    pub fn injected(&self, profile: usize) {
        if let Some(p) = self.profiles.get(profile) {
            p.pending_injected.set(p.pending_injected.get().wrapping_add(1));
        }
    }

    pub fn waited(&self, profile: usize) {
        self.bump(profile, |p| p.waited);
    }

    pub fn failed_request(&self, profile: usize) {
        self.bump(profile, |p| p.failed_requests);
    }

    pub fn fetch_ok(&self, profile: usize) {
        self.bump(profile, |p| p.fetch_ok);
    }

    pub fn purged(&self, profile: usize) {
        self.bump(profile, |p| p.purged);
    }

    pub fn budget_refused(&self, profile: usize) {
        self.bump(profile, |p| p.budget_refused);
    }

    /// A failed token request, by reason (`http_status`, `no_response`, an RFC 6749 §5.2 code...).
    /// Reasons are a closed set (see `TokenError::label`), so the metric names stay bounded.
    pub fn fetch_failed(&self, profile: usize, reason: &str) {
        let Some(p) = self.profiles.get(profile) else { return };
        let Ok(mut by_reason) = p.fetch_failed.try_borrow_mut() else { return };
        let id = *by_reason
            .entry(reason.to_string())
            .or_insert_with(|| define(MetricType::Counter, &format!("{}.fetch_failed.{reason}", p.prefix)));
        add(id, 1);
    }

    pub fn token_remaining(&self, profile: usize, seconds: u64) {
        if let Some(id) = self.profiles.get(profile).and_then(|p| p.token_remaining_s) {
            let _ = hostcalls::record_metric(id, seconds);
        }
    }

    /// Adds the locally counted injections to Envoy's counters.
    pub fn flush(&self) {
        for p in &self.profiles {
            add(p.injected, p.pending_injected.replace(0));
        }
    }

    fn bump(&self, profile: usize, id: impl Fn(&ProfileMetrics) -> Option<u32>) {
        if let Some(p) = self.profiles.get(profile) {
            add(id(p), 1);
        }
    }
}
