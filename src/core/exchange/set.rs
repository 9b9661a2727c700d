//! The per-subject store of a token-exchange profile: a fixed number of keys, each a *set* of at
//! most [`SUBJECT_SET_WAYS`] subject entries within a byte share, so the store stays bounded in a
//! host that can neither list nor delete keys (proxy-wasm shared data). See docs/token-exchange.md,
//! "Store layout".
//!
//! Encoding (little-endian): version (1), entry count (1), then per entry the subject's SHA-256
//! (32), last used ms (8), flags (1), the length (4) and bytes of a `core::entry::Entry`. Bytes of
//! another version, or that do not decode, read as an empty set.

use super::SubjectKey;
use crate::config::SUBJECT_SET_WAYS;
use crate::entry::Entry;

const VERSION: u8 = 1;
/// Flag bit: the IdP refused this subject token (`invalid_grant`).
const REJECTED: u8 = 0x01;
/// The bytes of one entry besides its `Entry` encoding.
const ENTRY_HEADER: usize = 32 + 8 + 1 + 4;

/// The key of set `index` of the profile whose cache key is `cache_key`.
pub(crate) fn set_key(cache_key: &str, index: usize) -> String {
    format!("{cache_key}.x.{index}")
}

/// The key of the profile's exchange limiter.
pub(crate) fn limit_key(cache_key: &str) -> String {
    format!("{cache_key}.x.limit")
}

/// The key of the profile's purge counter (moves when an upstream's status dropped a subject's token).
pub(crate) fn purges_key(cache_key: &str) -> String {
    format!("{cache_key}.x.purges")
}

/// One subject's cache entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubjectEntry {
    pub(crate) subject: SubjectKey,
    /// Set when the entry is claimed or stored, and when a request finds it on a miss.
    pub(crate) last_used_ms: u64,
    /// The IdP refused this subject token: its requests get 401 while the backoff runs.
    pub(crate) rejected: bool,
    pub(crate) entry: Entry,
}

impl SubjectEntry {
    pub(crate) fn new(subject: SubjectKey) -> SubjectEntry {
        SubjectEntry { subject, last_used_ms: 0, rejected: false, entry: Entry::default() }
    }
}

/// The decoded value of one set key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SubjectSet {
    pub(crate) entries: Vec<SubjectEntry>,
}

impl SubjectSet {
    /// The set in `bytes` (`None`, another version or broken bytes: empty).
    pub(crate) fn decode(bytes: Option<&[u8]>) -> SubjectSet {
        bytes.and_then(decode_entries).map(|entries| SubjectSet { entries }).unwrap_or_default()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let encoded: Vec<Vec<u8>> = self.entries.iter().map(|e| e.entry.encode()).collect();
        let mut out = Vec::with_capacity(2 + encoded.iter().map(|e| ENTRY_HEADER + e.len()).sum::<usize>());
        out.push(VERSION);
        out.push(u8::try_from(self.entries.len()).unwrap_or(u8::MAX));
        for (entry, bytes) in self.entries.iter().zip(&encoded) {
            out.extend_from_slice(&entry.subject.0);
            out.extend_from_slice(&entry.last_used_ms.to_le_bytes());
            out.push(if entry.rejected { REJECTED } else { 0 });
            out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        out
    }

    /// The entry of exactly this subject: the whole digest is compared, so two subjects never share one.
    pub(crate) fn find(&self, subject: &SubjectKey) -> Option<&SubjectEntry> {
        self.entries.iter().find(|e| e.subject == *subject)
    }

    /// Writes `entry` (replacing the subject's entry, or adding it) and evicts others until the set
    /// has at most [`SUBJECT_SET_WAYS`] entries and encodes within `max_bytes`: first entries with
    /// no usable token and no live lease, then the least recently used; a leased entry only when
    /// nothing else is left. `false` (and the set unchanged) when `entry` alone does not fit.
    pub(crate) fn put(&mut self, entry: SubjectEntry, now_ms: u64, max_bytes: usize) -> bool {
        if 2 + ENTRY_HEADER + entry.entry.encode().len() > max_bytes {
            return false;
        }
        let subject = entry.subject;
        match self.entries.iter_mut().find(|e| e.subject == subject) {
            Some(slot) => *slot = entry,
            None => self.entries.push(entry),
        }
        while self.entries.len() > SUBJECT_SET_WAYS || self.encoded_len() > max_bytes {
            let victim = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.subject != subject)
                .min_by_key(|(_, e)| eviction_rank(e, now_ms))
                .map(|(index, _)| index);
            match victim {
                Some(index) => {
                    self.entries.remove(index);
                }
                None => break,
            }
        }
        true
    }

    fn encoded_len(&self) -> usize {
        2 + self.entries.iter().map(|e| ENTRY_HEADER + e.entry.encode().len()).sum::<usize>()
    }
}

/// Lower goes first: (leased, holds a usable token, last used).
fn eviction_rank(entry: &SubjectEntry, now_ms: u64) -> (bool, bool, u64) {
    let e = &entry.entry;
    let leased = e.lease_holder != 0 && now_ms < e.lease_until_ms;
    (leased, e.has_usable_token(now_ms), entry.last_used_ms)
}

