//! Shared data and shared queues: the cache entries every VM of the process sees, and the wakes.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::core::cache::Entry;
use crate::core::wake_registry;

const WAKE_REGISTRY_KEY: &str = "oauth2_cc.v1.wake_queues";
/// How many times a compare-and-swap write is retried after losing to another VM.
const CAS_ATTEMPTS: usize = 8;

/// The raw entry bytes and their CAS.
pub fn read(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

/// Creates the key with an empty entry if it does not exist yet. CAS protects only existing keys,
/// so keys are created at configuration time, before anyone takes a lease on them.
pub fn ensure_entry(key: &str) {
    if let (None, _) = read(key) {
        let _ = hostcalls::set_shared_data(key, Some(&Entry::default().encode()), None);
    }
}

/// Applies `change` to the current entry with compare-and-swap, re-reading after a lost race.
/// `change` returns `None` when there is nothing to write. Returns the entry written, if any.
pub fn update(key: &str, mut change: impl FnMut(&Entry) -> Option<Entry>) -> Option<Entry> {
    for _ in 0..CAS_ATTEMPTS {
        let (bytes, cas) = read(key);
        let current = bytes.as_deref().and_then(Entry::decode).unwrap_or_default();
        let next = change(&current)?;
        match hostcalls::set_shared_data(key, Some(&next.encode()), cas) {
            Ok(()) => return Some(next),
            Err(Status::CasMismatch) => continue,
            Err(status) => {
                log::error!("oauth2-cc: writing the token cache failed: {status:?}");
                return None;
            }
        }
    }
    log::warn!("oauth2-cc: token cache stayed contended after {CAS_ATTEMPTS} attempts; giving up this update");
    None
}

/// Lists `queue_name` in the wake registry (and drops stale names).
pub fn register_wake_queue(queue_name: &str, now_ms: u64) {
    for _ in 0..CAS_ATTEMPTS {
        let (bytes, cas) = read(WAKE_REGISTRY_KEY);
        let next = wake_registry::refresh(bytes.as_deref().unwrap_or_default(), queue_name, now_ms);
        match hostcalls::set_shared_data(WAKE_REGISTRY_KEY, Some(&next), cas) {
            Err(Status::CasMismatch) => continue,
            _ => return,
        }
    }
}

/// Enqueues `message` on every registered wake queue (this VM's included).
pub fn broadcast(vm_id: &str, message: &[u8]) {
    let (bytes, _) = read(WAKE_REGISTRY_KEY);
    let Some(bytes) = bytes else { return };
    for name in wake_registry::names(&bytes) {
        if let Ok(Some(queue)) = hostcalls::resolve_shared_queue(vm_id, name) {
            let _ = hostcalls::enqueue_shared_queue(queue, Some(message));
        }
    }
}
