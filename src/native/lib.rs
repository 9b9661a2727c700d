//! The native host: oauth2-cc as an Envoy dynamic module (`liboauth2_cc.so`, Envoy 1.40, ABI
//! `v0.2.0`), a second executor of the same core as the proxy-wasm host (`src/wasm`).
//!
//! It owns only the doing: Envoy's ABI (`abi`, our own declarations), the event hooks Envoy calls
//! (`hooks`), the filter configuration and the thread that drives its tick (`plugin`), each
//! request (`stream`), the process-wide token store (`store`), metrics and logs. Every decision —
//! when to fetch, whom to resume or fail, what to purge — is `core::lifecycle::Driver`'s.
//!
//! One driver per filter configuration, behind a lock, rather than one per worker as proxy-wasm
//! forces on the wasm build: a dynamic module's memory is shared by every thread of the process,
//! so there is nothing to gain from several drivers (and one holder, one set of waiters, one fetch
//! per profile). What made the wasm build cheap stays: the request path never takes the lock on a
//! hit — each worker keeps a thread-local copy of the driver's token copies and re-reads them only
//! when an epoch counter says they changed. The driver runs on the main thread for ticks (one
//! process-wide thread posts one to each live configuration when its driver next needs it), wakes, kicks and
//! callout answers (callouts go out from the filter configuration, so they outlive any request); on a worker only for a request
//! that found no token copy and for a response to purge on. A paused request is resumed or failed
//! on its own worker: the main thread leaves the outcome in the request's mailbox and posts an
//! event through the request's own scheduler.

mod abi;
mod env;
mod hooks;
mod metrics;
mod parked;
mod plugin;
mod secret_files;
mod store;
mod stream;
mod sync;
mod ticker;

#[cfg(test)]
#[cfg(feature = "model-check")]
mod model_check;
#[cfg(test)]
#[cfg(not(feature = "model-check"))]
mod tests;
