//! Copies of exchanged tokens for the hit path: per VM (the wasm driver's) or per worker (the
//! dynamic module's thread-local copies), found by (profile, the subject token's bytes) with std's
//! keyed SipHash and full-byte equality, so no SHA-256 is taken on a hit and no two callers can
//! share a copy whatever a hash does. Bounded per profile by the cache's `max_subjects` and
//! `max_bytes`. A copy is used until `use_until_ms`: its token's refresh time, and never within
//! [`crate::cache::VM_COPY_MARGIN_MS`] of its expiry.

use std::collections::HashMap;

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
            snapshot: Snapshot { generation: entry.generation, header_value: format!("{prefix}{}", entry.token) },
            use_until_ms,
            subject,
        })
    }
}

/// The bytes a copy holds: its key (the subject token), its header value, and bookkeeping.
fn held_bytes(token: &str, copy: &SubjectCopy) -> usize {
    token.len() + copy.snapshot.header_value.len() + 96
}

/// Bounded copies of exchanged tokens. See the module doc.
#[derive(Default)]
pub struct SubjectCopies {
    /// Per profile: subject token to copy.
    by_profile: Vec<HashMap<Box<str>, SubjectCopy>>,
    /// Per profile: bytes held.
    bytes: Vec<usize>,
}

impl std::fmt::Debug for SubjectCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SubjectCopies({} copies)", self.by_profile.iter().map(HashMap::len).sum::<usize>())
    }
}

impl SubjectCopies {
    /// The copy for `(profile, subject token)`, if usable: `now_ms` is checked when given (a host
    /// that reads a clock on the hit path), otherwise the holder prunes with [`Self::prune`].
    pub fn get(&self, profile: usize, token: &str, now_ms: Option<u64>) -> Option<&SubjectCopy> {
        let copy = self.by_profile.get(profile)?.get(token)?;
        match now_ms {
            Some(now) if now >= copy.use_until_ms => None,
            _ => Some(copy),
        }
    }

    /// Keeps `copy` for `token`, evicting the copies of the profile that end soonest while the
    /// profile's bounds (`max_subjects`, `max_bytes`) would be exceeded.
    pub fn insert(&mut self, profile: usize, token: &str, copy: SubjectCopy, bounds: &SubjectCacheBounds) {
        if self.by_profile.len() <= profile {
            self.by_profile.resize_with(profile + 1, HashMap::new);
            self.bytes.resize(profile + 1, 0);
        }
        let (Some(map), Some(bytes)) = (self.by_profile.get_mut(profile), self.bytes.get_mut(profile)) else { return };
        if let Some(old) = map.remove(token) {
            *bytes = bytes.saturating_sub(held_bytes(token, &old));
        }
        let adding = held_bytes(token, &copy);
        while !map.is_empty() && (map.len() + 1 > bounds.max_subjects || (*bytes + adding) as u64 > bounds.max_bytes) {
            let Some(victim) = map.iter().min_by_key(|(_, c)| c.use_until_ms).map(|(k, _)| k.clone()) else { break };
            if let Some(old) = map.remove(&victim) {
                *bytes = bytes.saturating_sub(held_bytes(&victim, &old));
            }
        }
        *bytes += adding;
        map.insert(token.into(), copy);
    }

    /// Drops every copy of `subject`'s token in `profile`.
    pub fn remove_subject(&mut self, profile: usize, subject: &SubjectKey) {
        let (Some(map), Some(bytes)) = (self.by_profile.get_mut(profile), self.bytes.get_mut(profile)) else { return };
        map.retain(|token, copy| {
            let keep = copy.subject != *subject;
            if !keep {
                *bytes = bytes.saturating_sub(held_bytes(token, copy));
            }
            keep
        });
    }

    /// Drops the copies no longer usable at `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        for (map, bytes) in self.by_profile.iter_mut().zip(self.bytes.iter_mut()) {
            map.retain(|token, copy| {
                let keep = now_ms < copy.use_until_ms;
                if !keep {
                    *bytes = bytes.saturating_sub(held_bytes(token, copy));
                }
                keep
            });
        }
    }

    /// Drops every copy of `profile`.
    pub fn clear_profile(&mut self, profile: usize) {
        if let (Some(map), Some(bytes)) = (self.by_profile.get_mut(profile), self.bytes.get_mut(profile)) {
            map.clear();
            *bytes = 0;
        }
    }

    /// Drops everything (a new configuration).
    pub fn clear(&mut self) {
        self.by_profile.clear();
        self.bytes.clear();
    }

    /// Copies held for `profile`.
    pub fn len(&self, profile: usize) -> usize {
        self.by_profile.get(profile).map_or(0, HashMap::len)
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
            snapshot: Snapshot { generation, header_value: "Bearer t".into() },
            use_until_ms,
            subject: SubjectKey([generation as u8; 32]),
        }
    }

    #[test]
    fn bounded_per_profile_and_found_by_the_whole_token() {
        let bounds = SubjectCacheBounds { max_subjects: 3, sets: 1, max_bytes: 1 << 20, set_bytes: 1 << 20 };
        let mut copies = SubjectCopies::default();
        for n in 0..5u64 {
            copies.insert(0, &format!("subject-{n}"), copy(n, 100 + n), &bounds);
        }
        copies.insert(1, "subject-0", copy(9, 500), &bounds);
        assert_eq!((copies.len(0), copies.len(1)), (3, 1));
        assert!(copies.get(0, "subject-0", None).is_none(), "the soonest to end went first");
        assert_eq!(copies.get(0, "subject-4", None).map(|c| c.snapshot.generation), Some(4));
        assert!(copies.get(0, "subject-4x", None).is_none());
        assert!(copies.get(0, "subject-", None).is_none());
        assert!(copies.get(0, "subject-4", Some(104)).is_none(), "past use_until with a clock");
        copies.remove_subject(0, &SubjectKey([3; 32]));
        assert!(copies.get(0, "subject-3", None).is_none(), "a purge names the subject's key");
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
            copies.insert(0, &format!("subject-{n}"), copy(1, 100), &bounds);
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
