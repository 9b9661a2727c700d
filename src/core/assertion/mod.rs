//! RFC 7523 JWT assertions: the client assertion of `private_key_jwt` and `client_secret_jwt`
//! (RFC 7523 §2.2, OIDC Core §9) and the assertion of the JWT-bearer grant (RFC 7523 §2.1).
//!
//! This module builds and signs one assertion; its parts own the algorithms (`algorithm`), loading
//! a signing key and checking that it fits its algorithm at configuration time, so a bad key fails
//! `on_configure`, never a request (`signer`, over `keys`), and a profile's fixed claims
//! (`template`). It does no I/O and reads no clock: the caller passes `now` and the
//! random bytes of `jti`. The signature is made by the RustCrypto crates (`signing`); the JOSE
//! header and claims are built here so that any header field (`kid`, `x5t`, `typ`...) can be set.

mod algorithm;
mod keys;
mod signer;
mod signing;
mod template;
#[cfg(test)]
mod tests;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

/// `client_assertion_type` of a token request authenticated with a JWT (RFC 7523 §2.2).
pub(crate) const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// `grant_type` of the JWT-bearer grant (RFC 7523 §2.1).
pub(crate) const JWT_BEARER_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Shortest RSA modulus accepted, in bits (RFC 7518 §3.3 and §3.5: "2048 bits or larger MUST").
pub(crate) const MIN_RSA_BITS: usize = 2048;

/// `typ` of the JOSE header unless the template's `extra_header` sets another.
pub(crate) const DEFAULT_TYP: &str = "JWT";

/// Claims this module sets and `extra_claims` may not override: they must stay correct for
/// every assertion (a fixed `exp` or `jti` would be replayed or expired).
pub(crate) const RESERVED_CLAIMS: [&str; 4] = ["exp", "iat", "nbf", "jti"];

/// Header fields `extra_header` may not set: `alg` is always the signer's.
pub(crate) const RESERVED_HEADERS: [&str; 1] = ["alg"];

pub(crate) use algorithm::JwtAlgorithm;
pub(crate) use signer::{AssertionSigner, KeyError};
pub(crate) use template::{AssertionAudience, AssertionTemplate};

/// Why an assertion could not be built. Messages never contain key material: the signing detail
/// is a fixed description of the backend's error kind, not its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    /// `iss`, `sub` or `aud` is empty (RFC 7523 §3 requires them).
    #[error("the assertion needs a non-empty \"{claim}\" claim")]
    MissingClaim { claim: &'static str },
    /// `lifetime_s` is 0: the assertion would be expired when issued.
    #[error("the assertion lifetime must be at least 1 second")]
    ZeroLifetime,
    /// `extra_header` sets a field the signer owns (`alg`).
    #[error("the assertion header field \"{name}\" is set by the signer and cannot be configured")]
    ReservedHeader { name: &'static str },
    /// `extra_claims` sets a claim computed per assertion (`exp`, `iat`, `nbf`, `jti`).
    #[error("the assertion claim \"{name}\" is computed for each assertion and cannot be configured")]
    ReservedClaim { name: &'static str },
    /// The `jti` passed in is empty.
    #[error("the assertion needs a non-empty jti")]
    EmptyJti,
    /// `now + lifetime_s` does not fit in a u64.
    #[error("the assertion expiry time overflows")]
    TimeOverflow,
    /// The crypto backend failed to sign (e.g. no randomness for RSA blinding or a PSS salt).
    #[error("signing the {alg} assertion failed: {detail}")]
    Signing { alg: JwtAlgorithm, detail: &'static str },
}

/// Builds and signs one assertion: a compact JWS `header.claims.signature`.
///
/// `now_unix_s` becomes `iat` (and `nbf`); `jti` must be unique per assertion (see
/// [`jti_from_random`]), since authorization servers may refuse a replayed one.
pub(crate) fn sign_assertion(
    signer: &AssertionSigner,
    template: &AssertionTemplate,
    now_unix_s: u64,
    jti: &str,
) -> Result<String, AssertionError> {
    template.validate()?;
    if jti.is_empty() {
        return Err(AssertionError::EmptyJti);
    }
    let exp = now_unix_s.checked_add(template.lifetime_s).ok_or(AssertionError::TimeOverflow)?;

    let mut header = Map::new();
    header.insert("typ".into(), Value::from(DEFAULT_TYP));
    for (name, value) in &template.extra_header {
        header.insert(name.clone(), value.clone());
    }
    // Last, so that the header names the signer's algorithm whatever `extra_header` holds.
    header.insert("alg".into(), Value::from(signer.algorithm().name()));

    let mut claims = Map::new();
    claims.insert("iss".into(), Value::from(template.issuer.as_str()));
    claims.insert("sub".into(), Value::from(template.subject.as_str()));
    claims.insert("aud".into(), template.audience.to_json());
    for (name, value) in &template.extra_claims {
        claims.insert(name.clone(), value.clone());
    }
    claims.insert("iat".into(), Value::from(now_unix_s));
    claims.insert("exp".into(), Value::from(exp));
    if template.include_nbf {
        claims.insert("nbf".into(), Value::from(now_unix_s));
    }
    claims.insert("jti".into(), Value::from(jti));

    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(Value::Object(header).to_string()),
        URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string()),
    );
    let signature = signer
        .sign(signing_input.as_bytes())
        .map_err(|detail| AssertionError::Signing { alg: signer.algorithm(), detail })?;
    Ok(format!("{signing_input}.{signature}"))
}

/// A `jti` from 128 random bits: their base64url encoding without padding (22 characters).
pub(crate) fn jti_from_random(bytes: &[u8; 16]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}
