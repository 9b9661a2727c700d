//! The JWS algorithms an assertion can be signed with, and their names in configuration and headers.

use std::fmt;

/// A JWS signing algorithm (RFC 7518 §3.1, RFC 8037 for `EdDSA`) that an assertion can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl JwtAlgorithm {
    /// Every supported algorithm, for error messages that list the choices.
    pub const ALL: [JwtAlgorithm; 12] = [
        JwtAlgorithm::HS256,
        JwtAlgorithm::HS384,
        JwtAlgorithm::HS512,
        JwtAlgorithm::RS256,
        JwtAlgorithm::RS384,
        JwtAlgorithm::RS512,
        JwtAlgorithm::PS256,
        JwtAlgorithm::PS384,
        JwtAlgorithm::PS512,
        JwtAlgorithm::ES256,
        JwtAlgorithm::ES384,
        JwtAlgorithm::EdDSA,
    ];

    /// The algorithm with this JWA name. Names are case-sensitive, as in JWA: `RS256`, `EdDSA`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|alg| alg.name() == name)
    }

    /// The JWA name, as written in the `alg` header.
    pub fn name(self) -> &'static str {
        match self {
            JwtAlgorithm::HS256 => "HS256",
            JwtAlgorithm::HS384 => "HS384",
            JwtAlgorithm::HS512 => "HS512",
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::RS384 => "RS384",
            JwtAlgorithm::RS512 => "RS512",
            JwtAlgorithm::PS256 => "PS256",
            JwtAlgorithm::PS384 => "PS384",
            JwtAlgorithm::PS512 => "PS512",
            JwtAlgorithm::ES256 => "ES256",
            JwtAlgorithm::ES384 => "ES384",
            JwtAlgorithm::EdDSA => "EdDSA",
        }
    }

    /// True for the HMAC algorithms, which sign with the client secret (`client_secret_jwt`).
    pub fn is_hmac(self) -> bool {
        matches!(self, JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512)
    }

    /// Shortest HMAC key, in bytes: the hash output size (RFC 7518 §3.2; OIDC Core §16.19 applies
    /// it to the client secret). `None` for the algorithms that sign with a private key.
    pub fn hmac_min_secret_bytes(self) -> Option<usize> {
        match self {
            JwtAlgorithm::HS256 => Some(32),
            JwtAlgorithm::HS384 => Some(48),
            JwtAlgorithm::HS512 => Some(64),
            _ => None,
        }
    }

    /// What this algorithm signs with, for error messages.
    pub(super) fn key_needed(self) -> &'static str {
        match self {
            JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512 => "a client secret",
            JwtAlgorithm::RS256
            | JwtAlgorithm::RS384
            | JwtAlgorithm::RS512
            | JwtAlgorithm::PS256
            | JwtAlgorithm::PS384
            | JwtAlgorithm::PS512 => "an RSA key",
            JwtAlgorithm::ES256 => "an EC P-256 key",
            JwtAlgorithm::ES384 => "an EC P-384 key",
            JwtAlgorithm::EdDSA => "an Ed25519 key",
        }
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
