use super::*;
use crate::secret::Secret;
use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};
use serde_json::json;

/// The same algorithm in `jsonwebtoken`, which the tests verify with: an implementation
/// independent of the signer's.
impl JwtAlgorithm {
    fn to_jsonwebtoken(self) -> jsonwebtoken::Algorithm {
        match self {
            JwtAlgorithm::HS256 => jsonwebtoken::Algorithm::HS256,
            JwtAlgorithm::HS384 => jsonwebtoken::Algorithm::HS384,
            JwtAlgorithm::HS512 => jsonwebtoken::Algorithm::HS512,
            JwtAlgorithm::RS256 => jsonwebtoken::Algorithm::RS256,
            JwtAlgorithm::RS384 => jsonwebtoken::Algorithm::RS384,
            JwtAlgorithm::RS512 => jsonwebtoken::Algorithm::RS512,
            JwtAlgorithm::PS256 => jsonwebtoken::Algorithm::PS256,
            JwtAlgorithm::PS384 => jsonwebtoken::Algorithm::PS384,
            JwtAlgorithm::PS512 => jsonwebtoken::Algorithm::PS512,
            JwtAlgorithm::ES256 => jsonwebtoken::Algorithm::ES256,
            JwtAlgorithm::ES384 => jsonwebtoken::Algorithm::ES384,
            JwtAlgorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        }
    }
}

const RSA_PKCS8: &str = include_str!("../../../tests/fixtures/keys/rsa_pkcs8.pem");
const RSA_PKCS1: &str = include_str!("../../../tests/fixtures/keys/rsa_pkcs1.pem");
const RSA_PUBLIC: &str = include_str!("../../../tests/fixtures/keys/rsa_public.pem");
const RSA_1024: &str = include_str!("../../../tests/fixtures/keys/rsa_1024_pkcs8.pem");
const EC_P256_SEC1: &str = include_str!("../../../tests/fixtures/keys/ec_p256_sec1.pem");
const EC_P256_PKCS8: &str = include_str!("../../../tests/fixtures/keys/ec_p256_pkcs8.pem");
const EC_P256_PUBLIC: &str = include_str!("../../../tests/fixtures/keys/ec_p256_public.pem");
const EC_P384_PKCS8: &str = include_str!("../../../tests/fixtures/keys/ec_p384_pkcs8.pem");
const EC_P384_PUBLIC: &str = include_str!("../../../tests/fixtures/keys/ec_p384_public.pem");
const EC_SECP256K1: &str = include_str!("../../../tests/fixtures/keys/ec_secp256k1_pkcs8.pem");
const ED25519_PKCS8: &str = include_str!("../../../tests/fixtures/keys/ed25519_pkcs8.pem");
const ED25519_PUBLIC: &str = include_str!("../../../tests/fixtures/keys/ed25519_public.pem");

const SECRET_64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const AUD: &str = "https://idp.example.com/oauth2/token";

