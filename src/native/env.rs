//! The driver's window on the process: the shared store and randomness
//! (`core::lifecycle::Environment`), and the clock.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::{SetOutcome, Store};
use oauth2_cc_core::lifecycle::{Environment, Written};

/// The process store, as the driver sees it.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        Store::process().get(key)
    }

    fn set(&mut self, key: &str, value: &[u8], expected: Option<u32>) -> Written {
        match Store::process().set(key, value, expected) {
            SetOutcome::Ok => Written::Ok,
            SetOutcome::Mismatch => Written::CasMismatch,
        }
    }

    fn random_u64(&mut self) -> u64 {
        random_u64()
    }
}

/// A random number from the operating system; if that fails, the clock's nanoseconds (it only
/// has to tell lease holders apart and spread retries, never to be secret).
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0x5eed, |d| u64::from(d.subsec_nanos()) ^ d.as_secs())
}

/// Wall-clock milliseconds since the Unix epoch (what proxy-wasm's clock gives the wasm build).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
