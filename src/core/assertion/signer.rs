//! A signing key, loaded and checked against its algorithm when the configuration is loaded, so a
//! bad key fails `on_configure`, never a request.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use zeroize::Zeroizing;

use super::keys::{self, EcCurve, ParsedKey};
use super::signing::SigningKey;
use super::{JwtAlgorithm, MIN_RSA_BITS};
use crate::secret::Secret;

/// Why a key was refused. Messages name the problem, never the key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyError {
    /// No PEM block, a block without its END line, or a body that is not base64.
    #[error(
        "the private key is not PEM (expected -----BEGIN PRIVATE KEY----- ... -----END PRIVATE KEY----- with a base64 body)"
    )]
    NotPem,
    /// A PEM block of a kind that cannot sign: a public key, a certificate, an OpenSSH key...
    #[error(
        "a PEM \"{label}\" block cannot sign: expected PRIVATE KEY (PKCS#8), RSA PRIVATE KEY (PKCS#1) or EC PRIVATE KEY (SEC1)"
    )]
    UnsupportedPemLabel { label: String },
    /// An encrypted private key: the filter has no passphrase to open it.
    #[error("the private key is encrypted; store it decrypted, e.g. `openssl pkcs8 -topk8 -nocrypt -in key.pem`")]
    EncryptedKey,
    /// The DER inside the PEM does not parse as the structure its label announces.
    #[error("the {format} private key is malformed")]
    MalformedKey { format: &'static str },
    /// A key type or curve no supported algorithm signs with (secp256k1, P-521, Ed448...).
    #[error("{what} is not supported: use an RSA, EC P-256, EC P-384 or Ed25519 key")]
    UnsupportedKey { what: &'static str },
    /// The key's type does not fit the algorithm: an RSA key with ES256.
    #[error("an {key} key cannot sign {alg} ({alg} needs {})", alg.key_needed())]
    WrongKeyType { key: &'static str, alg: JwtAlgorithm },
    /// An EC key on the other curve: a P-384 key with ES256.
    #[error("an EC {key_curve} key cannot sign {alg} ({alg} needs {})", alg.key_needed())]
    CurveMismatch { key_curve: &'static str, alg: JwtAlgorithm },
    /// An RSA key shorter than [`MIN_RSA_BITS`].
    #[error("the RSA key has {bits} bits; at least {MIN_RSA_BITS} are needed (RFC 7518 §3.3)")]
    RsaKeyTooShort { bits: usize },
    /// A client secret shorter than the hash output of its HMAC algorithm.
    #[error("the client secret is too short for {alg}: it needs at least {min_bytes} bytes (RFC 7518 §3.2)")]
    HmacSecretTooShort { alg: JwtAlgorithm, min_bytes: usize },
    /// An HMAC algorithm given a private key, or a private-key algorithm given the client secret.
    #[error("{alg} cannot be used with {method}: {alg} signs with {}", alg.key_needed())]
    AlgorithmNotForMethod { alg: JwtAlgorithm, method: &'static str },
    /// The key parsed but the crypto backend could not sign with it.
    #[error("the key was read but cannot sign {alg}")]
    KeyRejected { alg: JwtAlgorithm },
}

/// A signing key checked against its algorithm at configuration time.
///
/// `Debug` prints the algorithm only; the key types zeroize their bytes on drop.
#[derive(Clone)]
pub(crate) struct AssertionSigner {
    alg: JwtAlgorithm,
    key: SigningKey,
}

impl AssertionSigner {
    /// `private_key_jwt`: a PEM private key, PKCS#8 (`PRIVATE KEY`: RSA, EC, Ed25519), PKCS#1
    /// (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`). Other blocks (`EC PARAMETERS`) are skipped;
    /// the first private key is used. Literal `\n` sequences (a PEM squeezed onto one line in an
    /// environment variable) are read as line breaks.
    ///
    /// The key must fit `alg`: RSA of [`MIN_RSA_BITS`] or more for RS*/PS*, P-256 for ES256,
    /// P-384 for ES384, Ed25519 for EdDSA. A test signature proves it can sign.
    pub(crate) fn from_private_key_pem(alg: JwtAlgorithm, pem: &Secret) -> Result<Self, KeyError> {
        if alg.is_hmac() {
            return Err(KeyError::AlgorithmNotForMethod { alg, method: "private_key_jwt" });
        }
        let key = match (alg, keys::read_private_key(pem.expose())?) {
            (
                JwtAlgorithm::RS256
                | JwtAlgorithm::RS384
                | JwtAlgorithm::RS512
                | JwtAlgorithm::PS256
                | JwtAlgorithm::PS384
                | JwtAlgorithm::PS512,
                ParsedKey::Rsa { pkcs1 },
            ) => {
                let key = SigningKey::rsa(&pkcs1).ok_or(KeyError::MalformedKey { format: "PKCS#1 RSA" })?;
                let bits = key.rsa_modulus_bits().unwrap_or_default();
                if bits < MIN_RSA_BITS {
                    return Err(KeyError::RsaKeyTooShort { bits });
                }
                key
            }
            (JwtAlgorithm::ES256 | JwtAlgorithm::ES384, ParsedKey::Ec { curve, scalar }) => {
                let key = match (alg, curve) {
                    (JwtAlgorithm::ES256, EcCurve::P256) => SigningKey::p256(&scalar),
                    (JwtAlgorithm::ES384, EcCurve::P384) => SigningKey::p384(&scalar),
                    _ => return Err(KeyError::CurveMismatch { key_curve: curve.name(), alg }),
                };
                key.ok_or(KeyError::KeyRejected { alg })?
            }
            (JwtAlgorithm::EdDSA, ParsedKey::Ed25519 { seed }) => {
                SigningKey::ed25519(&seed).ok_or(KeyError::MalformedKey { format: "PKCS#8 Ed25519" })?
            }
            (_, parsed) => {
                return Err(KeyError::WrongKeyType { key: parsed.kind(), alg });
            }
        };
        Self::checked(alg, key)
    }

    /// `client_secret_jwt`: HMAC keyed with the octets of the client secret (RFC 7523 §2.2,
    /// OIDC Core §9). A secret shorter than the hash output (32, 48, 64 bytes for HS256, HS384,
    /// HS512) is refused, as RFC 7518 §3.2 and OIDC Core §16.19 require.
    pub(crate) fn from_client_secret(alg: JwtAlgorithm, secret: &Secret) -> Result<Self, KeyError> {
        let Some(min_bytes) = alg.hmac_min_secret_bytes() else {
            return Err(KeyError::AlgorithmNotForMethod { alg, method: "client_secret_jwt" });
        };
        let bytes = secret.expose().as_bytes();
        if bytes.len() < min_bytes {
            return Err(KeyError::HmacSecretTooShort { alg, min_bytes });
        }
        Self::checked(alg, SigningKey::Hmac(Zeroizing::new(bytes.to_vec())))
    }

    pub(crate) fn algorithm(&self) -> JwtAlgorithm {
        self.alg
    }

    /// Proves the key signs with `alg` before anyone relies on it.
    fn checked(alg: JwtAlgorithm, key: SigningKey) -> Result<Self, KeyError> {
        let signer = AssertionSigner { alg, key };
        signer.sign(b"oauth2-cc key check").map_err(|_| KeyError::KeyRejected { alg })?;
        Ok(signer)
    }

    /// The base64url signature of `message`, or a fixed description of why signing failed.
    pub(super) fn sign(&self, message: &[u8]) -> Result<String, &'static str> {
        Ok(URL_SAFE_NO_PAD.encode(self.key.sign(self.alg, message)?))
    }
}

impl fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionSigner").field("algorithm", &self.alg).finish_non_exhaustive()
    }
}
