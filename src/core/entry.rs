//! The per-profile cache entry and its one encoding, shared by every VM of the Envoy process
//! (proxy-wasm shared data, or process memory in the native host).
//!
//! The encoding is a fixed little-endian header followed by the token, read field by field by one
//! decoder, so the request path reads it without parsing JSON and [`EntryView`] borrows the token
//! without allocating. A new field goes into [`Fields`] and the version goes up.

/// Bumped whenever the layout changes: an entry of another version reads as empty (no token).
const VERSION: u8 = 3;
/// Flag bit: the failures counted so far happened while a token was still usable.
const FAILING_WHILE_USABLE: u8 = 0x01;

/// A decoded cache entry.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// Increases each time a new token is stored; identifies the token without comparing bytes.
    pub generation: u64,
    /// When the request that got this token was sent (ms since the epoch).
    pub token_sent_at_ms: u64,
    /// From then on, a background refresh is due.
    pub refresh_at_ms: u64,
    /// From then on, the token must not be injected.
    pub expires_at_ms: u64,
    /// The VM fetching now (0: nobody).
    pub lease_holder: u64,
    pub lease_until_ms: u64,
    /// Consecutive failed fetches.
    pub failures: u32,
    /// No fetch before this time (backoff, Retry-After, spent budget).
    pub retry_at_ms: u64,
    /// The failures counted so far happened while a token was still usable (refresh retries).
    pub failing_while_usable: bool,
    /// Start of the current fetch-budget window, and fetches started in it.
    pub budget_window_start_ms: u64,
    pub budget_used: u32,
    /// Empty when there is no token.
    pub token: String,
}

impl std::fmt::Debug for Entry {
    /// The token is a credential: only whether there is one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("generation", &self.generation)
            .field("token", &if self.token.is_empty() { "" } else { "[redacted]" })
            .field("token_sent_at_ms", &self.token_sent_at_ms)
            .field("refresh_at_ms", &self.refresh_at_ms)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("lease_holder", &self.lease_holder)
            .field("lease_until_ms", &self.lease_until_ms)
            .field("failures", &self.failures)
            .field("retry_at_ms", &self.retry_at_ms)
            .field("failing_while_usable", &self.failing_while_usable)
            .field("budget_window_start_ms", &self.budget_window_start_ms)
            .field("budget_used", &self.budget_used)
            .finish()
    }
}

/// The fixed-size part of the encoding, in order.
struct Fields {
    generation: u64,
    token_sent_at_ms: u64,
    refresh_at_ms: u64,
    expires_at_ms: u64,
    lease_holder: u64,
    lease_until_ms: u64,
    retry_at_ms: u64,
    budget_window_start_ms: u64,
    failures: u32,
    budget_used: u32,
    flags: u8,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80 + self.token.len());
        out.push(VERSION);
        for value in [
            self.generation,
            self.token_sent_at_ms,
            self.refresh_at_ms,
            self.expires_at_ms,
            self.lease_holder,
            self.lease_until_ms,
            self.retry_at_ms,
            self.budget_window_start_ms,
        ] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&self.failures.to_le_bytes());
        out.extend_from_slice(&self.budget_used.to_le_bytes());
        out.push(if self.failing_while_usable { FAILING_WHILE_USABLE } else { 0 });
        out.extend_from_slice(&(self.token.len() as u32).to_le_bytes());
        out.extend_from_slice(self.token.as_bytes());
        out
    }

    /// Decodes an entry; `None` for anything this version did not write (treated as empty).
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let (f, token) = decode(bytes)?;
        Some(Entry {
            generation: f.generation,
            token_sent_at_ms: f.token_sent_at_ms,
            refresh_at_ms: f.refresh_at_ms,
            expires_at_ms: f.expires_at_ms,
            lease_holder: f.lease_holder,
            lease_until_ms: f.lease_until_ms,
            failures: f.failures,
            retry_at_ms: f.retry_at_ms,
            failing_while_usable: f.flags & FAILING_WHILE_USABLE != 0,
            budget_window_start_ms: f.budget_window_start_ms,
            budget_used: f.budget_used,
            token: token.to_string(),
        })
    }

    pub fn has_usable_token(&self, now_ms: u64) -> bool {
        !self.token.is_empty() && now_ms < self.expires_at_ms
    }

    /// The same fields as a view, borrowing the token.
    pub fn view(&self) -> EntryView<'_> {
        EntryView {
            generation: self.generation,
            refresh_at_ms: self.refresh_at_ms,
            expires_at_ms: self.expires_at_ms,
            lease_holder: self.lease_holder,
            lease_until_ms: self.lease_until_ms,
            retry_at_ms: self.retry_at_ms,
            token: &self.token,
        }
    }
}

