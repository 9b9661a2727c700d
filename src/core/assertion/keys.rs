//! Reading a private key for `private_key_jwt`: a lenient pass over the PEM text as people paste
//! it, then RustCrypto's `pkcs8`, `pkcs1` and `sec1` for the DER (the crates `jsonwebtoken` signs
//! with, so their decoders are linked anyway). The result is the DER form `jsonwebtoken` reads:
//! PKCS#1 for RSA, PKCS#8 for EC and Ed25519.
//!
//! Two things stay hand-written because the crates' versions cost more than they save in the
//! module (measured with `make size`): the PEM body is decoded with the `base64` crate the filter
//! already links (`pem-rfc7468` added 8.4 KB), and the SEC1-to-PKCS#8 rewrap writes its three
//! DER headers itself (`der`'s encoder added about 6 KB).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use der::asn1::ObjectIdentifier;
use pkcs8::PrivateKeyInfo;

use super::KeyError;

/// A private key, sorted by type, in the DER form `jsonwebtoken` takes for it.
pub(super) enum ParsedKey {
    Rsa { pkcs1: Vec<u8> },
    Ec { curve: EcCurve, pkcs8: Vec<u8> },
    Ed25519 { pkcs8: Vec<u8> },
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

    fn oid(self) -> ObjectIdentifier {
        match self {
            EcCurve::P256 => oid::P256,
            EcCurve::P384 => oid::P384,
        }
    }
}

/// The object identifiers a key is sorted by (evaluated at compile time).
mod oid {
    use der::asn1::ObjectIdentifier as Oid;

    pub const RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
    pub const RSA_PSS: Oid = Oid::new_unwrap("1.2.840.113549.1.1.10");
    pub const EC: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
    pub const P256: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
    pub const P384: Oid = Oid::new_unwrap("1.3.132.0.34");
    pub const P521: Oid = Oid::new_unwrap("1.3.132.0.35");
    pub const SECP256K1: Oid = Oid::new_unwrap("1.3.132.0.10");
    pub const ED25519: Oid = Oid::new_unwrap("1.3.101.112");
    pub const ED448: Oid = Oid::new_unwrap("1.3.101.113");
}

const NO_NAMED_CURVE: KeyError = KeyError::UnsupportedKey { what: "an EC key without a named curve" };

/// The first private key in `text`, sorted by type.
pub(super) fn read_private_key(text: &str) -> Result<ParsedKey, KeyError> {
    let (label, der) = pem::first_private_key(text)?;
    match label {
        pem::PKCS8 => parse_pkcs8(&der),
        pem::PKCS1 => Ok(ParsedKey::Rsa { pkcs1: der }),
        _ => parse_sec1(&der),
    }
}

/// PKCS#8 `PrivateKeyInfo` (RFC 5208, RFC 5958): sorts the key by its algorithm identifier.
fn parse_pkcs8(der: &[u8]) -> Result<ParsedKey, KeyError> {
    let info = PrivateKeyInfo::try_from(der).map_err(|_| KeyError::MalformedKey { format: "PKCS#8" })?;
    match info.algorithm.oid {
        // The private key of rsaEncryption is a PKCS#1 RSAPrivateKey.
        oid::RSA => Ok(ParsedKey::Rsa { pkcs1: info.private_key.to_vec() }),
        oid::EC => {
            let curve = info.algorithm.parameters_oid().map_err(|_| NO_NAMED_CURVE)?;
            Ok(ParsedKey::Ec { curve: EcCurve::from_oid(curve)?, pkcs8: der.to_vec() })
        }
        oid::ED25519 => Ok(ParsedKey::Ed25519 { pkcs8: der.to_vec() }),
        oid::ED448 => Err(KeyError::UnsupportedKey { what: "an Ed448 key" }),
        oid::RSA_PSS => Err(KeyError::UnsupportedKey { what: "an RSA-PSS-only key (id-RSASSA-PSS)" }),
        _ => Err(KeyError::UnsupportedKey { what: "a key of an unknown algorithm" }),
    }
}

