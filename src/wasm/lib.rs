//! The proxy-wasm host: carries out what `core` decides, and nothing else decides here.
//!
//! `adapter` is the only module that calls into Envoy (no panics, bytes in and out); `root` and
//! `http` are the SDK's contexts, which hand events to the VM's lifecycle driver
//! (`core::lifecycle`); `vm` carries out the driver's actions; `queue` owns the messages between
//! VMs (wakes, kicks) and the wake registry; `store` is shared data as the driver's store;
//! `metrics` maps the driver's counts to Envoy metrics.

mod adapter;
mod http;
mod metrics;
mod queue;
mod root;
mod store;
mod vm;

use proxy_wasm::traits::RootContext;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> { Box::new(root::FilterRoot::new(context_id)) });
}}

#[cfg(test)]
mod fake_envoy;
#[cfg(test)]
mod tests;
