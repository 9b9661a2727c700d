//! The proxy-wasm host: carries out what `core` decides, and nothing else decides here.
//!
//! `adapter` is the only module that calls into Envoy (no panics, bytes in and out); `root` and
//! `http` are the SDK's contexts, which hand events to the VM's lifecycle driver
//! (`core::lifecycle`); `vm` carries out the driver's actions; `queue` owns the messages between
//! VMs (wakes, kicks) and the wake registry; `store` is shared data as the driver's store;
//! `metrics` maps the driver's counts to Envoy metrics.
//!
//! Tested natively (`cargo test -p oauth2-cc-wasm`): `fake_envoy` defines the proxy-wasm ABI
//! functions this crate and the SDK import as plain C symbols, recording every call and serving a
//! fake request, callout answer, shared data and queues; `tests` drives the SDK's exports
//! (`proxy_on_configure`, `proxy_on_request_headers`, ...) as Envoy would, so the glue between the
//! SDK, the core and the ABI is checked without a wasm runtime (the e2e suite checks it on Envoy).

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
mod exchange_tests;
#[cfg(test)]
mod fake_envoy;
#[cfg(test)]
mod tests;
