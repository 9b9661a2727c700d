//! Compiles a profile's client authentication and grant: the client secret, the RFC 7523
//! assertions (`jwt`), which of them the token request carries, and whether the request method
//! may carry them at all.

use super::ConfigError;
use super::checks::{SecretSources, resolve_secret};
use super::raw::{AuthMethod, OneOrMany, RawJwt, RawProfile, TokenMethod};
use super::runtime::{ClientAuth, DEFAULT_ASSERTION_LIFETIME_S, JwtAssertion};
use crate::assertion::{AssertionAudience, AssertionSigner, AssertionTemplate, JWT_BEARER_GRANT_TYPE, JwtAlgorithm};
use crate::secret::Secret;

/// What a profile sends to authenticate and, with the JWT-bearer grant, as its grant.
pub(super) struct CompiledAuth {
    pub(super) client_auth: ClientAuth,
    pub(super) grant_assertion: Option<JwtAssertion>,
}

struct CompiledJwt {
    assertion: JwtAssertion,
    send_client_id: bool,
}

type At<'a> = &'a dyn Fn(&str) -> String;
type Env<'a> = SecretSources<'a>;

#[inline(never)]
pub(super) fn compile_auth(
    raw: &mut RawProfile,
    grant_type: &str,
    at: At,
    env: Env,
) -> Result<CompiledAuth, ConfigError> {
    let jwt_bearer_grant = grant_type == JWT_BEARER_GRANT_TYPE;
    check_method(raw.method, raw.auth_method, jwt_bearer_grant, at)?;
    let secret = match raw.client_secret.take() {
        Some(source) => Some(resolve_secret(source, &at("client_secret"), env)?),
        None => None,
    };
    let uses_jwt =
        matches!(raw.auth_method, AuthMethod::ClientSecretJwt | AuthMethod::PrivateKeyJwt) || jwt_bearer_grant;
    let jwt = match (raw.jwt.take(), uses_jwt) {
        (Some(jwt), true) => Some(compile_jwt(jwt, raw, secret.as_ref(), at, env)?),
        (None, true) if raw.auth_method == AuthMethod::ClientSecretJwt => {
            Some(compile_jwt(RawJwt::default(), raw, secret.as_ref(), at, env)?)
        }
        (None, true) => {
            return Err(ConfigError::new(
                at("jwt"),
                "is required with auth_method private_key_jwt and with the JWT-bearer grant (algorithm, private_key)",
            ));
        }
        (Some(_), false) => {
            return Err(ConfigError::new(
                at("jwt"),
                "is only used with auth_method client_secret_jwt or private_key_jwt, or the JWT-bearer grant",
            ));
        }
        (None, false) => None,
    };
    let client_auth = client_auth(raw.auth_method, secret, jwt.as_ref(), jwt_bearer_grant, at)?;
    let grant_assertion = if jwt_bearer_grant { jwt.map(|j| j.assertion) } else { None };
    Ok(CompiledAuth { client_auth, grant_assertion })
}

/// RFC 6749 §2.3.1 forbids client credentials in the query and §3.2 asks for POST: with GET every
/// parameter goes into the URL, which proxies and IdPs log. Only methods whose credentials travel
/// elsewhere (an `Authorization` header, the TLS handshake, none at all) may use GET.
fn check_method(method: TokenMethod, auth: AuthMethod, jwt_bearer_grant: bool, at: At) -> Result<(), ConfigError> {
    if method != TokenMethod::Get {
        return Ok(());
    }
    let in_query = match auth {
        AuthMethod::ClientSecretPost => Some("auth_method client_secret_post"),
        AuthMethod::ClientSecretJwt => Some("auth_method client_secret_jwt"),
        AuthMethod::PrivateKeyJwt => Some("auth_method private_key_jwt"),
        AuthMethod::ClientSecretBasic | AuthMethod::None | AuthMethod::TlsClientAuth => {
            jwt_bearer_grant.then_some("the JWT-bearer grant")
        }
    };
    match in_query {
        Some(what) => Err(ConfigError::new(
            at("method"),
            format!(
                "GET would put the credentials of {what} in the URL (RFC 6749 §2.3.1 forbids it); use POST, \
                 or GET only with client_secret_basic, tls_client_auth or none"
            ),
        )),
        None => Ok(()),
    }
}

