//! The pure core of oauth2-cc: everything that decides, none of it does I/O.
//!
//! This crate depends on no host and holds no `unsafe`: functions take values (the time, bytes,
//! headers) and return plans (a token request to send, what to do with a request, a parsed token,
//! an error). The hosts (`oauth2-cc-wasm` through proxy-wasm, `oauth2-cc-native` through Envoy's
//! dynamic-module ABI) carry those plans out. This keeps the logic testable natively with
//! `cargo test`, under wasm with `make unit-wasm`, and fuzzable, and keeps the host glue thin.
//!
//! The public API is what the hosts (`src/wasm`, `src/native`) and `oauth2-cc validate` use:
//!
//! - [`config`]: `parse`, `parse_with` (secrets from files too) and `load` turn the filter's JSON
//!   into a [`config::Config`] or a [`config::ConfigError`] naming the field; `rejected_message` and
//!   `configured_message` are the log lines; a `Profile`'s name, cache key and answer cap size the
//!   host's metrics and callouts.
//! - [`request`]: [`request::RequestPath`], one request's state machine, which the http context or
//!   stream executes step by step (`Step`, `Next`, `Delivered`), reading the request through the
//!   [`request::RequestFacts`] the host implements.
//! - [`lifecycle`]: the [`lifecycle::Driver`] (one per VM, or per filter configuration) takes events
//!   and the time and returns [`lifecycle::Action`]s to carry out, over the shared store the host
//!   implements as [`lifecycle::Environment`]; `lifecycle::store::update_bytes` is the CAS loop a
//!   host uses for its own keys.
//! - [`metrics`]: [`metrics::Metric`] and [`metrics::MetricIds`], the one table of metric names
//!   both hosts define.
//! - [`exchange`]: RFC 8693 token exchange: the request's [`exchange::Subject`], the refusals
//!   ([`exchange::Refusal`]) and the bounded per-worker copies of exchanged tokens
//!   ([`exchange::copies`]) a host keeps for its hit path.
//! - [`wake_registry`]: the list of VM wake queues the proxy-wasm host keeps in shared data.
//! - `test_support`, only with the `test-support` feature (the hosts' tests and `fuzz/`): the
//!   parsers the fuzzers feed, route selection, the secret a configuration read.
//!
//! Everything else is private to the crate, so the compiler refuses a host that reaches past this
//! list, and the dead-code lint finds what nothing uses (`unreachable_pub` keeps crate-only items
//! `pub(crate)`). A new item a host needs is made `pub` and added here.

#![forbid(unsafe_code)]
// An item only the crate uses is `pub(crate)`, so the dead-code lint sees it. Checked with
// `test-support` on (every `--all-targets` build), which makes its re-exports reachable.
#![cfg_attr(feature = "test-support", warn(unreachable_pub))]

pub mod config;
pub mod exchange;
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
