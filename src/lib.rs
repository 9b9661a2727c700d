//! oauth2-cc: an Envoy proxy-wasm filter that gets OAuth 2.0 client-credentials tokens (RFC 6749
//! §4.4) for upstream calls, caches them per Envoy process, refreshes them before they expire and
//! injects them on the routes that need them.
//!
//! `core` decides and never touches the proxy; `host` carries the decisions out through proxy-wasm
//! and is compiled only for the wasm target.

pub mod core;

#[cfg(target_arch = "wasm32")]
mod host;
