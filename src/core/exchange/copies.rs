//! Copies of exchanged tokens for the hit path: per VM (the wasm driver's) or per worker (the
//! dynamic module's thread-local copies), found by (profile, the subject token's bytes): a keyed
//! SipHash (std's `RandomState`, a key per map) of the token's length and last 32 bytes picks a
//! bucket, and the whole token is compared within it, so no SHA-256 is taken on a hit and no two
//! callers can share a copy whatever a hash does. The last bytes of a JWS are its signature, which
//! only the issuer can choose; hashing them alone keeps a hit's cost flat in the token's length.
//! Bounded per profile by the cache's `max_subjects` and `max_bytes`. A copy is used until `use_until_ms`: its token's refresh time, and never within
//! [`crate::cache::VM_COPY_MARGIN_MS`] of its expiry.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use super::SubjectKey;
use crate::cache::VM_COPY_MARGIN_MS;
use crate::config::{Config, SubjectCacheBounds};
use crate::entry::Entry;
use crate::lifecycle::Snapshot;

/// One copy: the header value, until when the hit path may use it, and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectCopy {
    pub snapshot: Snapshot,
    pub use_until_ms: u64,
    /// The subject's key (a purge names it; the request path reports it).
    pub subject: SubjectKey,
}

impl SubjectCopy {
    /// A copy of `entry`'s token with `prefix`, if it is worth keeping at `now_ms`.
    pub fn of(entry: &Entry, prefix: &str, subject: SubjectKey, now_ms: u64) -> Option<SubjectCopy> {
        let use_until_ms = entry.refresh_at_ms.min(entry.expires_at_ms.saturating_sub(VM_COPY_MARGIN_MS));
        (!entry.token.is_empty() && now_ms < use_until_ms).then(|| SubjectCopy {
            snapshot: Snapshot {
                generation: entry.generation,
                header_value: format!("{prefix}{}", entry.token),
                valid_until_ms: use_until_ms,
            },
            use_until_ms,
            subject,
        })
    }
}

/// The bytes a copy holds: its key (the subject token), its header value, and bookkeeping.
fn held_bytes(token: &[u8], copy: &SubjectCopy) -> usize {
    token.len() + copy.snapshot.header_value.len() + 96
}

/// The bucket keys are keyed hashes already: used as they are.
#[derive(Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

type Buckets = HashMap<u64, Vec<(Box<[u8]>, SubjectCopy)>, BuildHasherDefault<Prehashed>>;

/// Bounded copies of exchanged tokens. See the module doc.
#[derive(Default)]
pub struct SubjectCopies {
    keys: RandomState,
    /// Per profile: bucket (keyed hash of the token's tail) to the copies whose token hashed there.
    by_profile: Vec<Buckets>,
    /// Per profile: copies and bytes held.
    held: Vec<(usize, usize)>,
}

impl std::fmt::Debug for SubjectCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SubjectCopies({} copies)", self.held.iter().map(|h| h.0).sum::<usize>())
    }
}

/// How many trailing bytes of a token pick its bucket.
const TAIL: usize = 32;

impl SubjectCopies {
    fn bucket(&self, token: &[u8]) -> u64 {
        let tail = token.get(token.len().saturating_sub(TAIL)..).unwrap_or(token);
        self.keys.hash_one((token.len(), tail))
    }

    /// The copy for `(profile, subject token)`, if usable: `now_ms` is checked when given (a host
    /// that reads a clock on the hit path), otherwise the holder prunes with [`Self::prune`].
    pub fn get(&self, profile: usize, token: &[u8], now_ms: Option<u64>) -> Option<&SubjectCopy> {
        let bucket = self.by_profile.get(profile)?.get(&self.bucket(token))?;
        let (_, copy) = bucket.iter().find(|(t, _)| **t == *token)?;
        match now_ms {
            Some(now) if now >= copy.use_until_ms => None,
            _ => Some(copy),
        }
    }

    /// Keeps `copy` for `token`, evicting the copies of the profile that end soonest while the
    /// profile's bounds (`max_subjects`, `max_bytes`) would be exceeded.
    pub fn insert(&mut self, profile: usize, token: &[u8], copy: SubjectCopy, bounds: &SubjectCacheBounds) {
        if self.by_profile.len() <= profile {
            self.by_profile.resize_with(profile + 1, Buckets::default);
            self.held.resize(profile + 1, (0, 0));
        }
        let hash = self.bucket(token);
        // The token's own old copy, if any, is in its bucket: no walk over the others.
        if let (Some(map), Some(held)) = (self.by_profile.get_mut(profile), self.held.get_mut(profile))
            && let Some(bucket) = map.get_mut(&hash)
            && let Some(index) = bucket.iter().position(|(t, _)| **t == *token)
        {
            let (old_token, old) = bucket.swap_remove(index);
            held.0 = held.0.saturating_sub(1);
            held.1 = held.1.saturating_sub(held_bytes(&old_token, &old));
            if bucket.is_empty() {
                map.remove(&hash);
            }
        }
        let adding = held_bytes(token, &copy);
        loop {
            let Some(&(count, bytes)) = self.held.get(profile) else { return };
            if count == 0 || (count < bounds.max_subjects && (bytes + adding) as u64 <= bounds.max_bytes) {
                break;
            }
            let soonest =
                self.by_profile.get(profile).and_then(|map| map.values().flatten().map(|(_, c)| c.use_until_ms).min());
            let Some(soonest) = soonest else { break };
            let mut evicted = false;
            self.remove_where(profile, |_, c| {
                let hit = !evicted && c.use_until_ms == soonest;
                evicted |= hit;
                hit
            });
        }
        if let (Some(map), Some(held)) = (self.by_profile.get_mut(profile), self.held.get_mut(profile)) {
            held.0 += 1;
            held.1 += adding;
            map.entry(hash).or_default().push((token.into(), copy));
        }
    }