/// SEC1 `ECPrivateKey` (RFC 5915), rewrapped as PKCS#8 since that is what the signer reads:
/// `SEQUENCE { INTEGER 0, SEQUENCE { id-ecPublicKey, curve }, OCTET STRING sec1 }` (RFC 5958 §2).
fn parse_sec1(der: &[u8]) -> Result<ParsedKey, KeyError> {
    let key = sec1::EcPrivateKey::try_from(der).map_err(|_| KeyError::MalformedKey { format: "SEC1 EC" })?;
    let curve = EcCurve::from_oid(key.parameters.and_then(|p| p.named_curve()).ok_or(NO_NAMED_CURVE)?)?;
    let algorithm = [tlv(OID, oid::EC.as_bytes()), tlv(OID, curve.oid().as_bytes())].concat();
    let info = [tlv(INTEGER, &[0]), tlv(SEQUENCE, &algorithm), tlv(OCTET_STRING, der)].concat();
    Ok(ParsedKey::Ec { curve, pkcs8: tlv(SEQUENCE, &info) })
}

const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const SEQUENCE: u8 = 0x30;

/// One DER element: tag, definite length (short form below 128, else long form), contents.
fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let len = contents.len().to_be_bytes();
    let significant = len.iter().position(|byte| *byte != 0).and_then(|first| len.get(first..)).unwrap_or_default();
    let mut out = Vec::with_capacity(contents.len().saturating_add(10));
    out.push(tag);
    match significant {
        [] => out.push(0),
        [short] if *short < 0x80 => out.push(*short),
        // At most 8 length bytes (a usize), so the count fits the low 7 bits.
        long => {
            out.push(0x80 | long.len() as u8);
            out.extend_from_slice(long);
        }
    }
    out.extend_from_slice(contents);
    out
}

/// Bit length of the modulus of a PKCS#1 `RSAPrivateKey` (RFC 8017 §A.1.2); `None` if malformed.
pub(super) fn rsa_modulus_bits(pkcs1: &[u8]) -> Option<usize> {
    let key = pkcs1::RsaPrivateKey::try_from(pkcs1).ok()?;
    // `as_bytes` has no leading zero bytes.
    let modulus = key.modulus.as_bytes();
    let first = modulus.first()?;
    Some((modulus.len() - 1) * 8 + (8 - first.leading_zeros() as usize))
}

/// PEM armor (RFC 7468). People paste keys with CRLF, odd line widths, literal `\n` (a PEM
/// squeezed into one environment variable), and next to other blocks (`EC PARAMETERS` from
/// `openssl ecparam -genkey`, a certificate): the first private key block is read, any white space
/// in its body ignored.
mod pem {
    use super::{Engine, KeyError};

    pub const PKCS8: &str = "PRIVATE KEY";
    pub const PKCS1: &str = "RSA PRIVATE KEY";
    pub const SEC1: &str = "EC PRIVATE KEY";

    /// The label (one of the three above) and DER of the first private key block in `text`.
    pub fn first_private_key(text: &str) -> Result<(&'static str, Vec<u8>), KeyError> {
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
    fn decode(label: &'static str, body: &str) -> Result<(&'static str, Vec<u8>), KeyError> {
        let base64: String =
            body.replace("\\n", "").replace("\\r", "").chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der = super::STANDARD.decode(base64).map_err(|_| KeyError::NotPem)?;
        Ok((label, der))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_writes_short_and_long_lengths() {
        let cases: [(usize, &[u8]); 6] = [
            (0, &[0x04, 0x00]),
            (127, &[0x04, 0x7f]),
            (128, &[0x04, 0x81, 0x80]),
            (255, &[0x04, 0x81, 0xff]),
            (256, &[0x04, 0x82, 0x01, 0x00]),
            (65_536, &[0x04, 0x83, 0x01, 0x00, 0x00]),
        ];
        for (len, header) in cases {
            let encoded = tlv(OCTET_STRING, &vec![7; len]);
            assert_eq!(&encoded[..header.len()], header, "{len}");
            assert_eq!(encoded.len(), header.len() + len, "{len}");
        }
    }
}
