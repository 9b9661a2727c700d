//! The filter's metrics through proxy-wasm (Envoy `/stats`, `/stats/prometheus`): names and ids
//! come from [`oauth2_cc_core::metrics`], shared with the dynamic module.
//!
//! Injections are counted in the VM first and added to Envoy's counter on the root context's
//! tick, so the hit path makes no metric host call.

use std::cell::Cell;

use proxy_wasm::types::MetricType;

use crate::adapter;
use oauth2_cc_core::config::Config;
use oauth2_cc_core::lifecycle::Metric;
use oauth2_cc_core::metrics::MetricIds;

struct ProfileMetrics {
    ids: MetricIds<u32>,
    /// Injections counted in this VM and not yet added to the counter.
    pending_injected: Cell<u64>,
}

/// The metrics of every profile, for one VM.
pub struct Metrics {
    profiles: Vec<ProfileMetrics>,
}

impl Metrics {
    // Out of line: one caller must not absorb it into a large wasm function (docs/memory.md, "Function shape").
    #[inline(never)]
    pub fn define(config: &Config) -> Metrics {
        let profiles = config
            .profiles
            .iter()
            .map(|profile| ProfileMetrics {
                ids: MetricIds::define_profile(
                    profile,
                    |name| adapter::define_metric(MetricType::Counter, name),
                    |name| adapter::define_metric(MetricType::Gauge, name),
                ),
                pending_injected: Cell::new(0),
            })
            .collect();
        Metrics { profiles }
    }

    pub fn count(&self, profile: usize, metric: &Metric) {
        let Some(p) = self.profiles.get(profile) else { return };
        if *metric == Metric::Injected {
            p.pending_injected.set(p.pending_injected.get().wrapping_add(1));
        } else if let Some(id) = p.ids.counter(metric) {
            adapter::increment_metric(id, 1);
        }
    }

    pub fn gauges(&self, profile: usize, remaining_s: u64, lifetime_s: u64) {
        let Some(p) = self.profiles.get(profile) else { return };
        for (id, value) in [(p.ids.token_remaining_s(), remaining_s), (p.ids.token_lifetime_s(), lifetime_s)] {
            if let Some(id) = id {
                adapter::record_metric(id, value);
            }
        }
    }

    /// Adds the locally counted injections to Envoy's counters.
    pub fn flush(&self) {
        for p in &self.profiles {
            let n = p.pending_injected.replace(0);
            if let (Some(id), true) = (p.ids.counter(&Metric::Injected), n > 0) {
                adapter::increment_metric(id, n);
            }
        }
    }
}