    /// Removes the copies of `profile` for which `remove(token, copy)` says so.
    fn remove_where(&mut self, profile: usize, mut remove: impl FnMut(&[u8], &SubjectCopy) -> bool) {
        let (Some(map), Some(held)) = (self.by_profile.get_mut(profile), self.held.get_mut(profile)) else { return };
        map.retain(|_, bucket| {
            bucket.retain(|(token, copy)| {
                let gone = remove(token, copy);
                if gone {
                    held.0 = held.0.saturating_sub(1);
                    held.1 = held.1.saturating_sub(held_bytes(token, copy));
                }
                !gone
            });
            !bucket.is_empty()
        });
    }

    /// Drops every copy of `subject`'s token in `profile`.
    pub fn remove_subject(&mut self, profile: usize, subject: &SubjectKey) {
        self.remove_where(profile, |_, copy| copy.subject == *subject);
    }

    /// Drops the copies no longer usable at `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        for profile in 0..self.by_profile.len() {
            self.remove_where(profile, |_, copy| now_ms >= copy.use_until_ms);
        }
    }

    /// Drops every copy of `profile`.
    pub fn clear_profile(&mut self, profile: usize) {
        if let (Some(map), Some(held)) = (self.by_profile.get_mut(profile), self.held.get_mut(profile)) {
            map.clear();
            *held = (0, 0);
        }
    }

    /// Drops everything (a new configuration).
    pub fn clear(&mut self) {
        self.by_profile.clear();
        self.held.clear();
    }

    /// Copies held for `profile`.
    pub fn len(&self, profile: usize) -> usize {
        self.held.get(profile).map_or(0, |h| h.0)
    }

    /// When the first copy stops being usable (a holder that prunes on ticks must tick then).
    pub fn earliest_end(&self) -> Option<u64> {
        self.by_profile.iter().flat_map(|map| map.values().flatten()).map(|(_, c)| c.use_until_ms).min()
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
        SubjectCopy {
            snapshot: Snapshot { generation, header_value: "Bearer t".into(), valid_until_ms: use_until_ms },
            use_until_ms,
            subject: SubjectKey([generation as u8; 32]),
        }
    }

    #[test]
    fn bounded_per_profile_and_found_by_the_whole_token() {
        let bounds = SubjectCacheBounds { max_subjects: 3, sets: 1, max_bytes: 1 << 20, set_bytes: 1 << 20 };
        let mut copies = SubjectCopies::default();
        for n in 0..5u64 {
            copies.insert(0, format!("subject-{n}").as_bytes(), copy(n, 100 + n), &bounds);
        }
        copies.insert(1, b"subject-0", copy(9, 500), &bounds);
        assert_eq!((copies.len(0), copies.len(1)), (3, 1));
        assert!(copies.get(0, b"subject-0", None).is_none(), "the soonest to end went first");
        assert_eq!(copies.get(0, b"subject-4", None).map(|c| c.snapshot.generation), Some(4));
        assert!(copies.get(0, b"subject-4x", None).is_none());
        assert!(copies.get(0, b"subject-", None).is_none());
        assert!(copies.get(0, b"subject-4", Some(104)).is_none(), "past use_until with a clock");
        copies.remove_subject(0, &SubjectKey([3; 32]));
        assert!(copies.get(0, b"subject-3", None).is_none(), "a purge names the subject's key");
        copies.prune(103);
        assert_eq!(copies.len(0), 1);
        copies.clear_profile(0);
        assert_eq!((copies.len(0), copies.len(1)), (0, 1));
    }

    #[test]
    fn bytes_bound_the_copies_too() {
        let bounds = SubjectCacheBounds { max_subjects: 100, sets: 13, max_bytes: 300, set_bytes: 300 };
        let mut copies = SubjectCopies::default();
        for n in 0..5u64 {
            copies.insert(0, format!("subject-{n}").as_bytes(), copy(1, 100), &bounds);
        }
        assert_eq!(copies.len(0), 2, "113 bytes each, 300 allowed");
    }

    #[test]
    fn a_copy_is_used_until_its_refresh_and_never_near_its_expiry() {
        let entry =
            Entry { generation: 3, refresh_at_ms: 8_000, expires_at_ms: 9_500, token: "t".into(), ..Entry::default() };
        let key = SubjectKey([1; 32]);
        assert_eq!(SubjectCopy::of(&entry, "Bearer ", key, 0).map(|c| c.use_until_ms), Some(8_000));
        let late = Entry { refresh_at_ms: 9_400, ..entry.clone() };
        assert_eq!(SubjectCopy::of(&late, "Bearer ", key, 0).map(|c| c.use_until_ms), Some(8_500));
        assert_eq!(SubjectCopy::of(&entry, "Bearer ", key, 8_000), None);
        assert_eq!(SubjectCopy::of(&Entry::default(), "Bearer ", key, 0), None);
    }
}
