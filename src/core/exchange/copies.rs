//! Copies of exchanged tokens for the hit path: per VM (the wasm driver's) or per worker (the
//! dynamic module's thread-local copies), keyed by (profile, subject), bounded per profile by the
//! cache's `max_subjects` and `max_bytes`. A copy is used until `use_until_ms`: its token's refresh
//! time, and never within [`crate::cache::VM_COPY_MARGIN_MS`] of its expiry.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::SubjectKey;
use crate::cache::VM_COPY_MARGIN_MS;
use crate::config::{Config, SubjectCacheBounds};
use crate::entry::Entry;
use crate::lifecycle::Snapshot;

/// One copy: the header value and until when the hit path may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectCopy {
    pub snapshot: Snapshot,
    pub use_until_ms: u64,
}

impl SubjectCopy {
    /// A copy of `entry`'s token with `prefix`, if it is worth keeping at `now_ms`.
    pub fn of(entry: &Entry, prefix: &str, now_ms: u64) -> Option<SubjectCopy> {
        let use_until_ms = entry.refresh_at_ms.min(entry.expires_at_ms.saturating_sub(VM_COPY_MARGIN_MS));
        (!entry.token.is_empty() && now_ms < use_until_ms).then(|| SubjectCopy {
            snapshot: Snapshot { generation: entry.generation, header_value: format!("{prefix}{}", entry.token) },
            use_until_ms,
        })
    }

    fn bytes(&self) -> usize {
        self.snapshot.header_value.len() + 64
    }
}

/// The digest is uniform already: its first bytes are the map's hash.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = self.0.rotate_left(5) ^ value;
    }
    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }
}

impl std::hash::Hash for CopyKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.profile);
        state.write_u64(self.subject.short());
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct CopyKey {
    profile: usize,
    subject: SubjectKey,
}

/// Bounded copies of exchanged tokens. See the module doc.
#[derive(Default)]
pub struct SubjectCopies {
    copies: HashMap<CopyKey, SubjectCopy, BuildHasherDefault<KeyHasher>>,
    /// Per profile: copies held and their bytes.
    held: Vec<(usize, usize)>,
}

impl std::fmt::Debug for SubjectCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SubjectCopies({} copies)", self.copies.len())
    }
}

impl SubjectCopies {
    /// The copy for `(profile, subject)`, if usable: `now_ms` is checked when given (a host
    /// that reads a clock on the hit path), otherwise the holder prunes with [`Self::prune`].
    pub fn get(&self, profile: usize, subject: &SubjectKey, now_ms: Option<u64>) -> Option<&SubjectCopy> {
        let copy = self.copies.get(&CopyKey { profile, subject: *subject })?;
        match now_ms {
            Some(now) if now >= copy.use_until_ms => None,
            _ => Some(copy),
        }
    }

    /// Keeps `copy`, evicting the copies of the profile that end soonest while the profile's
    /// bounds (`max_subjects`, `max_bytes`) would be exceeded.
    pub fn insert(&mut self, profile: usize, subject: SubjectKey, copy: SubjectCopy, bounds: &SubjectCacheBounds) {
        let key = CopyKey { profile, subject };
        if let Some(old) = self.copies.remove(&key) {
            self.account(profile, &old, false);
        }
        while let Some((count, bytes)) = self.held.get(profile).copied()
            && count > 0
            && (count + 1 > bounds.max_subjects || (bytes + copy.bytes()) as u64 > bounds.max_bytes)
        {
            let victim = self
                .copies
                .iter()
                .filter(|(k, _)| k.profile == profile)
                .min_by_key(|(_, c)| c.use_until_ms)
                .map(|(k, _)| *k);
            let Some(victim) = victim else { break };
            if let Some(old) = self.copies.remove(&victim) {
                self.account(profile, &old, false);
            }
        }
        self.account(profile, &copy, true);
        self.copies.insert(key, copy);
    }

    /// Drops the copy of `(profile, subject)`.
    pub fn remove(&mut self, profile: usize, subject: &SubjectKey) {
        if let Some(old) = self.copies.remove(&CopyKey { profile, subject: *subject }) {
            self.account(profile, &old, false);
        }
    }

