//! The host layer: the only code that calls proxy-wasm.
//!
//! It carries out what `core` decides: it reads and writes the shared cache entry, sends token
//! requests from a root context, writes the header, pauses and resumes requests, and logs. Every
//! host call goes through `proxy_wasm::hostcalls`, which returns errors instead of panicking (a
//! panic would kill the VM and every request on its worker).

mod abi;
mod clock;
mod fetch;
mod http;
mod metrics;
mod root;
mod shared;
mod vm;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> { Box::new(root::FilterRoot::new(context_id)) });
}}
