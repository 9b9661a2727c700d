//! RFC 8693 token exchange: what is new next to client credentials (docs/token-exchange.md).
//!
//! - [`Subject`] and [`SubjectKey`]: a request's subject token and its SHA-256, read from the
//!   request by [`read_subject`]; both print `[redacted]`.
//! - [`Refusal`]: the replies a token-exchange profile adds (no subject, unverified, rejected by the
//!   IdP, refused by the limits), each with its status, body and counter.
//! - `set`: the bounded, set-associative per-subject store layout both hosts share.
//! - `limiter`: the per-profile exchange limits (rate and in flight), kept in the store.
//! - `copies`: the bounded per-VM or per-worker copies the hit path reads.
//!
//! The lifecycle (`lifecycle::exchange`) puts them together with the lease protocol.

pub mod copies;
pub(crate) mod limiter;
pub(crate) mod set;

use sha2::{Digest, Sha256};

use crate::config::{JWT_AUTHN_NAMESPACE, SubjectSource, TokenExchange};
use crate::lifecycle::FailureReply;
use crate::metrics::Metric;
use crate::route::RequestFacts;
use crate::token_response::MAX_TOKEN_BYTES;

/// The SHA-256 of a subject token: its identity in the cache. Never printed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubjectKey(pub [u8; 32]);

impl SubjectKey {
    pub fn of(token: &[u8]) -> SubjectKey {
        SubjectKey(Sha256::digest(token).into())
    }

    /// The set this subject lives in, of `sets`.
    pub(crate) fn set_index(&self, sets: usize) -> usize {
        let [a, b, c, d, ..] = self.0;
        (u32::from_le_bytes([a, b, c, d]) as usize) % sets.max(1)
    }
}

impl std::fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubjectKey([redacted])")
    }
}

/// A request's subject token, as the request carried it. The hit path only compares its bytes
/// with the tokens of this worker's copies (which were checked when they were made, so a malformed
/// token never matches one); the checks ([`Subject::token`]: visible ASCII, bounded) and the key
/// (SHA-256, [`Subject::key`]) are done when the request goes to the driver: in V8 a SHA-256 of a
/// 1 KB token costs more than Envoy's whole request (docs/token-exchange.md, "proxy-wasm host").
#[derive(Clone)]
pub struct Subject {
    /// The value read, and where the token starts in it (after the header's prefix).
    raw: Vec<u8>,
    start: usize,
    key: std::cell::OnceCell<SubjectKey>,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subject([redacted])")
    }
}

impl PartialEq for Subject {
    fn eq(&self, other: &Subject) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Subject {}

impl Subject {
    /// A subject whose token is `token`.
    pub fn new(token: &str) -> Subject {
        Subject::from_raw(token.as_bytes().to_vec(), 0)
    }

    fn from_raw(raw: Vec<u8>, start: usize) -> Subject {
        Subject { raw, start, key: std::cell::OnceCell::new() }
    }

    /// The token's bytes, unchecked: what the hit path compares.
    pub fn bytes(&self) -> &[u8] {
        self.raw.get(self.start..).unwrap_or_default()
    }

    /// The token, if it can be one: non-empty visible ASCII (RFC 6750 `b64token` and any JWS
    /// are), at most [`MAX_TOKEN_BYTES`]. `None`: the request has no usable subject token.
    pub fn token(&self) -> Option<&str> {
        subject_token(self.bytes())
    }

    /// The SHA-256 of the token (computed once).
    pub fn key(&self) -> SubjectKey {
        *self.key.get_or_init(|| SubjectKey::of(self.bytes()))
    }
}

/// Until when a subject token whose JWS `exp` is `exp_ms` may be exchanged, and the token
/// exchanged for it used: `exp` less [`crate::cache::MIN_MARGIN_MS`] (IdPs stamp and check `exp`
/// in whole seconds). One bound for both: a margin that shrank with the time left would let the
/// cap pass while the subject may still be exchanged, and each exchange after it would buy less
/// time than the one before, or be refused by the IdP as expired.
pub(crate) fn subject_usable_until_ms(exp_ms: u64) -> u64 {
    exp_ms.saturating_sub(crate::cache::MIN_MARGIN_MS)
}

/// What a request says about its subject.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SubjectFact {
    /// A value where the subject token goes (checked on a miss: [`Subject::token`]).
    Present(Subject),
    /// No subject token.
    Missing,
    /// A subject token, but jwt_authn's metadata is absent: it verified no token on this request.
    Unverified,
}