    /// Drops the copies no longer usable at `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        let held = &mut self.held;
        self.copies.retain(|key, copy| {
            let keep = now_ms < copy.use_until_ms;
            if !keep && let Some((count, bytes)) = held.get_mut(key.profile) {
                *count = count.saturating_sub(1);
                *bytes = bytes.saturating_sub(copy.bytes());
            }
            keep
        });
    }

    /// Drops every copy of `profile`.
    pub fn clear_profile(&mut self, profile: usize) {
        self.copies.retain(|key, _| key.profile != profile);
        if let Some(held) = self.held.get_mut(profile) {
            *held = (0, 0);
        }
    }

    /// Drops everything (a new configuration).
    pub fn clear(&mut self) {
        self.copies.clear();
        self.held.clear();
    }

    /// Copies held for `profile`.
    pub fn len(&self, profile: usize) -> usize {
        self.held.get(profile).map_or(0, |h| h.0)
    }

    fn account(&mut self, profile: usize, copy: &SubjectCopy, add: bool) {
        if self.held.len() <= profile {
            self.held.resize(profile + 1, (0, 0));
        }
        if let Some((count, bytes)) = self.held.get_mut(profile) {
            if add {
                *count += 1;
                *bytes += copy.bytes();
            } else {
                *count = count.saturating_sub(1);
                *bytes = bytes.saturating_sub(copy.bytes());
            }
        }
    }
}

/// The cache bounds of `profile`, if it is a token-exchange profile.
pub fn bounds(config: &Config, profile: usize) -> Option<&SubjectCacheBounds> {
    config.profiles.get(profile)?.exchange.as_ref().map(|te| &te.cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(generation: u64, use_until_ms: u64) -> SubjectCopy {
        SubjectCopy { snapshot: Snapshot { generation, header_value: "Bearer t".into() }, use_until_ms }
    }

    #[test]
    fn bounded_per_profile_and_keyed_by_the_whole_digest() {
        let bounds = SubjectCacheBounds { max_subjects: 3, sets: 1, max_bytes: 1 << 20, set_bytes: 1 << 20 };
        let mut copies = SubjectCopies::default();
        for n in 0..5u8 {
            copies.insert(0, SubjectKey([n; 32]), copy(u64::from(n), 100 + u64::from(n)), &bounds);
        }
        copies.insert(1, SubjectKey([0; 32]), copy(9, 500), &bounds);
        assert_eq!((copies.len(0), copies.len(1)), (3, 1));
        assert!(copies.get(0, &SubjectKey([0; 32]), None).is_none(), "the soonest to end went first");
        assert_eq!(copies.get(0, &SubjectKey([4; 32]), None).map(|c| c.snapshot.generation), Some(4));
        let mut near = SubjectKey([4; 32]);
        near.0[31] = 0; // same map hash, another subject
        assert!(copies.get(0, &near, None).is_none());
        assert!(copies.get(0, &SubjectKey([4; 32]), Some(104)).is_none(), "past use_until with a clock");
        copies.prune(103);
        assert_eq!(copies.len(0), 1);
        copies.clear_profile(0);
        assert_eq!((copies.len(0), copies.len(1)), (0, 1));
    }

    #[test]
    fn bytes_bound_the_copies_too() {
        let bounds = SubjectCacheBounds { max_subjects: 100, sets: 13, max_bytes: 200, set_bytes: 200 };
        let mut copies = SubjectCopies::default();
        for n in 0..5u8 {
            copies.insert(0, SubjectKey([n; 32]), copy(1, 100), &bounds);
        }
        assert_eq!(copies.len(0), 2, "72 bytes each, 200 allowed");
    }

    #[test]
    fn a_copy_is_used_until_its_refresh_and_never_near_its_expiry() {
        let entry =
            Entry { generation: 3, refresh_at_ms: 8_000, expires_at_ms: 9_500, token: "t".into(), ..Entry::default() };
        assert_eq!(SubjectCopy::of(&entry, "Bearer ", 0).map(|c| c.use_until_ms), Some(8_000));
        let late = Entry { refresh_at_ms: 9_400, ..entry.clone() };
        assert_eq!(SubjectCopy::of(&late, "Bearer ", 0).map(|c| c.use_until_ms), Some(8_500));
        assert_eq!(SubjectCopy::of(&entry, "Bearer ", 8_000), None);
        assert_eq!(SubjectCopy::of(&Entry::default(), "Bearer ", 0), None);
    }
}
