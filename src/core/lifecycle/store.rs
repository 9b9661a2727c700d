//! The shared store the lifecycle reads and writes: proxy-wasm shared data in the wasm host,
//! process memory in the native host, a simulated map in tests. All three keep Envoy's
//! compare-and-swap semantics, which this module states once and builds on.

use crate::cache::Entry;

/// What a VM reads synchronously while it decides: the shared store and randomness.
///
/// Semantics (proxy-wasm-cpp-host `SharedData::set`): every successful write gives the key a new
/// version; a write with an expected version `Some(v)`, `v != 0`, to an existing key whose version
/// is not `v` fails with [`Written::CasMismatch`]; a write to a missing key always succeeds,
/// whatever version it expects.
pub trait Environment {
    /// The key's bytes and version; `(None, None)` when it does not exist.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes the key if its version is still `expected` (see the trait's semantics).
    fn set(&mut self, key: &str, value: &[u8], expected: Option<u32>) -> Written;
    /// A random 64-bit number (lease identities, jitter, assertion `jti`s).
    fn random_u64(&mut self) -> u64;
}

/// The outcome of a write to the shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Ok,
    /// Another VM wrote the key since it was read.
    CasMismatch,
    /// The store refused the write for another reason.
    Failed,
}

/// The expected version used to create a key: a missing key is written whatever is expected, and
/// an existing key (created by another VM since this one looked) refuses it, so a creation never
/// overwrites another VM's entry. Versions come from one process-wide counter that would have to
/// reach this value exactly for the guard to fail.
pub(crate) const CREATE_VERSION: u32 = u32::MAX;

/// How many times a compare-and-swap write is retried after losing to another VM.
pub(crate) const CAS_ATTEMPTS: usize = 8;

/// The outcome of `update_entry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// This entry was written.
    Written(Entry),
    /// The change had nothing to write.
    Unchanged,
    /// Every attempt lost to another VM's write: nothing was written.
    Contended,
    /// The store refused the write: nothing was written.
    Failed,
}

/// Applies `change` to the bytes at `key` (`None`: missing) with compare-and-swap, re-reading
/// after a lost race: the one CAS loop of the filter. `change` returns `None` when there is nothing
/// to write; it may be called once per attempt. Returns the bytes written.
pub fn update_bytes(
    env: &mut dyn Environment,
    key: &str,
    mut change: impl FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
) -> Result<Option<Vec<u8>>, Update> {
    for _ in 0..CAS_ATTEMPTS {
        let (bytes, version) = env.get(key);
        let Some(next) = change(bytes.as_deref()) else { return Ok(None) };
        // A missing key is created without overwriting one that appeared meanwhile.
        let expected = if bytes.is_none() { Some(CREATE_VERSION) } else { version };
        match env.set(key, &next, expected) {
            Written::Ok => return Ok(Some(next)),
            Written::CasMismatch => continue,
            Written::Failed => return Err(Update::Failed),
        }
    }
    Err(Update::Contended)
}

/// Applies `change` to the entry at `key` with compare-and-swap (see [`update_bytes`]).
pub(crate) fn update_entry(
    env: &mut dyn Environment,
    key: &str,
    mut change: impl FnMut(&Entry) -> Option<Entry>,
) -> Update {
    let mut written = None;
    let outcome = update_bytes(env, key, |bytes| {
        let current = bytes.and_then(Entry::decode).unwrap_or_default();
        let next = change(&current)?;
        let encoded = next.encode();
        written = Some(next);
        Some(encoded)
    });
    match (outcome, written) {
        (Ok(Some(_)), Some(entry)) => Update::Written(entry),
        (Ok(_), _) => Update::Unchanged,
        (Err(failure), _) => failure,
    }
}

/// Creates `key` with an empty entry unless it exists. Never overwrites: a lease another VM took
/// on a key it just created survives.
pub(crate) fn ensure_entry(env: &mut dyn Environment, key: &str) -> Written {
    if env.get(key).0.is_some() {
        return Written::Ok;
    }
    match env.set(key, &Entry::default().encode(), Some(CREATE_VERSION)) {
        // Someone created it first: what matters is that it exists.
        Written::CasMismatch => Written::Ok,
        other => other,
    }
}

#[cfg(test)]
pub(crate) mod memory {
    //! An in-memory store with Envoy's semantics, for unit tests and the simulation.

    use std::collections::HashMap;

    use super::{Environment, Written};

    #[derive(Default)]
    pub(crate) struct MemoryStore {
        pub(crate) map: HashMap<String, (Vec<u8>, u32)>,
        pub(crate) next_version: u32,
        pub(crate) random_state: u64,
    }

    impl Environment for MemoryStore {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            match self.map.get(key) {
                Some((bytes, version)) => (Some(bytes.clone()), Some(*version)),
                None => (None, None),
            }
        }

        fn set(&mut self, key: &str, value: &[u8], expected: Option<u32>) -> Written {
            self.next_version = self.next_version.wrapping_add(1).max(1);
            let version = self.next_version;
            match self.map.get_mut(key) {
                Some((_, current)) if matches!(expected, Some(v) if v != 0 && v != *current) => Written::CasMismatch,
                Some(slot) => {
                    *slot = (value.to_vec(), version);
                    Written::Ok
                }
                None => {
                    self.map.insert(key.to_string(), (value.to_vec(), version));
                    Written::Ok
                }
            }
        }

        fn random_u64(&mut self) -> u64 {
            // splitmix64: deterministic per seed.
            self.random_state = self.random_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.random_state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryStore;
    use super::*;

    #[test]
    fn creation_never_overwrites_an_entry_that_appeared_meanwhile() {
        let mut store = MemoryStore::default();
        let leased = Entry { lease_holder: 7, lease_until_ms: 100, ..Entry::default() };
        // Another VM created the key and took a lease after this VM saw it missing.
        assert_eq!(store.set("k", &leased.encode(), Some(CREATE_VERSION)), Written::Ok);
        assert_eq!(store.set("k", &Entry::default().encode(), Some(CREATE_VERSION)), Written::CasMismatch);
        assert_eq!(ensure_entry(&mut store, "k"), Written::Ok);
        let kept = store.get("k").0.as_deref().and_then(Entry::decode).unwrap_or_default();
        assert_eq!(kept.lease_holder, 7, "the lease survived: {kept:?}");
    }

    #[test]
    fn update_reports_unchanged_written_and_contended() {
        struct AlwaysContended(MemoryStore);
        impl Environment for AlwaysContended {
            fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
                self.0.get(key)
            }
            fn set(&mut self, _: &str, _: &[u8], _: Option<u32>) -> Written {
                Written::CasMismatch
            }
            fn random_u64(&mut self) -> u64 {
                4
            }
        }
        let mut store = MemoryStore::default();
        assert_eq!(update_entry(&mut store, "k", |_| None), Update::Unchanged);
        let next = Entry { failures: 1, ..Entry::default() };
        assert_eq!(update_entry(&mut store, "k", |_| Some(next.clone())), Update::Written(next.clone()));
        let mut contended = AlwaysContended(store);
        assert_eq!(update_entry(&mut contended, "k", |_| Some(next.clone())), Update::Contended);
    }
}