/// Reads the subject token where the profile says, and whether jwt_authn verified a token when the
/// profile requires it. Cheap: no copy, no check of the token's bytes (see [`Subject`]).
pub(crate) fn read_subject(te: &TokenExchange, facts: &mut dyn RequestFacts) -> SubjectFact {
    let subject = match &te.subject {
        SubjectSource::Header { name, prefix } => facts.header(name).and_then(|value| after_prefix(value, prefix)),
        SubjectSource::Metadata { namespace, key } => {
            facts.dynamic_metadata_string(namespace, key).map(|value| Subject::from_raw(value, 0))
        }
    };
    let Some(subject) = subject.filter(|s| !s.bytes().is_empty()) else { return SubjectFact::Missing };
    if let Some(key) = &te.verified_by_jwt_authn
        && !facts.dynamic_metadata_has_key(JWT_AUTHN_NAMESPACE, key)
    {
        return SubjectFact::Unverified;
    }
    SubjectFact::Present(subject)
}

/// The value after `prefix` (compared without regard to ASCII case) and the spaces after it.
fn after_prefix(value: Vec<u8>, prefix: &str) -> Option<Subject> {
    let head = value.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix.as_bytes()) {
        return None;
    }
    let rest = value.get(prefix.len()..)?;
    let spaces = rest.iter().position(|b| *b != b' ').unwrap_or(rest.len());
    Some(Subject::from_raw(value, prefix.len() + spaces))
}

/// A subject token: non-empty visible ASCII (RFC 6750 `b64token` and any JWS are), bounded.
fn subject_token(bytes: &[u8]) -> Option<&str> {
    if bytes.is_empty() || bytes.len() > MAX_TOKEN_BYTES || !bytes.iter().all(|b| (0x21..0x7f).contains(b)) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// Why a token-exchange profile refused a request (the replies beyond `token_unavailable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No subject token and `missing_subject: reject`.
    SubjectMissing,
    /// jwt_authn verified no token on this request.
    SubjectUnverified,
    /// The IdP refused the subject token (`invalid_grant`), or its JWS `exp` has passed.
    SubjectRejected,
    /// The exchange limits refused a token request and there is no usable token.
    ExchangeLimited,
}

impl Refusal {
    pub const ALL: [Refusal; 4] =
        [Refusal::SubjectMissing, Refusal::SubjectUnverified, Refusal::SubjectRejected, Refusal::ExchangeLimited];

    pub fn status(self) -> u32 {
        match self {
            Refusal::ExchangeLimited => 429,
            _ => 401,
        }
    }

    /// The body's `error`.
    pub fn error(self) -> &'static str {
        match self {
            Refusal::SubjectMissing => "subject_token_missing",
            Refusal::SubjectUnverified => "subject_token_unverified",
            Refusal::SubjectRejected => "subject_token_rejected",
            Refusal::ExchangeLimited => "exchange_limited",
        }
    }

    /// Envoy's response-code details.
    pub fn details(self) -> &'static str {
        match self {
            Refusal::SubjectMissing => "oauth2_cc_subject_missing",
            Refusal::SubjectUnverified => "oauth2_cc_subject_unverified",
            Refusal::SubjectRejected => "oauth2_cc_subject_rejected",
            Refusal::ExchangeLimited => "oauth2_cc_exchange_limited",
        }
    }

    /// The counter's name (`oauth2_cc.<profile>.<name>`).
    pub fn counter(self) -> &'static str {
        match self {
            Refusal::SubjectMissing => "subject_missing",
            Refusal::SubjectUnverified => "subject_unverified",
            Refusal::SubjectRejected => "subject_rejected",
            Refusal::ExchangeLimited => "exchange_limited",
        }
    }

    pub fn metric(self) -> Metric {
        Metric::Refused(self)
    }

    /// The reply: the refusal's status and a small JSON body naming it and the profile.
    pub fn reply(self, profile_name: &str) -> FailureReply {
        // Profile names are restricted to [A-Za-z0-9._-] at configuration time: safe inside JSON.
        FailureReply {
            status: self.status(),
            details: self.details(),
            body: format!(r#"{{"error":"{}","profile":"{profile_name}"}}"#, self.error()),
        }
    }
}

#[cfg(test)]
mod tests;
