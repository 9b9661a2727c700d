//! oauth2-cc: an Envoy proxy-wasm filter that gets OAuth 2.0 client-credentials tokens (RFC 6749
//! §4.4) for upstream calls, caches them per Envoy process, refreshes them before they expire and
//! injects them on the routes that need them.
//!
//! One core, two hosts: `core` decides and never touches the proxy; `host` carries its decisions
//! out through proxy-wasm (built for `wasm32`, `build/oauth2_cc.wasm`) and `native` through
//! Envoy's dynamic-module ABI (built for every other target, `build/liboauth2_cc.so`). Native unit
//! tests (`cargo test`) build the core with the native host.

pub mod core;

#[cfg(target_arch = "wasm32")]
mod host;

#[cfg(not(target_arch = "wasm32"))]
mod native;
