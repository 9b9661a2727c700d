//! Reading a private key for `private_key_jwt`: a lenient pass over the PEM text as people paste
//! it, then RustCrypto's `pkcs8`, `pkcs1`, `sec1` and `der` for the DER (the decoders the signing
//! crates link anyway). The result is what the signer is built from: the PKCS#1 DER of an RSA
//! key, the private scalar of an EC key, the seed of an Ed25519 key.
//!
//! The PEM body is decoded with the `base64` crate the filter already links: `pem-rfc7468` added
//! 8.4 KB to the module (measured with `make size`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use der::Decode;
use der::asn1::{ObjectIdentifier, OctetStringRef};
use pkcs8::PrivateKeyInfo;
use zeroize::Zeroizing;

use super::KeyError;

/// A private key, sorted by type, in the form its signer is built from.
pub(super) enum ParsedKey {
    /// PKCS#1 `RSAPrivateKey` DER (RFC 8017 §A.1.2).
    Rsa { pkcs1: Zeroizing<Vec<u8>> },
    /// The SEC1 `privateKey` octets: the big-endian private scalar (RFC 5915).
    Ec { curve: EcCurve, scalar: Zeroizing<Vec<u8>> },
    /// The 32-byte seed (RFC 8410 §7 `CurvePrivateKey`).
    Ed25519 { seed: Zeroizing<Vec<u8>> },
}

impl ParsedKey {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            ParsedKey::Rsa { .. } => "RSA",
            ParsedKey::Ec { curve: EcCurve::P256, .. } => "EC P-256",
            ParsedKey::Ec { curve: EcCurve::P384, .. } => "EC P-384",
            ParsedKey::Ed25519 { .. } => "Ed25519",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EcCurve {
    P256,
    P384,
}

impl EcCurve {
    pub(super) fn name(self) -> &'static str {
        match self {
            EcCurve::P256 => "P-256",
            EcCurve::P384 => "P-384",
        }
    }

    fn from_oid(curve: ObjectIdentifier) -> Result<Self, KeyError> {
        match curve {
            oid::P256 => Ok(EcCurve::P256),
            oid::P384 => Ok(EcCurve::P384),
            oid::P521 => Err(KeyError::UnsupportedKey { what: "an EC P-521 key" }),
            oid::SECP256K1 => Err(KeyError::UnsupportedKey { what: "an EC secp256k1 key" }),
            _ => Err(KeyError::UnsupportedKey { what: "an EC key on an unknown curve" }),
        }
    }
}

/// The object identifiers a key is sorted by (evaluated at compile time).
mod oid {
    use der::asn1::ObjectIdentifier as Oid;

    pub(super) const RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
    pub(super) const RSA_PSS: Oid = Oid::new_unwrap("1.2.840.113549.1.1.10");
    pub(super) const EC: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
    pub(super) const P256: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
    pub(super) const P384: Oid = Oid::new_unwrap("1.3.132.0.34");
    pub(super) const P521: Oid = Oid::new_unwrap("1.3.132.0.35");
    pub(super) const SECP256K1: Oid = Oid::new_unwrap("1.3.132.0.10");
    pub(super) const ED25519: Oid = Oid::new_unwrap("1.3.101.112");
    pub(super) const ED448: Oid = Oid::new_unwrap("1.3.101.113");
}

const NO_NAMED_CURVE: KeyError = KeyError::UnsupportedKey { what: "an EC key without a named curve" };

/// The first private key in `text`, sorted by type. Each parser is its own wasm function
/// (docs/memory.md, "Function shape").
#[inline(never)]
pub(super) fn read_private_key(text: &str) -> Result<ParsedKey, KeyError> {
    let (label, der) = pem::first_private_key(text)?;
    match label {
        pem::PKCS8 => parse_pkcs8(&der),
        pem::PKCS1 => Ok(ParsedKey::Rsa { pkcs1: der }),
        _ => parse_sec1(&der, None),
    }
}

