//! The filter's metrics, per profile, through proxy-wasm metrics (Envoy `/stats`, `/stats/prometheus`).
//!
//! Names are `oauth2_cc.<profile>.<metric>` (README, "Metrics"). Injections are counted in the VM
//! first and added to Envoy's counter on the root context's tick, so the hit path makes no metric
//! host call.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use proxy_wasm::types::MetricType;

use crate::core::config::Config;
use crate::core::lifecycle::Metric;
use crate::host::adapter;

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

impl Metrics {
    pub fn define(config: &Config) -> Metrics {
        let profiles = config
            .profiles
            .iter()
            .map(|profile| {
                let prefix = format!("oauth2_cc.{}", profile.name);
                let counter = |name: &str| adapter::define_metric(MetricType::Counter, &format!("{prefix}.{name}"));
                ProfileMetrics {
                    fetch_ok: counter("fetch_ok"),
                    injected: counter("injected"),
                    waited: counter("waited"),
                    failed_requests: counter("failed_requests"),
                    purged: counter("purged"),
                    budget_refused: counter("budget_refused"),
                    token_remaining_s: adapter::define_metric(
                        MetricType::Gauge,
                        &format!("{prefix}.token_remaining_s"),
                    ),
                    fetch_failed: RefCell::new(HashMap::new()),
                    pending_injected: Cell::new(0),
                    prefix,
                }
            })
            .collect();
        Metrics { profiles }
    }

    /// Counts one event. Failure reasons are a closed set (see `Metric::FetchFailed`), so the
    /// metric names stay bounded.
    pub fn count(&self, profile: usize, metric: &Metric) {
        let Some(p) = self.profiles.get(profile) else { return };
        let id = match metric {
            Metric::Injected => {
                p.pending_injected.set(p.pending_injected.get().wrapping_add(1));
                return;
            }
            Metric::FetchOk => p.fetch_ok,
            Metric::Waited => p.waited,
            Metric::FailedRequest => p.failed_requests,
            Metric::Purged => p.purged,
            Metric::BudgetRefused => p.budget_refused,
            Metric::FetchFailed(reason) => {
                let Ok(mut by_reason) = p.fetch_failed.try_borrow_mut() else { return };
                *by_reason.entry(reason.clone()).or_insert_with(|| {
                    adapter::define_metric(MetricType::Counter, &format!("{}.fetch_failed.{reason}", p.prefix))
                })
            }
        };
        if let Some(id) = id {
            adapter::increment_metric(id, 1);
        }
    }

    pub fn token_remaining(&self, profile: usize, seconds: u64) {
        if let Some(id) = self.profiles.get(profile).and_then(|p| p.token_remaining_s) {
            adapter::record_metric(id, seconds);
        }
    }

    /// Adds the locally counted injections to Envoy's counters.
    pub fn flush(&self) {
        for p in &self.profiles {
            let n = p.pending_injected.replace(0);
            if let (Some(id), true) = (p.injected, n > 0) {
                adapter::increment_metric(id, n);
            }
        }
    }
}
