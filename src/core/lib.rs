//! The pure core of oauth2-cc: everything that decides, none of it does I/O.
//!
//! This crate depends on no host and holds no `unsafe`: functions take values (the time, bytes,
//! headers) and return plans (a token request to send, what to do with a request, a parsed token,
//! an error). The hosts (`oauth2-cc-wasm` through proxy-wasm, `oauth2-cc-native` through Envoy's
//! dynamic-module ABI) carry those plans out. This keeps the logic testable natively with
//! `cargo test`, under wasm with `make unit-wasm`, and fuzzable, and keeps the host glue thin.

#![forbid(unsafe_code)]
// An item only the crate uses is `pub(crate)`, so the dead-code lint sees it. Checked with
// `test-support` on (every `--all-targets` build), which makes its re-exports reachable.
#![cfg_attr(feature = "test-support", warn(unreachable_pub))]

pub mod config;
pub mod lifecycle;
pub mod metrics;
pub mod request;
pub mod wake_registry;

mod assertion;
mod cache;
mod discovery;
mod entry;
mod retry_after;
mod route;
mod secret;
mod token_expiry;
mod token_request;
mod token_response;
mod url;

#[cfg(feature = "test-support")]
pub mod test_support;

#[cfg(test)]
mod capacity_rule;