#[inline(never)]
fn client_auth(
    method: AuthMethod,
    secret: Option<Secret>,
    jwt: Option<&CompiledJwt>,
    jwt_bearer_grant: bool,
    at: At,
) -> Result<ClientAuth, ConfigError> {
    Ok(match (method, secret) {
        (AuthMethod::ClientSecretBasic, Some(secret)) => ClientAuth::Basic { secret },
        (AuthMethod::ClientSecretPost, Some(secret)) => ClientAuth::Post { secret },
        (method, None) if method.needs_client_secret() => {
            return Err(ConfigError::new(
                at("client_secret"),
                format!("is required with auth_method {}", method.name()),
            ));
        }
        (AuthMethod::ClientSecretJwt | AuthMethod::PrivateKeyJwt, _) => match jwt {
            Some(compiled) => {
                ClientAuth::Jwt { assertion: compiled.assertion.clone(), send_client_id: compiled.send_client_id }
            }
            None => return Err(ConfigError::new(at("jwt"), "is required with this auth_method")),
        },
        (AuthMethod::None | AuthMethod::TlsClientAuth, Some(_)) if !jwt_bearer_grant => {
            return Err(ConfigError::new(
                at("client_secret"),
                "is not used with auth_method none or tls_client_auth; remove it",
            ));
        }
        (_, _) => ClientAuth::ClientIdOnly,
    })
}

#[inline(never)]
fn compile_jwt(
    raw: RawJwt,
    profile: &RawProfile,
    client_secret: Option<&Secret>,
    at: At,
    env: Env,
) -> Result<CompiledJwt, ConfigError> {
    let algorithm = jwt_algorithm(raw.algorithm.as_deref(), profile.auth_method, at)?;
    let signer = if algorithm.is_hmac() {
        hmac_signer(algorithm, raw.private_key.is_some(), client_secret, at)?
    } else {
        if profile.auth_method == AuthMethod::ClientSecretJwt {
            return Err(ConfigError::new(
                at("jwt.algorithm"),
                "client_secret_jwt signs with HMAC: use HS256, HS384 or HS512",
            ));
        }
        let source = raw.private_key.ok_or_else(|| {
            ConfigError::new(at("jwt.private_key"), format!("is required to sign {} assertions", algorithm.name()))
        })?;
        let pem = resolve_secret(source, &at("jwt.private_key"), env)?;
        AssertionSigner::from_private_key_pem(algorithm, &pem)
            .map_err(|e| ConfigError::new(at("jwt.private_key"), e.to_string()))?
    };
    let audience = match raw.audience {
        // The token endpoint URL, or with discovery the issuer (draft-ietf-oauth-rfc7523bis).
        OneOrMany::None => {
            AssertionAudience::One(profile.token_url.clone().or_else(|| profile.issuer.clone()).unwrap_or_default())
        }
        OneOrMany::One(aud) => AssertionAudience::One(aud),
        OneOrMany::Many(auds) => AssertionAudience::Many(auds),
    };
    let mut extra_header = raw.headers;
    if let Some(kid) = raw.kid {
        extra_header.insert("kid".into(), serde_json::Value::from(kid));
    }
    let template = AssertionTemplate {
        issuer: raw.issuer.unwrap_or_else(|| profile.client_id.clone()),
        subject: raw.subject.unwrap_or_else(|| profile.client_id.clone()),
        audience,
        lifetime_s: raw.lifetime_s.unwrap_or(DEFAULT_ASSERTION_LIFETIME_S),
        include_nbf: raw.include_nbf,
        extra_header,
        extra_claims: raw.claims,
    };
    template.validate().map_err(|e| ConfigError::new(at("jwt"), e.to_string()))?;
    Ok(CompiledJwt { assertion: JwtAssertion { signer, template }, send_client_id: raw.send_client_id.unwrap_or(true) })
}

/// The configured algorithm, or HS256 for `client_secret_jwt` and RS256 otherwise.
fn jwt_algorithm(name: Option<&str>, method: AuthMethod, at: At) -> Result<JwtAlgorithm, ConfigError> {
    match name {
        Some(name) => JwtAlgorithm::parse(name).ok_or_else(|| {
            ConfigError::new(
                at("jwt.algorithm"),
                format!(
                    "unknown algorithm {name:?}; one of {}",
                    JwtAlgorithm::ALL.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
                ),
            )
        }),
        None if method == AuthMethod::ClientSecretJwt => Ok(JwtAlgorithm::HS256),
        None => Ok(JwtAlgorithm::RS256),
    }
}

fn hmac_signer(
    algorithm: JwtAlgorithm,
    has_private_key: bool,
    client_secret: Option<&Secret>,
    at: At,
) -> Result<AssertionSigner, ConfigError> {
    if has_private_key {
        return Err(ConfigError::new(
            at("jwt.private_key"),
            format!("{} signs with the client secret; remove private_key", algorithm.name()),
        ));
    }
    let secret = client_secret.ok_or_else(|| {
        ConfigError::new(at("client_secret"), format!("is required to sign {} assertions", algorithm.name()))
    })?;
    AssertionSigner::from_client_secret(algorithm, secret)
        .map_err(|e| ConfigError::new(at("client_secret"), e.to_string()))
}