fn template() -> AssertionTemplate {
    let mut extra_header = Map::new();
    extra_header.insert("kid".into(), json!("key-1"));
    let mut extra_claims = Map::new();
    extra_claims.insert("tenant".into(), json!("acme"));
    AssertionTemplate {
        issuer: "svc-a".into(),
        subject: "svc-a".into(),
        audience: AssertionAudience::One(AUD.into()),
        lifetime_s: 60,
        include_nbf: true,
        extra_header,
        extra_claims,
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn pem_signer(alg: JwtAlgorithm, pem: &str) -> AssertionSigner {
    AssertionSigner::from_private_key_pem(alg, &Secret::new(pem)).expect("key loads")
}

/// Verifies `token` with `key` the way a token server would and returns its claims.
fn verify(token: &str, alg: JwtAlgorithm, key: &DecodingKey, aud: &str) -> Value {
    let mut validation = Validation::new(alg.to_jsonwebtoken());
    validation.set_audience(&[aud]);
    validation.set_issuer(&["svc-a"]);
    validation.sub = Some("svc-a".into());
    validation.validate_nbf = true;
    validation.leeway = 0;
    validation.set_required_spec_claims(&["iss", "sub", "aud", "exp", "iat", "nbf"]);
    decode::<Value>(token, key, &validation)
        .unwrap_or_else(|error| panic!("{alg} assertion does not verify: {error}"))
        .claims
}

#[test]
fn every_algorithm_signs_an_assertion_its_public_key_verifies() {
    let hmac = |len: usize| DecodingKey::from_secret(&SECRET_64.as_bytes()[..len]);
    let public = |pem: &str| -> DecodingKey {
        match pem {
            _ if pem == RSA_PUBLIC => DecodingKey::from_rsa_pem(pem.as_bytes()),
            _ if pem == ED25519_PUBLIC => DecodingKey::from_ed_pem(pem.as_bytes()),
            _ => DecodingKey::from_ec_pem(pem.as_bytes()),
        }
        .expect("public key loads")
    };
    let cases: Vec<(&str, AssertionSigner, DecodingKey)> = vec![
        (
            "HS256, 32-byte secret",
            AssertionSigner::from_client_secret(JwtAlgorithm::HS256, &Secret::new(&SECRET_64[..32]))
                .expect("secret loads"),
            hmac(32),
        ),
        (
            "HS384, 48-byte secret",
            AssertionSigner::from_client_secret(JwtAlgorithm::HS384, &Secret::new(&SECRET_64[..48]))
                .expect("secret loads"),
            hmac(48),
        ),
        (
            "HS512, 64-byte secret",
            AssertionSigner::from_client_secret(JwtAlgorithm::HS512, &Secret::new(SECRET_64)).expect("secret loads"),
            hmac(64),
        ),
        ("RS256, PKCS#8", pem_signer(JwtAlgorithm::RS256, RSA_PKCS8), public(RSA_PUBLIC)),
        ("RS256, PKCS#1", pem_signer(JwtAlgorithm::RS256, RSA_PKCS1), public(RSA_PUBLIC)),
        ("RS384", pem_signer(JwtAlgorithm::RS384, RSA_PKCS8), public(RSA_PUBLIC)),
        ("RS512", pem_signer(JwtAlgorithm::RS512, RSA_PKCS1), public(RSA_PUBLIC)),
        ("PS256", pem_signer(JwtAlgorithm::PS256, RSA_PKCS8), public(RSA_PUBLIC)),
        ("PS384", pem_signer(JwtAlgorithm::PS384, RSA_PKCS1), public(RSA_PUBLIC)),
        ("PS512", pem_signer(JwtAlgorithm::PS512, RSA_PKCS8), public(RSA_PUBLIC)),
        ("ES256, SEC1", pem_signer(JwtAlgorithm::ES256, EC_P256_SEC1), public(EC_P256_PUBLIC)),
        ("ES256, PKCS#8", pem_signer(JwtAlgorithm::ES256, EC_P256_PKCS8), public(EC_P256_PUBLIC)),
        ("ES384", pem_signer(JwtAlgorithm::ES384, EC_P384_PKCS8), public(EC_P384_PUBLIC)),
        ("EdDSA", pem_signer(JwtAlgorithm::EdDSA, ED25519_PKCS8), public(ED25519_PUBLIC)),
    ];
    for (name, signer, key) in cases {
        let alg = signer.algorithm();
        let now = now();
        let token =
            sign_assertion(&signer, &template(), now, "jti-1").unwrap_or_else(|error| panic!("{name}: {error}"));

        let header = decode_header(&token).expect("header decodes");
        assert_eq!(header.alg, alg.to_jsonwebtoken(), "{name}");
        assert_eq!(header.kid.as_deref(), Some("key-1"), "{name}");
        assert_eq!(header.typ.as_deref(), Some("JWT"), "{name}");

        let claims = verify(&token, alg, &key, AUD);
        assert_eq!(claims["iss"], "svc-a", "{name}");
        assert_eq!(claims["sub"], "svc-a", "{name}");
        assert_eq!(claims["aud"], AUD, "{name}");
        assert_eq!(claims["iat"], now, "{name}");
        assert_eq!(claims["nbf"], now, "{name}");
        assert_eq!(claims["exp"], now + 60, "{name}");
        assert_eq!(claims["jti"], "jti-1", "{name}");
        assert_eq!(claims["tenant"], "acme", "{name}");
    }
}

#[test]
fn a_key_verifies_only_its_own_assertions() {
    let token = sign_assertion(&pem_signer(JwtAlgorithm::ES256, EC_P256_SEC1), &template(), now(), "j").expect("signs");
    // Flip one character of the claims: the signature no longer matches.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1] = URL_SAFE_NO_PAD.encode(
        String::from_utf8(URL_SAFE_NO_PAD.decode(&parts[1]).expect("b64")).expect("utf8").replace("svc-a", "svc-b"),
    );
    let tampered = parts.join(".");
    let key = DecodingKey::from_ec_pem(EC_P256_PUBLIC.as_bytes()).expect("loads");
    let mut validation = Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&[AUD]);
    assert!(decode::<Value>(&token, &key, &validation).is_ok());
    assert!(decode::<Value>(&tampered, &key, &validation).is_err());
}

