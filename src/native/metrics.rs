//! The filter's metrics, with the wasm build's names: `oauth2_cc.<profile>.<metric>` (README,
//! "Metrics"). Envoy decides the namespace in front: `wasmcustom.` for the wasm build,
//! `dynamicmodulescustom.` (the `DynamicModuleConfig.metrics_namespace` default) for this one; in
//! `/stats/prometheus` the wasm names lose their namespace (`oauth2_cc_<profile>_<metric>`) while
//! a dynamic module's keep it under Envoy's prefix
//! (`envoy_dynamicmodulescustom_oauth2_cc_<profile>_<metric>`).
//!
//! Every metric is defined while the configuration loads: Envoy refuses definitions later (its
//! stats are frozen once the server runs), so the `fetch_failed.<reason>` counters are defined
//! for every reason the core can report ([`FETCH_FAILED_REASONS`]).
//!
//! `injected`, bumped on the hit path, is counted in an atomic here and added to Envoy's counter on
//! the main thread's tick (as the wasm build does), so the hit path makes no metric call into
//! Envoy; every other counter goes to Envoy at once, through the stream on a request thread.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::core::config::Config;
use crate::core::lifecycle::Metric;
use crate::native::abi::{ConfigHandle, Stream};

/// Ids of one profile's metrics (`None`: Envoy refused the definition).
struct ProfileMetrics {
    prefix: String,
    fetch_ok: Option<usize>,
    injected: Option<usize>,
    waited: Option<usize>,
    failed_requests: Option<usize>,
    purged: Option<usize>,
    budget_refused: Option<usize>,
    token_remaining_s: Option<usize>,
    /// By reason: the known reasons at load, any other on first use (if Envoy still allows it).
    fetch_failed: Mutex<HashMap<String, Option<usize>>>,
    /// Injections counted on request threads, not yet added to Envoy's counter.
    pending_injected: AtomicU64,
}

/// Every `fetch_failed.<reason>` label: `TokenError::label` (RFC 6749 §5.2 codes kept by name,
/// the rest `other_error`) and the lifecycle's own (`discovery`, `no_cluster`).
pub const FETCH_FAILED_REASONS: &[&str] = &[
    "http_status",
    "bad_body",
    "missing_token",
    "unsafe_token",
    "bad_expires_in",
    "too_large",
    "no_response",
    "assertion_failed",
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "temporarily_unavailable",
    "server_error",
    "slow_down",
    "other_error",
    "discovery",
    "no_cluster",
];

pub struct Metrics {
    handle: ConfigHandle,
    profiles: Vec<ProfileMetrics>,
}

impl Metrics {
    /// Defines every profile's metrics (main thread, while the configuration loads).
    pub fn define(handle: ConfigHandle, config: &Config) -> Metrics {
        let profiles = config
            .profiles
            .iter()
            .map(|profile| {
                let prefix = format!("oauth2_cc.{}", profile.name);
                let counter = |name: &str| handle.define_counter(&format!("{prefix}.{name}"));
                ProfileMetrics {
                    fetch_ok: counter("fetch_ok"),
                    injected: counter("injected"),
                    waited: counter("waited"),
                    failed_requests: counter("failed_requests"),
                    purged: counter("purged"),
                    budget_refused: counter("budget_refused"),
                    token_remaining_s: handle.define_gauge(&format!("{prefix}.token_remaining_s")),
                    fetch_failed: Mutex::new(
                        FETCH_FAILED_REASONS
                            .iter()
                            .map(|reason| (reason.to_string(), counter(&format!("fetch_failed.{reason}"))))
                            .collect(),
                    ),
                    pending_injected: AtomicU64::new(0),
                    prefix,
                }
            })
            .collect();
        Metrics { handle, profiles }
    }

    /// Counts on a request thread: `injected` until the main thread's next [`Metrics::flush`],
    /// the others through the request's stream now (`None`: a stream that is going away).
    pub fn count_on_worker(&self, profile: usize, metric: &Metric, stream: Option<Stream>) {
        let Some(p) = self.profiles.get(profile) else { return };
        let id = match metric {
            Metric::Injected => {
                p.pending_injected.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Metric::Waited => p.waited,
            Metric::FailedRequest => p.failed_requests,
            Metric::Purged => p.purged,
            Metric::FetchOk => p.fetch_ok,
            Metric::BudgetRefused => p.budget_refused,
            Metric::FetchFailed(reason) => self.fetch_failed_id(p, reason),
        };
        if let (Some(id), Some(stream)) = (id, stream) {
            stream.increment_counter(id, 1);
        }
    }

    /// Counts on the main thread, straight into Envoy's counter.
    pub fn count_on_main(&self, profile: usize, metric: &Metric) {
        let Some(p) = self.profiles.get(profile) else { return };
        let id = match metric {
            Metric::FetchOk => p.fetch_ok,
            Metric::Injected => p.injected,
            Metric::Waited => p.waited,
            Metric::FailedRequest => p.failed_requests,
            Metric::Purged => p.purged,
            Metric::BudgetRefused => p.budget_refused,
            Metric::FetchFailed(reason) => self.fetch_failed_id(p, reason),
        };
        if let Some(id) = id {
            self.handle.increment_counter(id, 1);
        }
    }

    fn fetch_failed_id(&self, p: &ProfileMetrics, reason: &str) -> Option<usize> {
        let mut by_reason = p.fetch_failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Reasons are a closed set (see `Metric::FetchFailed`), so the names stay bounded.
        *by_reason
            .entry(reason.to_string())
            .or_insert_with(|| self.handle.define_counter(&format!("{}.fetch_failed.{reason}", p.prefix)))
    }

    pub fn gauge(&self, profile: usize, remaining_s: u64) {
        if let Some(id) = self.profiles.get(profile).and_then(|p| p.token_remaining_s) {
            self.handle.set_gauge(id, remaining_s);
        }
    }

    /// Adds the injections request threads counted to Envoy's counters (main thread).
    pub fn flush(&self) {
        for p in &self.profiles {
            let n = p.pending_injected.swap(0, Ordering::Relaxed);
            if let (Some(id), true) = (p.injected, n > 0) {
                self.handle.increment_counter(id, n);
            }
        }
    }
}
