//! The filter's metrics in the dynamic module: names and ids come from [`oauth2_cc_core::metrics`],
//! shared with the wasm build. Envoy decides the namespace in front: `dynamicmodulescustom.` (the
//! `DynamicModuleConfig.metrics_namespace` default) here, `wasmcustom.` for the wasm build; in
//! `/stats/prometheus` the wasm names lose their namespace (`oauth2_cc_<profile>_<metric>`) while
//! a dynamic module's keep it under Envoy's prefix
//! (`envoy_dynamicmodulescustom_oauth2_cc_<profile>_<metric>`).
//!
//! `injected`, bumped on the hit path, is counted in an atomic here and added to Envoy's counter on
//! the main thread's tick (as the wasm build does), so the hit path makes no metric call into
//! Envoy; every other counter goes to Envoy at once, through the stream on a request thread.
//! Envoy lets only the main thread set the configuration's gauges: a gauge a request thread's
//! driver event asks for waits here for the main thread too ([`OnMain`] proves where code runs).

use crate::abi::{ConfigHandle, OnMain, Stream};
use crate::sync::{AtomicU64, Mutex, Ordering, lock};
use oauth2_cc_core::config::Config;
use oauth2_cc_core::lifecycle::Metric;
use oauth2_cc_core::metrics::MetricIds;

struct ProfileMetrics {
    ids: MetricIds<usize>,
    /// Injections counted on request threads, not yet added to Envoy's counter.
    pending_injected: AtomicU64,
    /// The gauges (remaining, lifetime) a request thread was asked to set, for the main thread.
    pending_gauges: Mutex<Option<(u64, u64)>>,
}

pub struct Metrics {
    handle: ConfigHandle,
    profiles: Vec<ProfileMetrics>,
}

impl Metrics {
    /// Defines every profile's metrics (main thread, while the configuration loads: Envoy refuses
    /// definitions later).
    pub fn define(main: OnMain, handle: ConfigHandle, config: &Config) -> Metrics {
        let profiles = config
            .profiles
            .iter()
            .map(|profile| ProfileMetrics {
                ids: MetricIds::define_profile(
                    profile,
                    |name| handle.define_counter(main, name),
                    |name| handle.define_gauge(main, name),
                ),
                pending_injected: AtomicU64::new(0),
                pending_gauges: Mutex::new(None),
            })
            .collect();
        Metrics { handle, profiles }
    }

    /// Counts on a request thread: `injected` until the main thread's next [`Metrics::flush`],
    /// the others through the request's stream now (`None`: a stream that is going away).
    pub fn count_on_worker(&self, profile: usize, metric: &Metric, stream: Option<Stream>) {
        let Some(p) = self.profiles.get(profile) else { return };
        if *metric == Metric::Injected {
            p.pending_injected.fetch_add(1, Ordering::Relaxed);
        } else if let (Some(id), Some(stream)) = (p.ids.counter(metric), stream) {
            stream.increment_counter(id, 1);
        }
    }

    /// Counts on the main thread, straight into Envoy's counter.
    pub fn count_on_main(&self, main: OnMain, profile: usize, metric: &Metric) {
        if let Some(id) = self.profiles.get(profile).and_then(|p| p.ids.counter(metric)) {
            self.handle.increment_counter(main, id, 1);
        }
    }

    pub fn gauges_on_main(&self, main: OnMain, profile: usize, remaining_s: u64, lifetime_s: u64) {
        let Some(p) = self.profiles.get(profile) else { return };
        for (id, value) in [(p.ids.token_remaining_s(), remaining_s), (p.ids.token_lifetime_s(), lifetime_s)] {
            if let Some(id) = id {
                self.handle.set_gauge(main, id, value);
            }
        }
    }

    /// Keeps gauge values for the main thread's next [`Metrics::flush`] (the latest win).
    pub fn gauges_on_worker(&self, profile: usize, remaining_s: u64, lifetime_s: u64) {
        if let Some(p) = self.profiles.get(profile) {
            *lock(&p.pending_gauges) = Some((remaining_s, lifetime_s));
        }
    }

    /// Adds the injections request threads counted to Envoy's counters and sets the gauges they
    /// were asked for (main thread).
    pub fn flush(&self, main: OnMain) {
        for (index, p) in self.profiles.iter().enumerate() {
            let n = p.pending_injected.swap(0, Ordering::Relaxed);
            if let (Some(id), true) = (p.ids.counter(&Metric::Injected), n > 0) {
                self.handle.increment_counter(main, id, n);
            }
            let pending = lock(&p.pending_gauges).take();
            if let Some((remaining_s, lifetime_s)) = pending {
                self.gauges_on_main(main, index, remaining_s, lifetime_s);
            }
        }
    }
}
