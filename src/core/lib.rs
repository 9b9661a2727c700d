//! The pure core of oauth2-cc: everything that decides, none of it does I/O.
//!
//! This crate depends on no host and holds no `unsafe`: functions take values (the time, bytes,
//! headers) and return plans (a token request to send, what to do with a request, a parsed token,
//! an error). The hosts (`oauth2-cc-wasm` through proxy-wasm, `oauth2-cc-native` through Envoy's
//! dynamic-module ABI) carry those plans out. This keeps the logic testable natively with
//! `cargo test`, under wasm with `make unit-wasm`, and fuzzable, and keeps the host glue thin.

#![forbid(unsafe_code)]

pub mod assertion;
pub mod cache;
pub mod config;
pub mod discovery;
pub mod entry;
pub mod exchange;
pub mod metrics;
pub mod request;
pub mod route;
pub mod secret;
pub mod token_request;
pub mod token_response;
pub mod url;

pub mod lifecycle;
pub mod retry_after;
pub mod token_expiry;
pub mod wake_registry;