/// PKCS#8 `PrivateKeyInfo` (RFC 5208, RFC 5958): sorts the key by its algorithm identifier.
#[inline(never)]
fn parse_pkcs8(der: &[u8]) -> Result<ParsedKey, KeyError> {
    let info = PrivateKeyInfo::try_from(der).map_err(|_| KeyError::MalformedKey { format: "PKCS#8" })?;
    match info.algorithm.oid {
        // The private key of rsaEncryption is a PKCS#1 RSAPrivateKey.
        oid::RSA => Ok(ParsedKey::Rsa { pkcs1: Zeroizing::new(info.private_key.to_vec()) }),
        // The private key of id-ecPublicKey is a SEC1 ECPrivateKey (RFC 5915 §3).
        oid::EC => {
            let curve = info.algorithm.parameters_oid().map_err(|_| NO_NAMED_CURVE)?;
            parse_sec1(info.private_key, Some(EcCurve::from_oid(curve)?))
        }
        oid::ED25519 => {
            let seed = OctetStringRef::from_der(info.private_key)
                .map_err(|_| KeyError::MalformedKey { format: "PKCS#8 Ed25519" })?;
            Ok(ParsedKey::Ed25519 { seed: Zeroizing::new(seed.as_bytes().to_vec()) })
        }
        oid::ED448 => Err(KeyError::UnsupportedKey { what: "an Ed448 key" }),
        oid::RSA_PSS => Err(KeyError::UnsupportedKey { what: "an RSA-PSS-only key (id-RSASSA-PSS)" }),
        _ => Err(KeyError::UnsupportedKey { what: "a key of an unknown algorithm" }),
    }
}

/// SEC1 `ECPrivateKey` (RFC 5915): its private scalar and curve. `curve` is the one a PKCS#8
/// wrapper named, which takes precedence over the optional parameters inside.
#[inline(never)]
fn parse_sec1(der: &[u8], curve: Option<EcCurve>) -> Result<ParsedKey, KeyError> {
    let key = sec1::EcPrivateKey::try_from(der).map_err(|_| KeyError::MalformedKey { format: "SEC1 EC" })?;
    let curve = match curve {
        Some(curve) => curve,
        None => EcCurve::from_oid(key.parameters.and_then(|p| p.named_curve()).ok_or(NO_NAMED_CURVE)?)?,
    };
    Ok(ParsedKey::Ec { curve, scalar: Zeroizing::new(key.private_key.to_vec()) })
}

/// PEM armor (RFC 7468). People paste keys with CRLF, odd line widths, literal `\n` (a PEM
/// squeezed into one environment variable), and next to other blocks (`EC PARAMETERS` from
/// `openssl ecparam -genkey`, a certificate): the first private key block is read, any white space
/// in its body ignored.
mod pem {
    use super::{Engine, KeyError, Zeroizing};

    pub(super) const PKCS8: &str = "PRIVATE KEY";
    pub(super) const PKCS1: &str = "RSA PRIVATE KEY";
    pub(super) const SEC1: &str = "EC PRIVATE KEY";

    /// The label (one of the three above) and DER of the first private key block in `text`.
    pub(super) fn first_private_key(text: &str) -> Result<(&'static str, Zeroizing<Vec<u8>>), KeyError> {
        let mut refused = None;
        let mut rest = text;
        while let Some((_, after_begin)) = rest.split_once("-----BEGIN ") {
            let (label, after_label) = after_begin.split_once("-----").ok_or(KeyError::NotPem)?;
            if label.len() > 64 || !label.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                return Err(KeyError::NotPem);
            }
            let end = format!("-----END {label}-----");
            let (body, after_end) = after_label.split_once(end.as_str()).ok_or(KeyError::NotPem)?;
            rest = after_end;
            let Some(label) = [PKCS8, PKCS1, SEC1].into_iter().find(|known| *known == label) else {
                let skipped = match label {
                    "ENCRYPTED PRIVATE KEY" => KeyError::EncryptedKey,
                    other => KeyError::UnsupportedPemLabel { label: other.to_string() },
                };
                refused.get_or_insert(skipped);
                continue;
            };
            // Legacy OpenSSL encryption: `Proc-Type: 4,ENCRYPTED` and `DEK-Info:` headers.
            if body.contains("Proc-Type:") || body.contains("DEK-Info:") {
                return Err(KeyError::EncryptedKey);
            }
            return decode(label, body);
        }
        Err(refused.unwrap_or(KeyError::NotPem))
    }

    /// Decodes the base64 body, whatever its line breaks.
    fn decode(label: &'static str, body: &str) -> Result<(&'static str, Zeroizing<Vec<u8>>), KeyError> {
        let base64: Zeroizing<String> = Zeroizing::new(
            body.replace("\\n", "").replace("\\r", "").chars().filter(|c| !c.is_ascii_whitespace()).collect(),
        );
        let der = super::STANDARD.decode(base64.as_bytes()).map_err(|_| KeyError::NotPem)?;
        Ok((label, Zeroizing::new(der)))
    }
}