#[test]
fn the_jwt_is_compact_base64url_json() {
    let signer = pem_signer(JwtAlgorithm::EdDSA, ED25519_PKCS8);
    let token = sign_assertion(&signer, &template(), 1_700_000_000, "abc").expect("signs");
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    for part in &parts {
        assert!(
            part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{part} is not unpadded base64url"
        );
    }
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("json");
    assert_eq!(header, json!({"alg": "EdDSA", "typ": "JWT", "kid": "key-1"}));
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
    assert_eq!(
        claims,
        json!({
            "iss": "svc-a", "sub": "svc-a", "aud": AUD, "tenant": "acme",
            "iat": 1_700_000_000u64, "nbf": 1_700_000_000u64, "exp": 1_700_000_060u64,
            "jti": "abc",
        })
    );
    // Ed25519 signatures are deterministic: 64 bytes.
    assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).expect("b64").len(), 64);
}

#[test]
fn template_options_shape_the_header_and_claims() {
    let signer = AssertionSigner::from_client_secret(JwtAlgorithm::HS256, &Secret::new(SECRET_64)).expect("loads");
    let decoded = |template: &AssertionTemplate| -> (Value, Value) {
        let token = sign_assertion(&signer, template, 1_000, "j").expect("signs");
        let mut parts =
            token.split('.').map(|part| serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(part).expect("b64")));
        let header = parts.next().expect("header").expect("json");
        let claims = parts.next().expect("claims").expect("json");
        (header, claims)
    };

    // (what, change to the template, field, expected value in header or claims)
    type Change = fn(&mut AssertionTemplate);
    let cases: [(&str, Change, bool, &str, Value); 7] = [
        ("no nbf", |t| t.include_nbf = false, false, "nbf", Value::Null),
        (
            "several audiences",
            |t| t.audience = AssertionAudience::Many(vec!["a".into(), "b".into()]),
            false,
            "aud",
            json!(["a", "b"]),
        ),
        (
            "extra claims may override aud",
            |t| {
                t.extra_claims.insert("aud".into(), json!(["x"]));
            },
            false,
            "aud",
            json!(["x"]),
        ),
        (
            "extra claims may override iss",
            |t| {
                t.extra_claims.insert("iss".into(), json!("other"));
            },
            false,
            "iss",
            json!("other"),
        ),
        ("lifetime", |t| t.lifetime_s = 300, false, "exp", json!(1_300)),
        (
            "typ can be replaced",
            |t| {
                t.extra_header.insert("typ".into(), json!("client-authentication+jwt"));
            },
            true,
            "typ",
            json!("client-authentication+jwt"),
        ),
        (
            "any header field",
            |t| {
                t.extra_header.insert("x5t#S256".into(), json!("thumb"));
            },
            true,
            "x5t#S256",
            json!("thumb"),
        ),
    ];
    for (name, change, in_header, field, expected) in cases {
        let mut template = template();
        change(&mut template);
        let (header, claims) = decoded(&template);
        let actual = if in_header { &header } else { &claims };
        assert_eq!(actual.get(field).unwrap_or(&Value::Null), &expected, "{name}");
        assert_eq!(header["alg"], "HS256", "{name}");
    }
}

