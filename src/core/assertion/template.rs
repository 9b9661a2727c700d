//! What every assertion of a profile says (issuer, subject, audience, lifetime, extra header and
//! claims), checked once when the configuration is loaded.

use serde_json::{Map, Value};

use super::{AssertionError, RESERVED_CLAIMS, RESERVED_HEADERS};

/// The `aud` claim: one string, or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AssertionAudience {
    One(String),
    Many(Vec<String>),
}

impl AssertionAudience {
    fn is_valid(&self) -> bool {
        match self {
            AssertionAudience::One(aud) => !aud.is_empty(),
            AssertionAudience::Many(auds) => !auds.is_empty() && auds.iter().all(|aud| !aud.is_empty()),
        }
    }

    pub(super) fn to_json(&self) -> Value {
        match self {
            AssertionAudience::One(aud) => Value::from(aud.as_str()),
            AssertionAudience::Many(auds) => Value::from(auds.clone()),
        }
    }
}

/// What every assertion of a profile says; [`sign_assertion`] adds the time and `jti`.
///
/// Claims: `iss`, `sub`, `aud` from the fields, then `extra_claims` (which may override those
/// three, e.g. to send a differently shaped `aud`), then `iat`, `exp = iat + lifetime_s`, `nbf =
/// iat` if `include_nbf`, and `jti`, which `extra_claims` may not set ([`RESERVED_CLAIMS`]).
/// Header: `alg` (always the signer's, [`RESERVED_HEADERS`]), `typ` = [`DEFAULT_TYP`], then
/// `extra_header` (`kid`, `x5t`, or another `typ` such as `client-authentication+jwt`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AssertionTemplate {
    /// `iss`: the client_id for client authentication.
    pub issuer: String,
    /// `sub`: the client_id for client authentication.
    pub subject: String,
    /// `aud`: the authorization server, usually its token endpoint URL or issuer identifier.
    pub audience: AssertionAudience,
    /// Seconds from `iat` to `exp`; must be at least 1.
    pub lifetime_s: u64,
    pub include_nbf: bool,
    pub extra_header: Map<String, Value>,
    pub extra_claims: Map<String, Value>,
}

impl AssertionTemplate {
    /// Checks what does not depend on the time: call it when loading the configuration, so that
    /// [`sign_assertion`] only fails on a clock overflow or a crypto failure.
    pub(crate) fn validate(&self) -> Result<(), AssertionError> {
        if self.issuer.is_empty() {
            return Err(AssertionError::MissingClaim { claim: "iss" });
        }
        if self.subject.is_empty() {
            return Err(AssertionError::MissingClaim { claim: "sub" });
        }
        if !self.audience.is_valid() {
            return Err(AssertionError::MissingClaim { claim: "aud" });
        }
        if self.lifetime_s == 0 {
            return Err(AssertionError::ZeroLifetime);
        }
        if let Some(name) = RESERVED_HEADERS.into_iter().find(|name| self.extra_header.contains_key(*name)) {
            return Err(AssertionError::ReservedHeader { name });
        }
        if let Some(name) = RESERVED_CLAIMS.into_iter().find(|name| self.extra_claims.contains_key(*name)) {
            return Err(AssertionError::ReservedClaim { name });
        }
        Ok(())
    }
}