fn decode_entries(bytes: &[u8]) -> Option<Vec<SubjectEntry>> {
    let (&version, rest) = bytes.split_first()?;
    if version != VERSION {
        return None;
    }
    let (&count, mut rest) = rest.split_first()?;
    let mut entries = Vec::with_capacity(usize::from(count).min(SUBJECT_SET_WAYS * 2));
    for _ in 0..count {
        let (subject, tail) = rest.split_first_chunk::<32>()?;
        let (last_used, tail) = tail.split_first_chunk::<8>()?;
        let (&flags, tail) = tail.split_first()?;
        let (length, tail) = tail.split_first_chunk::<4>()?;
        let length = usize::try_from(u32::from_le_bytes(*length)).ok()?;
        let body = tail.get(..length)?;
        rest = tail.get(length..)?;
        entries.push(SubjectEntry {
            subject: SubjectKey(*subject),
            last_used_ms: u64::from_le_bytes(*last_used),
            rejected: flags & REJECTED != 0,
            entry: Entry::decode(body)?,
        });
    }
    rest.is_empty().then_some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SubjectKey {
        SubjectKey([n; 32])
    }

    fn with_token(n: u8, token: &str, last_used_ms: u64, expires_at_ms: u64) -> SubjectEntry {
        SubjectEntry {
            subject: key(n),
            last_used_ms,
            rejected: false,
            entry: Entry {
                generation: 1,
                expires_at_ms,
                refresh_at_ms: expires_at_ms,
                token: token.into(),
                ..Entry::default()
            },
        }
    }

    #[test]
    fn round_trips_and_reads_garbage_as_empty() {
        let mut set = SubjectSet::default();
        assert!(set.put(with_token(1, "a", 5, 100), 0, 4096));
        let mut rejected = SubjectEntry::new(key(2));
        rejected.rejected = true;
        assert!(set.put(rejected, 0, 4096));
        let bytes = set.encode();
        assert_eq!(SubjectSet::decode(Some(&bytes)), set);
        assert_eq!(SubjectSet::decode(None), SubjectSet::default());
        for cut in 0..bytes.len() {
            assert_eq!(SubjectSet::decode(Some(&bytes[..cut])), SubjectSet::default(), "cut at {cut}");
        }
        let mut other_version = bytes.clone();
        other_version[0] = 9;
        assert_eq!(SubjectSet::decode(Some(&other_version)), SubjectSet::default());
    }

    #[test]
    fn a_subject_finds_only_its_own_entry() {
        let mut set = SubjectSet::default();
        assert!(set.put(with_token(1, "token-of-1", 0, 100), 0, 4096));
        let mut near = key(1);
        near.0[31] ^= 1; // same set, same first bytes: another subject
        assert!(set.find(&near).is_none());
        assert_eq!(set.find(&key(1)).map(|e| e.entry.token.as_str()), Some("token-of-1"));
    }

    #[test]
    fn a_full_set_evicts_empty_entries_then_the_least_recently_used_never_a_live_lease() {
        let mut set = SubjectSet::default();
        for n in 0..SUBJECT_SET_WAYS as u8 {
            assert!(set.put(with_token(n, "t", 10 + u64::from(n), 1_000), 0, 1 << 20));
        }
        // Subject 0 is the least recently used, but it fetches now (a live lease).
        let mut leased = set.entries[0].clone();
        leased.entry.lease_holder = 7;
        leased.entry.lease_until_ms = 500;
        assert!(set.put(leased, 0, 1 << 20));
        // Subject 3's token expired: evicted first.
        let mut expired = set.entries[3].clone();
        expired.entry.expires_at_ms = 50;
        assert!(set.put(expired, 60, 1 << 20));
        assert!(set.put(with_token(100, "t", 99, 1_000), 60, 1 << 20));
        assert!(set.find(&key(3)).is_none(), "the expired entry went first");
        assert!(set.put(with_token(101, "t", 99, 1_000), 60, 1 << 20));
        assert!(set.find(&key(0)).is_some(), "the leased entry stays");
        assert!(set.find(&key(1)).is_none(), "then the least recently used");
        assert_eq!(set.entries.len(), SUBJECT_SET_WAYS);
    }

    #[test]
    fn the_byte_share_bounds_the_set() {
        let mut set = SubjectSet::default();
        let budget = 600;
        for n in 0..4u8 {
            assert!(set.put(with_token(n, &"x".repeat(100), u64::from(n), 1_000), 0, budget));
            assert!(set.encode().len() <= budget, "{} > {budget}", set.encode().len());
        }
        assert!(set.entries.len() < 4, "evicted to fit: {}", set.entries.len());
        assert!(set.find(&key(3)).is_some(), "the entry written stays");
        assert!(!set.put(with_token(9, &"x".repeat(700), 0, 1_000), 0, budget), "a token larger than the share");
        assert!(set.find(&key(9)).is_none());
    }
}
