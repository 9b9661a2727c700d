//! The JWS signature of an assertion (RFC 7515 §5.1, algorithms RFC 7518 §3 and RFC 8037), made
//! with the RustCrypto crates directly: `hmac` and `sha2`, `rsa` (PKCS#1 v1.5 and PSS), `p256`
//! and `p384` (ECDSA, deterministic per RFC 6979), `ed25519-dalek`.
//!
//! Why not a JWT library: the filter only signs, and a JWT library links every verifier and
//! key-format path too; in the proxy-wasm build every byte of code costs Envoy memory once per
//! process (docs/memory.md). The key is parsed once, when the configuration is loaded.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
// The `signature` crate's trait, which the ECDSA and Ed25519 keys implement.
use p256::ecdsa::signature::Signer;
use rand_core::OsRng;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::traits::{PublicKeyParts, SignatureScheme};
use rsa::{Pkcs1v15Sign, Pss, RsaPrivateKey};
use sha2::{Digest, Sha256, Sha384, Sha512};
use zeroize::Zeroizing;

use super::JwtAlgorithm;

/// A key ready to sign, of the type its algorithm needs (the caller pairs them). The large keys
/// are boxed, so a profile that signs nothing does not carry their size.
#[derive(Clone)]
pub(super) enum SigningKey {
    /// The octets of the client secret (`client_secret_jwt`).
    Hmac(Zeroizing<Vec<u8>>),
    Rsa(Box<RsaPrivateKey>),
    P256(Box<p256::ecdsa::SigningKey>),
    P384(Box<p384::ecdsa::SigningKey>),
    Ed25519(Box<ed25519_dalek::SigningKey>),
}

impl SigningKey {
    /// A PKCS#1 `RSAPrivateKey`; `None` if it does not parse as one.
    #[inline(never)]
    pub(super) fn rsa(pkcs1: &[u8]) -> Option<Self> {
        RsaPrivateKey::from_pkcs1_der(pkcs1).ok().map(|key| SigningKey::Rsa(Box::new(key)))
    }

    /// The private scalar of a P-256 key (SEC1 `privateKey` octets).
    #[inline(never)]
    pub(super) fn p256(scalar: &[u8]) -> Option<Self> {
        p256::ecdsa::SigningKey::from_slice(scalar).ok().map(|key| SigningKey::P256(Box::new(key)))
    }

    /// The private scalar of a P-384 key (SEC1 `privateKey` octets).
    #[inline(never)]
    pub(super) fn p384(scalar: &[u8]) -> Option<Self> {
        p384::ecdsa::SigningKey::from_slice(scalar).ok().map(|key| SigningKey::P384(Box::new(key)))
    }

    /// The 32-byte seed of an Ed25519 key (RFC 8410 `CurvePrivateKey`).
    #[inline(never)]
    pub(super) fn ed25519(seed: &[u8]) -> Option<Self> {
        let seed: &[u8; 32] = seed.try_into().ok()?;
        Some(SigningKey::Ed25519(Box::new(ed25519_dalek::SigningKey::from_bytes(seed))))
    }

    /// Bit length of an RSA key's modulus; `None` for the other key types.
    pub(super) fn rsa_modulus_bits(&self) -> Option<usize> {
        match self {
            SigningKey::Rsa(key) => Some(key.n().bits()),
            _ => None,
        }
    }

    /// The raw JWS signature of `message` with `alg`, or a fixed description of why not (the
    /// crates' own messages are never passed on). RSA signing is blinded and PSS salted with
    /// randomness from the operating system (WASI `random_get` in the proxy-wasm build).
    pub(super) fn sign(&self, alg: JwtAlgorithm, message: &[u8]) -> Result<Vec<u8>, &'static str> {
        use JwtAlgorithm as A;
        match (alg, self) {
            (A::HS256, SigningKey::Hmac(key)) => hmac::<Hmac<Sha256>>(key, message),
            (A::HS384, SigningKey::Hmac(key)) => hmac::<Hmac<Sha384>>(key, message),
            (A::HS512, SigningKey::Hmac(key)) => hmac::<Hmac<Sha512>>(key, message),
            // RSASSA-PKCS1-v1_5 (RFC 8017 §8.2).
            (A::RS256, SigningKey::Rsa(key)) => rsa(key, Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(message)),
            (A::RS384, SigningKey::Rsa(key)) => rsa(key, Pkcs1v15Sign::new::<Sha384>(), &Sha384::digest(message)),
            (A::RS512, SigningKey::Rsa(key)) => rsa(key, Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(message)),
            // RSASSA-PSS (RFC 8017 §8.1), MGF1 over the same hash, a salt as long as the hash
            // (RFC 7518 §3.5). "Blinded" is RSA blinding of the private-key operation.
            (A::PS256, SigningKey::Rsa(key)) => rsa(key, Pss::new_blinded::<Sha256>(), &Sha256::digest(message)),
            (A::PS384, SigningKey::Rsa(key)) => rsa(key, Pss::new_blinded::<Sha384>(), &Sha384::digest(message)),
            (A::PS512, SigningKey::Rsa(key)) => rsa(key, Pss::new_blinded::<Sha512>(), &Sha512::digest(message)),
            (A::ES256, SigningKey::P256(key)) => es256(key, message),
            (A::ES384, SigningKey::P384(key)) => es384(key, message),
            (A::EdDSA, SigningKey::Ed25519(key)) => Ok(eddsa(key, message)),
            _ => Err("the key does not fit the algorithm"),
        }
    }
}

const EC_FAILED: &str = "ECDSA signing failed";

// Each algorithm in its own wasm function, and each key type's parser too: inlined into one
// caller they would make one large function, which costs Envoy far more memory to compile than
// its parts (docs/memory.md, "Function shape").

#[inline(never)]
fn es256(key: &p256::ecdsa::SigningKey, message: &[u8]) -> Result<Vec<u8>, &'static str> {
    let signature: p256::ecdsa::Signature = key.try_sign(message).map_err(|_| EC_FAILED)?;
    Ok(signature.to_bytes().to_vec())
}

#[inline(never)]
fn es384(key: &p384::ecdsa::SigningKey, message: &[u8]) -> Result<Vec<u8>, &'static str> {
    let signature: p384::ecdsa::Signature = key.try_sign(message).map_err(|_| EC_FAILED)?;
    Ok(signature.to_bytes().to_vec())
}

#[inline(never)]
fn eddsa(key: &ed25519_dalek::SigningKey, message: &[u8]) -> Vec<u8> {
    key.sign(message).to_bytes().to_vec()
}

#[inline(never)]
fn hmac<M: Mac + KeyInit>(key: &[u8], message: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut mac = <M as KeyInit>::new_from_slice(key).map_err(|_| "the HMAC key was refused")?;
    mac.update(message);
    Ok(mac.finalize().into_bytes().to_vec())
}

#[inline(never)]
fn rsa(key: &RsaPrivateKey, scheme: impl SignatureScheme, digest: &[u8]) -> Result<Vec<u8>, &'static str> {
    key.sign_with_rng(&mut OsRng, scheme, digest)
        .map_err(|_| "RSA signing failed (no randomness for blinding or the PSS salt?)")
}