/// The fields the driver reads on every event (the request decision, the VM's copy, when it next
/// needs its host), borrowed from the stored bytes (no allocation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EntryView<'a> {
    pub generation: u64,
    pub refresh_at_ms: u64,
    pub expires_at_ms: u64,
    pub lease_holder: u64,
    pub lease_until_ms: u64,
    pub retry_at_ms: u64,
    pub token: &'a str,
}

impl std::fmt::Debug for EntryView<'_> {
    /// The token is a credential: only whether there is one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryView")
            .field("generation", &self.generation)
            .field("token", &if self.token.is_empty() { "" } else { "[redacted]" })
            .field("refresh_at_ms", &self.refresh_at_ms)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("lease_holder", &self.lease_holder)
            .field("lease_until_ms", &self.lease_until_ms)
            .field("retry_at_ms", &self.retry_at_ms)
            .finish()
    }
}

impl<'a> EntryView<'a> {
    pub fn decode(bytes: &'a [u8]) -> Option<EntryView<'a>> {
        let (f, token) = decode(bytes)?;
        Some(EntryView {
            generation: f.generation,
            refresh_at_ms: f.refresh_at_ms,
            expires_at_ms: f.expires_at_ms,
            lease_holder: f.lease_holder,
            lease_until_ms: f.lease_until_ms,
            retry_at_ms: f.retry_at_ms,
            token,
        })
    }
}

/// The one decoder: version, fixed fields in order, then the token (exactly its length).
fn decode(bytes: &[u8]) -> Option<(Fields, &str)> {
    let mut r = Reader { bytes };
    if r.u8()? != VERSION {
        return None;
    }
    let fields = Fields {
        generation: r.u64()?,
        token_sent_at_ms: r.u64()?,
        refresh_at_ms: r.u64()?,
        expires_at_ms: r.u64()?,
        lease_holder: r.u64()?,
        lease_until_ms: r.u64()?,
        retry_at_ms: r.u64()?,
        budget_window_start_ms: r.u64()?,
        failures: r.u32()?,
        budget_used: r.u32()?,
        flags: r.u8()?,
    };
    let token_len = r.u32()? as usize;
    let token = std::str::from_utf8(r.bytes.get(..token_len)?).ok()?;
    Some((fields, token))
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.bytes.split_at_checked(N)?;
        self.bytes = rest;
        head.try_into().ok()
    }
    fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(u64::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_prints_the_token() {
        let entry = Entry { generation: 1, token: "tok-secret".into(), ..Entry::default() };
        let bytes = entry.encode();
        let view = EntryView::decode(&bytes).expect("decodes");
        for printed in [format!("{entry:?}"), format!("{view:?}")] {
            assert!(!printed.contains("tok-secret") && printed.contains("[redacted]"), "{printed}");
        }
        let decision = crate::cache::RequestDecision::Inject { token: view.token, generation: 1 };
        assert!(!format!("{decision:?}").contains("tok-secret"), "{decision:?}");
    }

    #[test]
    fn round_trip_and_view_agree() {
        let entry = Entry {
            generation: 3,
            token_sent_at_ms: 10,
            refresh_at_ms: 20,
            expires_at_ms: 30,
            lease_holder: 40,
            lease_until_ms: 50,
            failures: 2,
            retry_at_ms: 60,
            failing_while_usable: true,
            budget_window_start_ms: 70,
            budget_used: 4,
            token: "abc.def".into(),
        };
        let bytes = entry.encode();
        assert_eq!(Entry::decode(&bytes), Some(entry.clone()));
        let view = EntryView::decode(&bytes);
        assert_eq!(view, Some(entry.view()));
        assert_eq!(view.map(|v| (v.refresh_at_ms, v.lease_holder, v.lease_until_ms)), Some((20, 40, 50)));
        assert!(!format!("{entry:?}").contains("abc"), "Debug never shows the token");
    }

    #[test]
    fn foreign_and_broken_bytes_decode_as_nothing() {
        let good = Entry { token: "t".into(), ..Entry::default() }.encode();
        let mut other_version = good.clone();
        other_version[0] = 2;
        let mut bad_utf8 = good.clone();
        if let Some(last) = bad_utf8.last_mut() {
            *last = 0xff;
        }
        for bytes in [&[][..], &good[..good.len() - 1], &other_version[..], &bad_utf8[..], &[VERSION][..]] {
            assert_eq!(Entry::decode(bytes), None, "{bytes:?}");
            assert_eq!(EntryView::decode(bytes), None, "{bytes:?}");
        }
    }
}
