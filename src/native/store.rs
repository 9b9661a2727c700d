//! The process-wide token store of the native build: what proxy-wasm shared data is to the wasm
//! build, in the module's own memory, which every worker of the Envoy process shares.
//!
//! Semantics are those of Envoy's shared data (and of `core::lifecycle::Environment`): every
//! successful write gives the key a new version from one process-wide counter; a write expecting
//! version `v != 0` of an existing key whose version is not `v` is refused as a mismatch; a write
//! to a missing key always succeeds. The store outlives filter configurations (a listener update
//! with the same profiles keeps its tokens), as shared data outlives a VM with the same `vm_id`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The outcome of [`Store::set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetOutcome {
    Ok,
    /// The key was written by someone else since it was read.
    Mismatch,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, (Vec<u8>, u32)>,
    next_version: u32,
}

/// Keys to bytes and versions, behind one lock (writes are rare: a fetch, a purge, a lease).
#[derive(Default)]
pub struct Store {
    inner: Mutex<Inner>,
}

impl Store {
    /// The store of this process.
    pub fn process() -> &'static Store {
        static STORE: OnceLock<Store> = OnceLock::new();
        STORE.get_or_init(Store::default)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic cannot happen while the lock is held (no code that panics runs under it), and
        // if one did, the map itself is still consistent: take it back rather than fail forever.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The key's bytes and version; `(None, None)` when it does not exist.
    pub fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.lock().entries.get(key) {
            Some((bytes, version)) => (Some(bytes.clone()), Some(*version)),
            None => (None, None),
        }
    }

    /// Writes the key if its version is still `expected` (see the module doc).
    pub fn set(&self, key: &str, value: &[u8], expected: Option<u32>) -> SetOutcome {
        let mut inner = self.lock();
        let current = inner.entries.get(key).map(|(_, version)| *version);
        if let (Some(current), Some(expected)) = (current, expected)
            && expected != 0
            && expected != current
        {
            return SetOutcome::Mismatch;
        }
        inner.next_version = inner.next_version.wrapping_add(1).max(1);
        let version = inner.next_version;
        inner.entries.insert(key.to_string(), (value.to_vec(), version));
        SetOutcome::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_guard_writes_like_shared_data() {
        let store = Store::default();
        assert_eq!(store.get("k"), (None, None));
        // A missing key is written whatever version is expected.
        assert_eq!(store.set("k", b"a", Some(u32::MAX)), SetOutcome::Ok);
        let (bytes, version) = store.get("k");
        assert_eq!(bytes.as_deref(), Some(&b"a"[..]));
        let version = version.unwrap();
        // A stale version is refused and changes nothing.
        assert_eq!(store.set("k", b"b", Some(version.wrapping_add(7))), SetOutcome::Mismatch);
        assert_eq!(store.get("k").0.as_deref(), Some(&b"a"[..]));
        // The current version, no version and version 0 write.
        assert_eq!(store.set("k", b"c", Some(version)), SetOutcome::Ok);
        assert_eq!(store.set("k", b"d", None), SetOutcome::Ok);
        assert_eq!(store.set("k", b"e", Some(0)), SetOutcome::Ok);
        let (bytes, last) = store.get("k");
        assert_eq!(bytes.as_deref(), Some(&b"e"[..]));
        assert_ne!(last, Some(version), "every write gives a new version");
    }

    #[test]
    fn concurrent_compare_and_swap_loses_no_increment() {
        use std::sync::Arc;
        let store = Arc::new(Store::default());
        let _ = store.set("n", &0u64.to_le_bytes(), None);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        loop {
                            let (bytes, version) = store.get("n");
                            let mut raw = [0u8; 8];
                            raw.copy_from_slice(&bytes.unwrap()[..8]);
                            let next = u64::from_le_bytes(raw) + 1;
                            if store.set("n", &next.to_le_bytes(), version) == SetOutcome::Ok {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&store.get("n").0.unwrap()[..8]);
        assert_eq!(u64::from_le_bytes(raw), 2000);
    }
}
