//! The lifecycle's shared store and randomness in proxy-wasm: shared data (one map per `vm_id`,
//! compare-and-swap per key) and WASI randomness.

use proxy_wasm::types::Status;

use crate::adapter;
use oauth2_cc_core::lifecycle::{Environment, Written};

/// Shared data as the lifecycle driver sees it.
pub struct SharedData;

impl Environment for SharedData {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        adapter::shared_get(key)
    }

    fn set(&mut self, key: &str, value: &[u8], expected: Option<u32>) -> Written {
        match adapter::shared_set(key, value, expected.unwrap_or(0)) {
            Ok(()) => Written::Ok,
            Err(Status::CasMismatch) => Written::CasMismatch,
            Err(_) => Written::Failed,
        }
    }

    fn random_u64(&mut self) -> u64 {
        adapter::random_u64()
    }
}
