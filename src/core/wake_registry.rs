//! The list of wake queues, kept in shared data so any VM can wake every other VM.
//!
//! Each VM's root context registers a shared queue of its own and lists its name here with the
//! time it last said it was alive. A VM that stored a token enqueues a wake on every listed queue,
//! so requests paused on other workers resume at once. Names not refreshed for
//! `STALE_AFTER_MS` are dropped (their VM is gone, e.g. after a configuration reload).
//!
//! Encoding: one `name<TAB>last_seen_ms` line per queue.

/// A VM refreshes its line this often.
pub const HEARTBEAT_MS: u64 = 15_000;
/// A line older than this is dropped.
pub(crate) const STALE_AFTER_MS: u64 = 4 * HEARTBEAT_MS;

/// The registry with `name` marked alive at `now_ms` and stale lines dropped.
pub fn refresh(registry: &[u8], name: &str, now_ms: u64) -> Vec<u8> {
    let mut out = String::new();
    for (existing, seen) in entries(registry) {
        if existing != name && now_ms.saturating_sub(seen) < STALE_AFTER_MS {
            out.push_str(&format!("{existing}\t{seen}\n"));
        }
    }
    out.push_str(&format!("{name}\t{now_ms}\n"));
    out.into_bytes()
}

/// The queue names listed.
pub fn names(registry: &[u8]) -> Vec<&str> {
    entries(registry).map(|(name, _)| name).collect()
}

fn entries(registry: &[u8]) -> impl Iterator<Item = (&str, u64)> {
    std::str::from_utf8(registry)
        .unwrap_or("")
        .lines()
        .filter_map(|line| {
            let (name, seen) = line.split_once('\t')?;
            Some((name, seen.parse().ok()?))
        })
        .filter(|(name, _)| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_adds_updates_and_prunes() {
        let one = refresh(b"", "q1", 1_000);
        assert_eq!(names(&one), vec!["q1"]);
        let two = refresh(&one, "q2", 2_000);
        assert_eq!(names(&two), vec!["q1", "q2"]);
        let updated = refresh(&two, "q1", 3_000);
        assert_eq!(names(&updated), vec!["q2", "q1"]);
        let pruned = refresh(&updated, "q3", 2_000 + STALE_AFTER_MS);
        assert_eq!(names(&pruned), vec!["q1", "q3"]);
        assert_eq!(names(b"garbage\nq\tnotanumber\n\xff"), Vec::<&str>::new());
    }
}