#[test]
fn distinct_randomness_gives_distinct_jti() {
    let zero = jti_from_random(&[0; 16]);
    assert_eq!(zero, "AAAAAAAAAAAAAAAAAAAAAA");
    let mut seen = std::collections::HashSet::new();
    for i in 0..=255u8 {
        let mut bytes = [0u8; 16];
        bytes[15] = i;
        bytes[0] = i.wrapping_mul(7);
        let jti = jti_from_random(&bytes);
        assert_eq!(jti.len(), 22);
        assert!(jti.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert!(seen.insert(jti), "jti repeated for {bytes:?}");
    }
    assert_eq!(jti_from_random(&[0xff; 16]), "_____________________w");
}

#[test]
fn key_texts_that_are_not_a_usable_private_key_are_refused() {
    let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
    let legacy_encrypted = RSA_PKCS1.replace(
        "-----BEGIN RSA PRIVATE KEY-----\n",
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\n",
    );
    let not_base64 = "-----BEGIN PRIVATE KEY-----\nnot*base64!\n-----END PRIVATE KEY-----\n";
    let not_der = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    let no_end = "-----BEGIN PRIVATE KEY-----\nAAAA\n";
    let truncated = {
        let mut lines: Vec<&str> = RSA_PKCS8.lines().collect();
        lines.remove(3);
        lines.join("\n")
    };
    let openssh = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
    let cases: Vec<(&str, JwtAlgorithm, &str, KeyError)> = vec![
        ("empty", JwtAlgorithm::RS256, "", KeyError::NotPem),
        ("not PEM", JwtAlgorithm::RS256, "hello", KeyError::NotPem),
        ("no END line", JwtAlgorithm::RS256, no_end, KeyError::NotPem),
        ("bad base64", JwtAlgorithm::RS256, not_base64, KeyError::NotPem),
        ("not DER", JwtAlgorithm::RS256, not_der, KeyError::MalformedKey { format: "PKCS#8" }),
        ("truncated", JwtAlgorithm::RS256, &truncated, KeyError::MalformedKey { format: "PKCS#8" }),
        ("encrypted", JwtAlgorithm::RS256, encrypted, KeyError::EncryptedKey),
        ("legacy encrypted", JwtAlgorithm::RS256, &legacy_encrypted, KeyError::EncryptedKey),
        ("public key", JwtAlgorithm::RS256, RSA_PUBLIC, KeyError::UnsupportedPemLabel { label: "PUBLIC KEY".into() }),
        (
            "OpenSSH key",
            JwtAlgorithm::EdDSA,
            openssh,
            KeyError::UnsupportedPemLabel { label: "OPENSSH PRIVATE KEY".into() },
        ),
    ];
    for (name, alg, pem, expected) in cases {
        let result = AssertionSigner::from_private_key_pem(alg, &Secret::new(pem));
        assert_eq!(result.err(), Some(expected), "{name}");
    }
}

#[test]
fn keys_that_do_not_fit_the_algorithm_are_refused() {
    let cases: Vec<(&str, JwtAlgorithm, &str, KeyError)> = vec![
        (
            "RSA key for ES256",
            JwtAlgorithm::ES256,
            RSA_PKCS8,
            KeyError::WrongKeyType { key: "RSA", alg: JwtAlgorithm::ES256 },
        ),
        (
            "PKCS#1 RSA key for EdDSA",
            JwtAlgorithm::EdDSA,
            RSA_PKCS1,
            KeyError::WrongKeyType { key: "RSA", alg: JwtAlgorithm::EdDSA },
        ),
        (
            "Ed25519 key for RS256",
            JwtAlgorithm::RS256,
            ED25519_PKCS8,
            KeyError::WrongKeyType { key: "Ed25519", alg: JwtAlgorithm::RS256 },
        ),
        (
            "P-256 key for PS256",
            JwtAlgorithm::PS256,
            EC_P256_SEC1,
            KeyError::WrongKeyType { key: "EC P-256", alg: JwtAlgorithm::PS256 },
        ),
        (
            "P-256 key for EdDSA",
            JwtAlgorithm::EdDSA,
            EC_P256_PKCS8,
            KeyError::WrongKeyType { key: "EC P-256", alg: JwtAlgorithm::EdDSA },
        ),
        (
            "P-384 key for ES256",
            JwtAlgorithm::ES256,
            EC_P384_PKCS8,
            KeyError::CurveMismatch { key_curve: "P-384", alg: JwtAlgorithm::ES256 },
        ),
        (
            "P-256 key for ES384",
            JwtAlgorithm::ES384,
            EC_P256_SEC1,
            KeyError::CurveMismatch { key_curve: "P-256", alg: JwtAlgorithm::ES384 },
        ),
        ("secp256k1 key", JwtAlgorithm::ES256, EC_SECP256K1, KeyError::UnsupportedKey { what: "an EC secp256k1 key" }),
        ("RSA 1024", JwtAlgorithm::RS256, RSA_1024, KeyError::RsaKeyTooShort { bits: 1024 }),
        (
            "HMAC algorithm for a private key",
            JwtAlgorithm::HS256,
            RSA_PKCS8,
            KeyError::AlgorithmNotForMethod { alg: JwtAlgorithm::HS256, method: "private_key_jwt" },
        ),
    ];
    for (name, alg, pem, expected) in cases {
        let result = AssertionSigner::from_private_key_pem(alg, &Secret::new(pem));
        assert_eq!(result.err(), Some(expected), "{name}");
    }
}

#[test]
fn client_secrets_shorter_than_the_hash_are_refused() {
    let cases = [(JwtAlgorithm::HS256, 32), (JwtAlgorithm::HS384, 48), (JwtAlgorithm::HS512, 64)];
    for (alg, min_bytes) in cases {
        let short = Secret::new(&SECRET_64[..min_bytes - 1]);
        assert_eq!(
            AssertionSigner::from_client_secret(alg, &short).err(),
            Some(KeyError::HmacSecretTooShort { alg, min_bytes }),
            "{alg}"
        );
        let enough = Secret::new(&SECRET_64[..min_bytes]);
        let signer = AssertionSigner::from_client_secret(alg, &enough).expect("loads");
        assert_eq!(signer.algorithm(), alg);
    }
    assert_eq!(
        AssertionSigner::from_client_secret(JwtAlgorithm::HS256, &Secret::new("")).err(),
        Some(KeyError::HmacSecretTooShort { alg: JwtAlgorithm::HS256, min_bytes: 32 })
    );
    // Bytes, not characters: 11 three-byte characters are 33 bytes.
    let multibyte = Secret::new("€€€€€€€€€€€");
    assert!(AssertionSigner::from_client_secret(JwtAlgorithm::HS256, &multibyte).is_ok());
    assert_eq!(
        AssertionSigner::from_client_secret(JwtAlgorithm::RS256, &Secret::new(SECRET_64)).err(),
        Some(KeyError::AlgorithmNotForMethod { alg: JwtAlgorithm::RS256, method: "client_secret_jwt" })
    );
}

#[test]
fn pem_is_read_leniently() {
    let escaped = RSA_PKCS8.trim_end().replace('\n', "\\n");
    let crlf = EC_P256_PKCS8.replace('\n', "\r\n");
    let indented = ED25519_PKCS8.lines().map(|line| format!("    {line}")).collect::<Vec<_>>().join("\n");
    let with_params =
        format!("-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{EC_P256_SEC1}");
    let bundle = format!("{RSA_PUBLIC}{RSA_PKCS1}");
    let cases: [(&str, JwtAlgorithm, &str); 5] = [
        ("literal \\n", JwtAlgorithm::RS256, &escaped),
        ("CRLF", JwtAlgorithm::ES256, &crlf),
        ("indented", JwtAlgorithm::EdDSA, &indented),
        ("EC PARAMETERS first", JwtAlgorithm::ES256, &with_params),
        ("public key first", JwtAlgorithm::RS256, &bundle),
    ];
    for (name, alg, pem) in cases {
        let result = AssertionSigner::from_private_key_pem(alg, &Secret::new(pem));
        assert!(result.is_ok(), "{name}: {:?}", result.err());
    }
}

#[test]
fn a_sec1_key_without_its_curve_is_refused() {
    use base64::engine::general_purpose::STANDARD;
    use der::Encode;
    // Rebuild the SEC1 key with only its version, private key and public key.
    let body: String = EC_P256_SEC1.lines().filter(|line| !line.starts_with("-----")).collect();
    let der = STANDARD.decode(body).expect("b64");
    let mut key = sec1::EcPrivateKey::try_from(der.as_slice()).expect("SEC1");
    assert!(key.parameters.is_some(), "the fixture names its curve");
    key.parameters = None;
    let stripped = key.to_der().expect("encodes");
    let pem = format!("-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n", STANDARD.encode(stripped));
    assert_eq!(
        AssertionSigner::from_private_key_pem(JwtAlgorithm::ES256, &Secret::new(pem)).err(),
        Some(KeyError::UnsupportedKey { what: "an EC key without a named curve" })
    );
}

#[test]
fn templates_that_cannot_make_a_valid_assertion_are_refused() {
    type Change = fn(&mut AssertionTemplate);
    let cases: [(&str, Change, AssertionError); 9] = [
        ("empty iss", |t| t.issuer.clear(), AssertionError::MissingClaim { claim: "iss" }),
        ("empty sub", |t| t.subject.clear(), AssertionError::MissingClaim { claim: "sub" }),
        (
            "empty aud",
            |t| t.audience = AssertionAudience::One(String::new()),
            AssertionError::MissingClaim { claim: "aud" },
        ),
        (
            "no audience",
            |t| t.audience = AssertionAudience::Many(Vec::new()),
            AssertionError::MissingClaim { claim: "aud" },
        ),
        ("zero lifetime", |t| t.lifetime_s = 0, AssertionError::ZeroLifetime),
        (
            "alg in header",
            |t| {
                t.extra_header.insert("alg".into(), json!("none"));
            },
            AssertionError::ReservedHeader { name: "alg" },
        ),
        (
            "exp claim",
            |t| {
                t.extra_claims.insert("exp".into(), json!(1));
            },
            AssertionError::ReservedClaim { name: "exp" },
        ),
        (
            "jti claim",
            |t| {
                t.extra_claims.insert("jti".into(), json!("fixed"));
            },
            AssertionError::ReservedClaim { name: "jti" },
        ),
        (
            "iat claim",
            |t| {
                t.extra_claims.insert("iat".into(), json!(0));
            },
            AssertionError::ReservedClaim { name: "iat" },
        ),
    ];
    let signer = AssertionSigner::from_client_secret(JwtAlgorithm::HS256, &Secret::new(SECRET_64)).expect("loads");
    for (name, change, expected) in cases {
        let mut template = template();
        change(&mut template);
        assert_eq!(template.validate(), Err(expected.clone()), "{name}");
        assert_eq!(sign_assertion(&signer, &template, 1, "j"), Err(expected), "{name}");
    }
    assert_eq!(sign_assertion(&signer, &template(), 1, ""), Err(AssertionError::EmptyJti));
    assert_eq!(sign_assertion(&signer, &template(), u64::MAX - 59, "j"), Err(AssertionError::TimeOverflow));
    assert!(sign_assertion(&signer, &template(), u64::MAX - 60, "j").is_ok());
}

#[test]
fn debug_and_errors_never_show_key_material() {
    let secret_signer =
        AssertionSigner::from_client_secret(JwtAlgorithm::HS512, &Secret::new(SECRET_64)).expect("loads");
    let rsa_signer = pem_signer(JwtAlgorithm::RS256, RSA_PKCS8);
    let cases = [
        (format!("{secret_signer:?}"), "HS512"),
        (format!("{rsa_signer:?}"), "RS256"),
        (format!("{:#?}", rsa_signer.clone()), "RS256"),
    ];
    let key_body_line = RSA_PKCS8.lines().nth(2).expect("a body line");
    for (debug, alg) in cases {
        assert!(debug.starts_with("AssertionSigner"), "{debug}");
        assert!(debug.contains(alg), "{debug}");
        assert!(!debug.contains("0123456789abcdef"), "{debug}");
        assert!(!debug.contains(&key_body_line[..16]), "{debug}");
        assert!(debug.len() < 60, "{debug}");
    }
    let error =
        AssertionSigner::from_private_key_pem(JwtAlgorithm::ES256, &Secret::new(RSA_PKCS8)).expect_err("refused");
    assert!(!format!("{error} {error:?}").contains(&key_body_line[..16]));
}

#[test]
fn error_messages_say_what_is_wrong() {
    let cases = [
        (
            KeyError::WrongKeyType { key: "RSA", alg: JwtAlgorithm::ES256 },
            "an RSA key cannot sign ES256 (ES256 needs an EC P-256 key)",
        ),
        (
            KeyError::CurveMismatch { key_curve: "P-384", alg: JwtAlgorithm::ES256 },
            "an EC P-384 key cannot sign ES256 (ES256 needs an EC P-256 key)",
        ),
        (
            KeyError::HmacSecretTooShort { alg: JwtAlgorithm::HS384, min_bytes: 48 },
            "the client secret is too short for HS384: it needs at least 48 bytes (RFC 7518 §3.2)",
        ),
        (
            KeyError::RsaKeyTooShort { bits: 1024 },
            "the RSA key has 1024 bits; at least 2048 are needed (RFC 7518 §3.3)",
        ),
        (
            KeyError::AlgorithmNotForMethod { alg: JwtAlgorithm::HS256, method: "private_key_jwt" },
            "HS256 cannot be used with private_key_jwt: HS256 signs with a client secret",
        ),
        (
            KeyError::AlgorithmNotForMethod { alg: JwtAlgorithm::PS256, method: "client_secret_jwt" },
            "PS256 cannot be used with client_secret_jwt: PS256 signs with an RSA key",
        ),
    ];
    for (error, message) in cases {
        assert_eq!(error.to_string(), message);
    }
    assert_eq!(
        AssertionError::ReservedClaim { name: "exp" }.to_string(),
        "the assertion claim \"exp\" is computed for each assertion and cannot be configured"
    );
}

#[test]
fn algorithm_names_round_trip() {
    for alg in JwtAlgorithm::ALL {
        assert_eq!(JwtAlgorithm::parse(alg.name()), Some(alg));
        assert_eq!(alg.to_string(), alg.name());
        assert_eq!(alg.is_hmac(), alg.name().starts_with("HS"));
        assert_eq!(alg.is_hmac(), alg.hmac_min_secret_bytes().is_some());
        assert_eq!(format!("{:?}", alg.to_jsonwebtoken()), alg.name(), "mapped to the same jsonwebtoken algorithm");
    }
    for name in ["rs256", "none", "", "ES512", "ED25519", "HS256 "] {
        assert_eq!(JwtAlgorithm::parse(name), None, "{name}");
    }
}

#[test]
fn rfc_7523_constants() {
    assert_eq!(CLIENT_ASSERTION_TYPE, "urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
    assert_eq!(JWT_BEARER_GRANT_TYPE, "urn:ietf:params:oauth:grant-type:jwt-bearer");
}
