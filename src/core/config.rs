//! Plugin configuration: the JSON model, its validation, and the compiled form the filter runs on.
//!
//! `parse` turns the plugin configuration bytes into a [`Config`] or a [`ConfigError`] whose `path`
//! names the offending JSON field (`profiles.billing.token_url`). Unknown fields are errors, so a typo
//! never silently turns a feature off. Secrets given as `{"env": "NAME"}` are resolved here through
//! the lookup the caller passes in (the host reads the VM's environment).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::core::assertion::{
    AssertionAudience, AssertionSigner, AssertionTemplate, JWT_BEARER_GRANT_TYPE, JwtAlgorithm,
};
use crate::core::route::{AuthorityPattern, HeaderCondition, PathMatch, RouteMatcher, RouteTable};
use crate::core::secret::Secret;
use crate::core::url::HttpUrl;

/// A configuration error: the JSON path of the bad field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError { path: path.into(), reason: reason.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { write!(f, "{}", self.reason) } else { write!(f, "{}: {}", self.path, self.reason) }
    }
}

// ---------------------------------------------------------------------------------------------
// The JSON model.

#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Named ways of getting a token. Names use letters, digits, '-', '_' and '.'.
    profiles: BTreeMap<String, RawProfile>,
    #[serde(default)]
    /// Which requests get which profile's token; the first matching route wins, no match means no token.
    routes: Vec<RawRoute>,
    #[serde(default)]
    /// The local reply sent when no token can be had.
    on_failure: RawOnFailure,
    #[serde(default)]
    /// Requests one worker may hold paused waiting for a token (default 1000); beyond it, the failure reply at once.
    max_paused_requests: Option<u32>,
    /// Let Envoy routes choose: route metadata `filter_metadata.oauth2_cc` with `profile` selects a profile and
    /// `disabled: true` opts the route out, before `routes` are consulted (default false; one property read per request).
    #[serde(default)]
    route_metadata: bool,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RawProfile {
    /// The Envoy cluster that reaches the token endpoint (its TLS settings do mTLS).
    cluster: String,
    /// Absolute http(s) URL of the token endpoint: gives the callout's :authority and :path.
    #[serde(default)]
    token_url: Option<String>,
    /// Instead of token_url: the issuer whose OpenID Connect / RFC 8414 metadata names the token endpoint,
    /// read through `cluster` at start-up.
    #[serde(default)]
    issuer: Option<String>,
    /// The OAuth client identifier.
    client_id: String,
    #[serde(default)]
    /// The client secret (client_secret_basic, client_secret_post, client_secret_jwt).
    client_secret: Option<SecretSource>,
    #[serde(default)]
    /// Client authentication at the token endpoint (default client_secret_basic).
    auth_method: AuthMethod,
    #[serde(default)]
    /// grant_type parameter (default client_credentials; urn:ietf:params:oauth:grant-type:jwt-bearer sends a signed assertion).
    grant_type: Option<String>,
    #[serde(default)]
    /// Scopes, sent space-joined as `scope`.
    scopes: Vec<String>,
    #[serde(default)]
    /// `audience` parameter (Auth0, Okta and others).
    audience: Option<String>,
    #[serde(default)]
    /// RFC 8707 resource indicator(s), one `resource` parameter each.
    resource: OneOrMany,
    #[serde(default)]
    /// Extra parameters; one named like a filter parameter (scope, client_id, grant_type...) replaces it.
    params: BTreeMap<String, String>,
    #[serde(default)]
    /// Extra headers on the token request.
    token_request_headers: BTreeMap<String, String>,
    #[serde(default)]
    /// POST (form body, default) or GET (parameters in the query).
    method: TokenMethod,
    #[serde(default)]
    /// Timeout of one token request (default 5000).
    timeout_ms: Option<u64>,
    #[serde(default)]
    /// Longest a request waits for a token before the failure reply (default timeout_ms + 1000).
    max_wait_ms: Option<u64>,
    #[serde(default)]
    /// Field of the token in the response JSON, dotted for nested objects (default access_token).
    token_field: Option<String>,
    #[serde(default)]
    /// Field of the lifetime in seconds, dotted for nested objects (default expires_in).
    expires_in_field: Option<String>,
    #[serde(default)]
    /// Where the token goes on the upstream request.
    inject: RawInject,
    #[serde(default)]
    /// When to refresh and how long a token is trusted.
    refresh: RawRefresh,
    #[serde(default)]
    /// Retry spacing after failed token requests.
    backoff: RawBackoff,
    #[serde(default)]
    /// Upstream statuses that drop the token that was sent, so a new one is fetched (default [401]).
    purge_on_status: Option<Vec<u32>>,
    #[serde(default)]
    /// RFC 7523 assertion settings (private_key_jwt, client_secret_jwt, JWT-bearer grant).
    jwt: Option<RawJwt>,
    /// Token requests allowed per hour (protects IdP quotas; unlimited if absent).
    #[serde(default)]
    max_fetches_per_hour: Option<u32>,
    /// Largest token (or metadata) response body read, in bytes (default 65536); a larger one is a failure.
    #[serde(default)]
    max_response_bytes: Option<usize>,
}

/// Settings of the RFC 7523 assertions (`private_key_jwt`, `client_secret_jwt`, JWT-bearer grant).
#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RawJwt {
    /// JWS algorithm: RS256/384/512, PS256/384/512, ES256, ES384, EdDSA, or HS256/384/512 (client_secret_jwt).
    algorithm: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 RSA, SEC1 EC) for private_key_jwt.
    private_key: Option<SecretSource>,
    /// `kid` header.
    kid: Option<String>,
    #[serde(default)]
    audience: OneOrMany,
    /// `iss` claim (default client_id).
    issuer: Option<String>,
    /// `sub` claim (default client_id).
    subject: Option<String>,
    #[serde(default)]
    /// Extra JOSE header fields (x5t, typ...).
    headers: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    /// Extra claims; iat, exp, nbf and jti are the filter's.
    claims: serde_json::Map<String, serde_json::Value>,
    /// Seconds from iat to exp (default 60).
    lifetime_s: Option<u64>,
    #[serde(default)]
    /// Add nbf = iat.
    include_nbf: bool,
    /// Send client_id in the body next to the assertion (default true).
    send_client_id: Option<bool>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RawInject {
    /// Header name (default authorization).
    header: Option<String>,
    /// Written before the token (default "Bearer "; "" sends the raw token).
    prefix: Option<String>,
    #[serde(default)]
    /// Keep a header the client already sent instead of overwriting it (default false).
    keep_existing: bool,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    /// Fraction of the lifetime after which a background refresh starts (default 0.8).
    ahead_ratio: Option<f64>,
    /// Lifetime assumed when the response has none (default 300).
    default_ttl_s: Option<u64>,
    /// Seconds taken off the lifetime, at most a tenth of it (default 5).
    skew_s: Option<u64>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    /// First retry ceiling (default 1000); doubles per failure.
    base_ms: Option<u64>,
    /// Largest retry ceiling (default 60000); configuration faults such as invalid_client use it at once.
    max_ms: Option<u64>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(rename = "match", default)]
    matcher: RawMatch,
    /// The profile whose token the request gets; null opts the matching requests out.
    profile: Option<String>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RawMatch {
    /// Host pattern: `host`, `host:port` or `*.suffix`; case-insensitive, trailing dot ignored, any port if none given.
    authority: Option<String>,
    /// Path prefix (query excluded).
    path_prefix: Option<String>,
    /// Exact path (query excluded).
    path_exact: Option<String>,
    method: Option<String>,
    /// Envoy's route name (xds.route_name).
    route_name: Option<String>,
    #[serde(default)]
    /// Headers that must be present (and equal `value` when given).
    headers: Vec<RawHeaderMatch>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RawHeaderMatch {
    name: String,
    value: Option<String>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct RawOnFailure {
    /// HTTP status of the failure reply (default 503).
    status: Option<u32>,
}

/// A string or a list of strings (`"resource": "https://a"` or `["https://a", "https://b"]`).
#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(value) => vec![value],
            OneOrMany::Many(values) => values,
        }
    }
}

/// Where a secret comes from: inline in the configuration, or an environment variable of the VM.
#[derive(Clone)]
pub enum SecretSource {
    Inline(Secret),
    Env(String),
}

#[cfg(test)]
impl schemars::JsonSchema for SecretSource {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SecretSource".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A secret: inline, or {\"env\": \"NAME\"} to read the VM's environment variable NAME (vm_config.environment_variables).",
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "object", "properties": {"env": {"type": "string", "minLength": 1}}, "required": ["env"], "additionalProperties": false}
            ]
        })
    }
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;
        impl<'de> Visitor<'de> for SecretVisitor {
            type Value = SecretSource;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a string, or {"env": "VARIABLE_NAME"}"#)
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<SecretSource, E> {
                Ok(SecretSource::Inline(Secret::new(value)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
                let mut name: Option<String> = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "env" {
                        return Err(de::Error::unknown_field(&key, &["env"]));
                    }
                    if name.is_some() {
                        return Err(de::Error::duplicate_field("env"));
                    }
                    name = Some(map.next_value()?);
                }
                name.map(SecretSource::Env).ok_or_else(|| de::Error::missing_field("env"))
            }
        }
        deserializer.deserialize_any(SecretVisitor)
    }
}

/// How the client authenticates to the token endpoint.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// RFC 6749 §2.3.1: HTTP Basic with the form-urlencoded id and secret.
    #[default]
    ClientSecretBasic,
    /// RFC 6749 §2.3.1: `client_id` and `client_secret` in the request body.
    ClientSecretPost,
    /// `client_id` only: the client is authenticated otherwise (mTLS at the cluster).
    None,
    /// RFC 8705 mutual TLS: like `none` on the wire; the certificate is the cluster's.
    TlsClientAuth,
    /// RFC 7523 §2.2: a JWT signed with HMAC over the client secret.
    ClientSecretJwt,
    /// RFC 7523 §2.2: a JWT signed with the client's private key.
    PrivateKeyJwt,
}

impl AuthMethod {
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::None => "none",
            AuthMethod::TlsClientAuth => "tls_client_auth",
            AuthMethod::ClientSecretJwt => "client_secret_jwt",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
        }
    }

    fn needs_client_secret(self) -> bool {
        matches!(self, AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost | AuthMethod::ClientSecretJwt)
    }
}

/// The HTTP method of the token request.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum TokenMethod {
    #[default]
    #[serde(alias = "post")]
    POST,
    #[serde(alias = "get")]
    GET,
}

// ---------------------------------------------------------------------------------------------
// The compiled configuration.

/// The validated configuration the filter runs on.
#[derive(Debug)]
pub struct Config {
    pub profiles: Vec<Profile>,
    pub routes: RouteTable,
    pub failure_status: u32,
    /// Requests one VM (worker) may hold paused waiting for a token; beyond it, the failure reply.
    pub max_paused_requests: usize,
}

/// Where the token endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEndpoint {
    Fixed(HttpUrl),
    /// Read from the issuer's metadata at start-up.
    Discovered {
        issuer: String,
        issuer_url: HttpUrl,
    },
}

/// The client authentication a profile uses, with the secret it needs.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    Basic {
        secret: Secret,
    },
    Post {
        secret: Secret,
    },
    /// `none` and `tls_client_auth`: only `client_id` is sent.
    ClientIdOnly,
    /// `client_secret_jwt` and `private_key_jwt`: a fresh signed assertion per token request.
    Jwt {
        assertion: JwtAssertion,
        send_client_id: bool,
    },
}

/// How to make the RFC 7523 assertions of a profile: the checked key and the fixed claims.
#[derive(Debug, Clone)]
pub struct JwtAssertion {
    pub signer: AssertionSigner,
    pub template: AssertionTemplate,
}

pub const DEFAULT_ASSERTION_LIFETIME_S: u64 = 60;

/// One named way of getting a token.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub cluster: String,
    pub endpoint: TokenEndpoint,
    pub client_id: String,
    pub auth_method: AuthMethod,
    pub client_auth: ClientAuth,
    pub grant_type: String,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub resources: Vec<String>,
    /// Extra body/query parameters; a name given here replaces the filter's own parameter.
    pub params: Vec<(String, String)>,
    pub request_headers: Vec<(String, String)>,
    pub method: TokenMethod,
    pub timeout_ms: u64,
    pub max_wait_ms: u64,
    pub token_field: FieldPath,
    pub expires_in_field: FieldPath,
    pub inject: Injection,
    pub lifetime: LifetimePolicy,
    pub backoff: BackoffPolicy,
    /// Token requests allowed per hour, if limited.
    pub max_fetches_per_hour: Option<u32>,
    /// Largest response body read.
    pub max_response_bytes: usize,
    /// RFC 7523 §2.1 JWT-bearer grant: the assertion sent as `assertion`.
    pub grant_assertion: Option<JwtAssertion>,
    /// Upstream statuses that mean "this token was rejected": the cached token is dropped.
    pub purge_on_status: Vec<u32>,
    /// The shared-data key of this profile's cache entry; changes when what the token depends on changes.
    pub cache_key: String,
}

/// Where the token goes on the upstream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    /// Lower-case header name.
    pub header: String,
    pub prefix: String,
    pub keep_existing: bool,
}

/// How a token's lifetime is turned into refresh and expiry times.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LifetimePolicy {
    /// Fraction of the lifetime after which a background refresh starts.
    pub ahead_ratio: f64,
    /// Lifetime assumed when the IdP sends no `expires_in`.
    pub default_ttl_s: u64,
    /// Safety margin taken off the lifetime (capped at a tenth of it for short-lived tokens).
    pub skew_s: u64,
}

/// Retry spacing after failed token requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub base_ms: u64,
    pub max_ms: u64,
}

/// A dotted path into a JSON object (`data.token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(pub Vec<String>);

impl FieldPath {
    fn parse(path: &str) -> Option<FieldPath> {
        let parts: Vec<String> = path.split('.').map(str::to_string).collect();
        if parts.iter().any(String::is_empty) {
            return None;
        }
        Some(FieldPath(parts))
    }

    pub fn display(&self) -> String {
        self.0.join(".")
    }
}

pub const DEFAULT_GRANT_TYPE: &str = "client_credentials";
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_AHEAD_RATIO: f64 = 0.8;
pub const DEFAULT_TTL_S: u64 = 300;
pub const DEFAULT_SKEW_S: u64 = 5;
pub const DEFAULT_BACKOFF_BASE_MS: u64 = 1_000;
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 60_000;
pub const DEFAULT_FAILURE_STATUS: u32 = 503;
pub const DEFAULT_MAX_PAUSED_REQUESTS: usize = 1_000;
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;
const MAX_RESPONSE_BYTES_LIMIT: usize = 1024 * 1024;
/// Upper bound for any configured duration: a day is far beyond any sane timeout or wait.
const MAX_DURATION_MS: u64 = 86_400_000;

/// Parses and validates the plugin configuration. `env` looks up the VM's environment variables.
pub fn parse(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let raw: RawConfig = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ConfigError::new(path, strip_position(&err.into_inner().to_string()))
    })?;
    deserializer.end().map_err(|err| ConfigError::new("", strip_position(&err.to_string())))?;
    compile(raw, env)
}

/// serde_json appends " at line L column C" to its messages; the JSON path says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(index) => message[..index].to_string(),
        None => message.to_string(),
    }
}

fn compile(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    if raw.profiles.is_empty() {
        return Err(ConfigError::new("profiles", "at least one profile is required"));
    }
    let mut profiles = Vec::with_capacity(raw.profiles.len());
    for (name, raw_profile) in raw.profiles {
        profiles.push(compile_profile(name, raw_profile, env)?);
    }
    let mut matchers = Vec::with_capacity(raw.routes.len());
    for (index, route) in raw.routes.into_iter().enumerate() {
        matchers.push(compile_route(index, route, &profiles)?);
    }
    let failure_status = raw.on_failure.status.unwrap_or(DEFAULT_FAILURE_STATUS);
    if !(400..=599).contains(&failure_status) {
        return Err(ConfigError::new("on_failure.status", "must be an HTTP error status from 400 to 599"));
    }
    let max_paused_requests = raw.max_paused_requests.map_or(DEFAULT_MAX_PAUSED_REQUESTS, |n| n as usize);
    // Bounded so the same configuration is valid on 64-bit hosts and in the 32-bit filter.
    if !(1..=1_000_000).contains(&max_paused_requests) {
        return Err(ConfigError::new("max_paused_requests", "must be from 1 to 1000000"));
    }
    let mut routes = RouteTable::new(matchers);
    if raw.route_metadata {
        routes = routes.with_route_metadata(profiles.iter().map(|p| p.name.clone()).collect());
    }
    Ok(Config { profiles, routes, failure_status, max_paused_requests })
}

fn compile_profile(
    name: String,
    mut raw: RawProfile,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Profile, ConfigError> {
    let at = |field: &str| format!("profiles.{name}.{field}");
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(ConfigError::new(
            format!("profiles.{name}"),
            "a profile name uses only letters, digits, '-', '_' and '.'",
        ));
    }
    if raw.cluster.trim().is_empty() {
        return Err(ConfigError::new(at("cluster"), "must name the Envoy cluster of the token endpoint"));
    }
    let endpoint = match (raw.token_url.as_deref(), raw.issuer.as_deref()) {
        (Some(url), None) => {
            TokenEndpoint::Fixed(HttpUrl::parse(url).map_err(|e| ConfigError::new(at("token_url"), e.to_string()))?)
        }
        (None, Some(issuer)) => {
            let issuer_url = HttpUrl::parse(issuer).map_err(|e| ConfigError::new(at("issuer"), e.to_string()))?;
            if issuer_url.path_and_query.contains('?') {
                return Err(ConfigError::new(at("issuer"), "an issuer has no query (RFC 8414 §2)"));
            }
            TokenEndpoint::Discovered { issuer: issuer.to_string(), issuer_url }
        }
        (None, None) => {
            return Err(ConfigError::new(at("token_url"), "is required (or give issuer for discovery)"));
        }
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(at("issuer"), "give token_url or issuer, not both"));
        }
    };
    if raw.client_id.is_empty() {
        return Err(ConfigError::new(at("client_id"), "must not be empty"));
    }

    let secret = match raw.client_secret.take() {
        Some(source) => Some(resolve_secret(source, &at("client_secret"), env)?),
        None => None,
    };
    let grant_type = raw.grant_type.take().unwrap_or_else(|| DEFAULT_GRANT_TYPE.to_string());
    let jwt_bearer_grant = grant_type == JWT_BEARER_GRANT_TYPE;
    let uses_jwt =
        matches!(raw.auth_method, AuthMethod::ClientSecretJwt | AuthMethod::PrivateKeyJwt) || jwt_bearer_grant;
    let jwt = match (raw.jwt.take(), uses_jwt) {
        (Some(jwt), true) => Some(compile_jwt(jwt, &raw, secret.as_ref(), &at, env)?),
        (None, true) if raw.auth_method == AuthMethod::ClientSecretJwt => {
            Some(compile_jwt(RawJwt::default(), &raw, secret.as_ref(), &at, env)?)
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
    let client_auth = match (raw.auth_method, secret) {
        (AuthMethod::ClientSecretBasic, Some(secret)) => ClientAuth::Basic { secret },
        (AuthMethod::ClientSecretPost, Some(secret)) => ClientAuth::Post { secret },
        (method, None) if method.needs_client_secret() => {
            return Err(ConfigError::new(
                at("client_secret"),
                format!("is required with auth_method {}", method.name()),
            ));
        }
        (AuthMethod::ClientSecretJwt | AuthMethod::PrivateKeyJwt, _) => match &jwt {
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
    };
    let grant_assertion = if jwt_bearer_grant { jwt.as_ref().map(|j| j.assertion.clone()) } else { None };

    if grant_type.is_empty() {
        return Err(ConfigError::new(at("grant_type"), "must not be empty"));
    }
    for (index, scope) in raw.scopes.iter().enumerate() {
        if scope.is_empty() || scope.contains(' ') {
            return Err(ConfigError::new(
                format!("{}[{index}]", at("scopes")),
                "a scope is one non-empty word without spaces (RFC 6749 §3.3)",
            ));
        }
    }
    let resources = raw.resource.into_vec();
    for (index, resource) in resources.iter().enumerate() {
        if HttpUrl::parse(resource).is_err() && !resource.contains(':') {
            return Err(ConfigError::new(
                format!("{}[{index}]", at("resource")),
                "a resource is an absolute URI (RFC 8707)",
            ));
        }
    }
    for key in raw.params.keys() {
        if key.is_empty() {
            return Err(ConfigError::new(at("params"), "a parameter name must not be empty"));
        }
    }
    let mut request_headers = Vec::with_capacity(raw.token_request_headers.len());
    for (header, value) in raw.token_request_headers {
        let path = format!("{}.{header}", at("token_request_headers"));
        let lower =
            valid_header_name(&header).ok_or_else(|| ConfigError::new(&path, "not a valid HTTP header name"))?;
        if lower.starts_with(':') || matches!(lower.as_str(), "host" | "content-length" | "transfer-encoding") {
            return Err(ConfigError::new(&path, "this header is set by the filter or Envoy"));
        }
        if !valid_header_value(&value) {
            return Err(ConfigError::new(&path, "the value contains a control character"));
        }
        request_headers.push((lower, value));
    }

    let timeout_ms = duration(raw.timeout_ms, DEFAULT_TIMEOUT_MS, &at("timeout_ms"))?;
    let max_wait_ms = duration(raw.max_wait_ms, timeout_ms + 1_000, &at("max_wait_ms"))?;

    let token_field = field_path(raw.token_field.as_deref().unwrap_or("access_token"), &at("token_field"))?;
    let expires_in_field =
        field_path(raw.expires_in_field.as_deref().unwrap_or("expires_in"), &at("expires_in_field"))?;

    let inject = {
        let header = raw.inject.header.unwrap_or_else(|| "authorization".to_string());
        let header = valid_header_name(&header)
            .filter(|h| !h.starts_with(':') && h != "host")
            .ok_or_else(|| ConfigError::new(at("inject.header"), "not a header name the filter may set"))?;
        let prefix = raw.inject.prefix.unwrap_or_else(|| "Bearer ".to_string());
        if !valid_header_value(&prefix) {
            return Err(ConfigError::new(at("inject.prefix"), "contains a control character"));
        }
        Injection { header, prefix, keep_existing: raw.inject.keep_existing }
    };

    let lifetime = LifetimePolicy {
        ahead_ratio: raw.refresh.ahead_ratio.unwrap_or(DEFAULT_AHEAD_RATIO),
        default_ttl_s: raw.refresh.default_ttl_s.unwrap_or(DEFAULT_TTL_S),
        skew_s: raw.refresh.skew_s.unwrap_or(DEFAULT_SKEW_S),
    };
    if !(lifetime.ahead_ratio > 0.0 && lifetime.ahead_ratio <= 1.0) {
        return Err(ConfigError::new(at("refresh.ahead_ratio"), "must be greater than 0 and at most 1"));
    }
    if lifetime.default_ttl_s == 0 || lifetime.default_ttl_s > 86_400 * 365 {
        return Err(ConfigError::new(at("refresh.default_ttl_s"), "must be from 1 second to a year"));
    }
    if lifetime.skew_s > 3_600 {
        return Err(ConfigError::new(at("refresh.skew_s"), "must be at most 3600 seconds"));
    }

    let backoff = BackoffPolicy {
        base_ms: duration(raw.backoff.base_ms, DEFAULT_BACKOFF_BASE_MS, &at("backoff.base_ms"))?,
        max_ms: duration(raw.backoff.max_ms, DEFAULT_BACKOFF_MAX_MS, &at("backoff.max_ms"))?,
    };
    if backoff.max_ms < backoff.base_ms {
        return Err(ConfigError::new(at("backoff.max_ms"), "must be at least backoff.base_ms"));
    }

    let purge_on_status = raw.purge_on_status.unwrap_or_else(|| vec![401]);
    if let Some(bad) = purge_on_status.iter().position(|s| !(100..=599).contains(s)) {
        return Err(ConfigError::new(format!("{}[{bad}]", at("purge_on_status")), "not an HTTP status"));
    }

    let max_response_bytes = raw.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
    if !(256..=MAX_RESPONSE_BYTES_LIMIT).contains(&max_response_bytes) {
        return Err(ConfigError::new(at("max_response_bytes"), "must be from 256 bytes to 1 MiB"));
    }
    if raw.max_fetches_per_hour == Some(0) {
        return Err(ConfigError::new(at("max_fetches_per_hour"), "must be at least 1 (omit it for no limit)"));
    }

    let params: Vec<(String, String)> = raw.params.into_iter().collect();
    let cache_key = cache_key(
        &name,
        &[
            &raw.cluster,
            raw.token_url.as_deref().or(raw.issuer.as_deref()).unwrap_or_default(),
            &raw.client_id,
            raw.auth_method.name(),
            &grant_type,
            &raw.scopes.join(" "),
            raw.audience.as_deref().unwrap_or(""),
            &resources.join(" "),
            &params.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"),
            &token_field.display(),
            // With the JWT-bearer grant, the assertion's claims say whose token it is.
            &grant_assertion
                .as_ref()
                .map(|a| {
                    format!("{:?}|{:?}|{:?}", a.template.issuer, a.template.subject, a.template.audience)
                        + &serde_json::Value::Object(a.template.extra_claims.clone()).to_string()
                })
                .unwrap_or_default(),
        ],
    );

    Ok(Profile {
        name,
        cluster: raw.cluster,
        endpoint,
        client_id: raw.client_id,
        auth_method: raw.auth_method,
        client_auth,
        grant_type,
        scopes: raw.scopes,
        audience: raw.audience,
        resources,
        params,
        request_headers,
        method: raw.method,
        timeout_ms,
        max_wait_ms,
        token_field,
        expires_in_field,
        inject,
        lifetime,
        backoff,
        max_fetches_per_hour: raw.max_fetches_per_hour,
        max_response_bytes,
        grant_assertion,
        purge_on_status,
        cache_key,
    })
}

struct CompiledJwt {
    assertion: JwtAssertion,
    send_client_id: bool,
}

fn compile_jwt(
    raw: RawJwt,
    profile: &RawProfile,
    client_secret: Option<&Secret>,
    at: &dyn Fn(&str) -> String,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<CompiledJwt, ConfigError> {
    let hmac_default = profile.auth_method == AuthMethod::ClientSecretJwt;
    let algorithm = match &raw.algorithm {
        Some(name) => JwtAlgorithm::parse(name).ok_or_else(|| {
            ConfigError::new(
                at("jwt.algorithm"),
                format!(
                    "unknown algorithm {name:?}; one of {}",
                    JwtAlgorithm::ALL.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
                ),
            )
        })?,
        None if hmac_default => JwtAlgorithm::HS256,
        None => JwtAlgorithm::RS256,
    };
    let signer = if algorithm.is_hmac() {
        if raw.private_key.is_some() {
            return Err(ConfigError::new(
                at("jwt.private_key"),
                format!("{} signs with the client secret; remove private_key", algorithm.name()),
            ));
        }
        let secret = client_secret.ok_or_else(|| {
            ConfigError::new(at("client_secret"), format!("is required to sign {} assertions", algorithm.name()))
        })?;
        AssertionSigner::from_client_secret(algorithm, secret)
            .map_err(|e| ConfigError::new(at("client_secret"), e.to_string()))?
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

fn compile_route(index: usize, raw: RawRoute, profiles: &[Profile]) -> Result<RouteMatcher, ConfigError> {
    let at = |field: &str| format!("routes[{index}].{field}");
    let profile = match raw.profile {
        Some(name) => Some(
            profiles
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| ConfigError::new(at("profile"), format!("no profile is named {name:?}")))?,
        ),
        None => None,
    };
    let m = raw.matcher;
    let authority = match m.authority {
        Some(pattern) => Some(
            AuthorityPattern::parse(&pattern)
                .ok_or_else(|| ConfigError::new(at("match.authority"), "not a host[:port] or *.suffix pattern"))?,
        ),
        None => None,
    };
    let path = match (m.path_prefix, m.path_exact) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(at("match"), "give path_prefix or path_exact, not both"));
        }
        (Some(prefix), None) => {
            if !prefix.starts_with('/') {
                return Err(ConfigError::new(at("match.path_prefix"), "must start with '/'"));
            }
            // Every path starts with "/": no need to read :path for it on each request.
            if prefix == "/" { PathMatch::Any } else { PathMatch::Prefix(prefix) }
        }
        (None, Some(exact)) => {
            if !exact.starts_with('/') {
                return Err(ConfigError::new(at("match.path_exact"), "must start with '/'"));
            }
            PathMatch::Exact(exact)
        }
        (None, None) => PathMatch::Any,
    };
    let method = match m.method {
        Some(method) if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) => {
            return Err(ConfigError::new(at("match.method"), "not an HTTP method"));
        }
        Some(method) => Some(method.to_ascii_uppercase()),
        None => None,
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for (h_index, header) in m.headers.into_iter().enumerate() {
        let name = valid_header_name(&header.name).ok_or_else(|| {
            ConfigError::new(at(&format!("match.headers[{h_index}].name")), "not a valid HTTP header name")
        })?;
        headers.push(HeaderCondition { name, value: header.value });
    }
    Ok(RouteMatcher { authority, path, method, headers, route_name: m.route_name, profile })
}

fn resolve_secret(
    source: SecretSource,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    let secret = match source {
        SecretSource::Inline(secret) => secret,
        SecretSource::Env(name) => match env(&name) {
            Some(value) => Secret::new(value),
            None => {
                return Err(ConfigError::new(
                    path,
                    format!("environment variable {name:?} is not set for the VM (vm_config.environment_variables)"),
                ));
            }
        },
    };
    if secret.is_empty() {
        return Err(ConfigError::new(path, "is empty"));
    }
    Ok(secret)
}

fn duration(value: Option<u64>, default: u64, path: &str) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::new(path, "must be greater than 0")),
        Some(ms) if ms > MAX_DURATION_MS => Err(ConfigError::new(path, "must be at most a day")),
        Some(ms) => Ok(ms),
    }
}

fn field_path(path: &str, at: &str) -> Result<FieldPath, ConfigError> {
    FieldPath::parse(path).ok_or_else(|| ConfigError::new(at, "a field path is names joined by '.', none empty"))
}

/// An HTTP header name (RFC 9110 token), lower-cased; `None` if it is not one.
pub fn valid_header_name(name: &str) -> Option<String> {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// A header value Envoy will accept as is: no CR, LF, NUL or other control characters but tab.
pub fn valid_header_value(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// The shared-data key of a profile: name plus a fingerprint of what the token depends on, so a
/// configuration change that asks for a different token never serves the old one.
fn cache_key(profile: &str, parts: &[&str]) -> String {
    // FNV-1a: stable across builds and platforms, and good enough to tell configurations apart.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("oauth2_cc.v1.token.{profile}.{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn minimal() -> serde_json::Value {
        json!({
            "profiles": {"billing": {"cluster": "idp", "token_url": "https://idp.example.com/oauth2/token",
                                     "client_id": "svc-a", "client_secret": "s3cret"}},
            "routes": [{"match": {"path_prefix": "/"}, "profile": "billing"}]
        })
    }

    fn parse_value(value: &serde_json::Value) -> Result<Config, ConfigError> {
        parse(value.to_string().as_bytes(), &no_env)
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse_value(&minimal()).expect("valid");
        let profile = &config.profiles[0];
        assert_eq!(profile.auth_method, AuthMethod::ClientSecretBasic);
        assert!(matches!(profile.client_auth, ClientAuth::Basic { .. }));
        assert_eq!(profile.grant_type, "client_credentials");
        assert_eq!(profile.method, TokenMethod::POST);
        assert_eq!(profile.timeout_ms, 5_000);
        assert_eq!(profile.max_wait_ms, 6_000);
        assert_eq!(profile.token_field, FieldPath(vec!["access_token".into()]));
        assert_eq!(
            profile.inject,
            Injection { header: "authorization".into(), prefix: "Bearer ".into(), keep_existing: false }
        );
        assert_eq!(profile.lifetime, LifetimePolicy { ahead_ratio: 0.8, default_ttl_s: 300, skew_s: 5 });
        assert_eq!(profile.backoff, BackoffPolicy { base_ms: 1_000, max_ms: 60_000 });
        assert_eq!(config.failure_status, 503);
        assert!(profile.cache_key.starts_with("oauth2_cc.v1.token.billing."));
    }

    #[test]
    fn secret_from_environment() {
        let mut config = minimal();
        config["profiles"]["billing"]["client_secret"] = json!({"env": "BILLING_SECRET"});
        let env = |name: &str| (name == "BILLING_SECRET").then(|| "from-env".to_string());
        let parsed = parse(config.to_string().as_bytes(), &env).expect("valid");
        match &parsed.profiles[0].client_auth {
            ClientAuth::Basic { secret } => assert_eq!(secret.expose(), "from-env"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn cache_key_changes_with_what_the_token_depends_on() {
        let base = parse_value(&minimal()).expect("valid").profiles[0].cache_key.clone();
        let mut scoped = minimal();
        scoped["profiles"]["billing"]["scopes"] = json!(["read"]);
        let other = parse_value(&scoped).expect("valid").profiles[0].cache_key.clone();
        assert_ne!(base, other);
        let grant = |subject: &str| {
            let mut c = jwt_profile("none", json!({"private_key": RSA_KEY, "subject": subject}));
            c["profiles"]["billing"]["grant_type"] = json!(JWT_BEARER_GRANT_TYPE);
            c["profiles"]["billing"].as_object_mut().map(|p| p.remove("client_secret"));
            parse_value(&c).expect("valid").profiles[0].cache_key.clone()
        };
        assert_ne!(grant("user-42"), grant("user-43"), "the grant's subject decides whose token it is");
        let mut injected = minimal();
        injected["profiles"]["billing"]["inject"] = json!({"header": "x-token"});
        assert_eq!(base, parse_value(&injected).expect("valid").profiles[0].cache_key);
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let config = parse_value(&minimal()).expect("valid");
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("[redacted]"));
    }

    /// Each bad configuration is refused with the JSON path of the field at fault.
    #[test]
    fn bad_configs_name_the_field() {
        type Edit = fn(&mut serde_json::Value);
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "unknown auth method",
                |c| c["profiles"]["billing"]["auth_method"] = json!("magic"),
                "profiles.billing.auth_method",
            ),
            (
                "missing token_url",
                |c| {
                    c["profiles"]["billing"].as_object_mut().map(|p| p.remove("token_url"));
                },
                "profiles.billing.token_url",
            ),
            ("route names unknown profile", |c| c["routes"][0]["profile"] = json!("nope"), "routes[0].profile"),
            ("bad URL", |c| c["profiles"]["billing"]["token_url"] = json!("idp/token"), "profiles.billing.token_url"),
            (
                "negative TTL",
                |c| c["profiles"]["billing"]["refresh"] = json!({"default_ttl_s": -5}),
                "profiles.billing.refresh.default_ttl_s",
            ),
            ("unknown field", |c| c["profiles"]["billing"]["tokne_url"] = json!("x"), "profiles.billing.tokne_url"),
            ("unknown top-level field", |c| c["rotues"] = json!([]), "rotues"),
            (
                "missing secret",
                |c| {
                    c["profiles"]["billing"].as_object_mut().map(|p| p.remove("client_secret"));
                },
                "profiles.billing.client_secret",
            ),
            (
                "env secret not set",
                |c| c["profiles"]["billing"]["client_secret"] = json!({"env": "NOPE"}),
                "profiles.billing.client_secret",
            ),
            (
                "ahead ratio out of range",
                |c| c["profiles"]["billing"]["refresh"] = json!({"ahead_ratio": 1.5}),
                "profiles.billing.refresh.ahead_ratio",
            ),
            ("zero timeout", |c| c["profiles"]["billing"]["timeout_ms"] = json!(0), "profiles.billing.timeout_ms"),
            ("bad method", |c| c["profiles"]["billing"]["method"] = json!("PUT"), "profiles.billing.method"),
            (
                "bad inject header",
                |c| c["profiles"]["billing"]["inject"] = json!({"header": "bad header"}),
                "profiles.billing.inject.header",
            ),
            ("scope with space", |c| c["profiles"]["billing"]["scopes"] = json!(["a b"]), "profiles.billing.scopes[0]"),
            ("failure status not an error", |c| c["on_failure"] = json!({"status": 200}), "on_failure.status"),
            ("no profiles", |c| c["profiles"] = json!({}), "profiles"),
            (
                "path prefix without slash",
                |c| c["routes"][0]["match"]["path_prefix"] = json!("v1"),
                "routes[0].match.path_prefix",
            ),
            (
                "header value with newline",
                |c| c["profiles"]["billing"]["token_request_headers"] = json!({"x-api-key": "a\nb"}),
                "profiles.billing.token_request_headers.x-api-key",
            ),
            (
                "empty field path",
                |c| c["profiles"]["billing"]["token_field"] = json!("data..token"),
                "profiles.billing.token_field",
            ),
            ("wrong type", |c| c["profiles"]["billing"]["scopes"] = json!("read"), "profiles.billing.scopes"),
            (
                "secret with none",
                |c| c["profiles"]["billing"]["auth_method"] = json!("none"),
                "profiles.billing.client_secret",
            ),
        ];
        for (what, edit, path) in cases {
            let mut config = minimal();
            edit(&mut config);
            let err = parse_value(&config).expect_err(what);
            assert_eq!(err.path, path, "{what}: {err}");
            assert!(!err.to_string().contains("s3cret"), "{what}: {err}");
        }
    }

    fn jwt_profile(auth_method: &str, jwt: serde_json::Value) -> serde_json::Value {
        let mut config = minimal();
        config["profiles"]["billing"]["auth_method"] = json!(auth_method);
        if auth_method == "private_key_jwt" {
            config["profiles"]["billing"].as_object_mut().map(|p| p.remove("client_secret"));
        }
        config["profiles"]["billing"]["jwt"] = jwt;
        config
    }

    const RSA_KEY: &str = include_str!("../../tests/fixtures/keys/rsa_pkcs8.pem");
    const EC_KEY: &str = include_str!("../../tests/fixtures/keys/ec_p256_pkcs8.pem");

    #[test]
    fn jwt_client_auth_compiles() {
        let config = parse_value(&jwt_profile(
            "private_key_jwt",
            json!({"algorithm": "ES256", "private_key": EC_KEY, "kid": "k1"}),
        ))
        .expect("valid");
        match &config.profiles[0].client_auth {
            ClientAuth::Jwt { assertion, send_client_id } => {
                assert_eq!(assertion.signer.algorithm(), JwtAlgorithm::ES256);
                assert_eq!(
                    assertion.template.audience,
                    AssertionAudience::One("https://idp.example.com/oauth2/token".into())
                );
                assert_eq!(assertion.template.issuer, "svc-a");
                assert_eq!(assertion.template.lifetime_s, 60);
                assert_eq!(assertion.template.extra_header.get("kid"), Some(&json!("k1")));
                assert!(*send_client_id);
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut hs = minimal();
        hs["profiles"]["billing"]["auth_method"] = json!("client_secret_jwt");
        hs["profiles"]["billing"]["client_secret"] = json!("x".repeat(32));
        let config = parse_value(&hs).expect("valid");
        assert!(
            matches!(&config.profiles[0].client_auth, ClientAuth::Jwt { assertion, .. } if assertion.signer.algorithm() == JwtAlgorithm::HS256)
        );
        let grant = jwt_profile("none", json!({"private_key": RSA_KEY, "subject": "user-1"}));
        let mut grant = grant;
        grant["profiles"]["billing"]["grant_type"] = json!(JWT_BEARER_GRANT_TYPE);
        grant["profiles"]["billing"].as_object_mut().map(|p| p.remove("client_secret"));
        let config = parse_value(&grant).expect("valid");
        let profile = &config.profiles[0];
        assert_eq!(profile.grant_assertion.as_ref().map(|a| a.template.subject.as_str()), Some("user-1"));
        assert!(matches!(profile.client_auth, ClientAuth::ClientIdOnly));
        assert!(!format!("{config:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn bad_jwt_settings_name_the_field() {
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            (
                "malformed key",
                jwt_profile(
                    "private_key_jwt",
                    json!({"private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----"}),
                ),
                "profiles.billing.jwt.private_key",
            ),
            (
                "RSA key with ES256",
                jwt_profile("private_key_jwt", json!({"algorithm": "ES256", "private_key": RSA_KEY})),
                "profiles.billing.jwt.private_key",
            ),
            (
                "unknown algorithm",
                jwt_profile("private_key_jwt", json!({"algorithm": "RS999", "private_key": RSA_KEY})),
                "profiles.billing.jwt.algorithm",
            ),
            (
                "missing key",
                jwt_profile("private_key_jwt", json!({"algorithm": "RS256"})),
                "profiles.billing.jwt.private_key",
            ),
            (
                "no jwt block",
                {
                    let mut c = jwt_profile("private_key_jwt", json!(null));
                    c["profiles"]["billing"].as_object_mut().map(|p| p.remove("jwt"));
                    c
                },
                "profiles.billing.jwt",
            ),
            (
                "reserved claim",
                jwt_profile("private_key_jwt", json!({"private_key": RSA_KEY, "claims": {"exp": 1}})),
                "profiles.billing.jwt",
            ),
            (
                "jwt without jwt auth",
                jwt_profile("client_secret_basic", json!({"private_key": RSA_KEY})),
                "profiles.billing.jwt",
            ),
            (
                "short HS secret",
                {
                    let mut c = minimal();
                    c["profiles"]["billing"]["auth_method"] = json!("client_secret_jwt");
                    c
                },
                "profiles.billing.client_secret",
            ),
            (
                "asymmetric alg for client_secret_jwt",
                {
                    let mut c = minimal();
                    c["profiles"]["billing"]["auth_method"] = json!("client_secret_jwt");
                    c["profiles"]["billing"]["jwt"] = json!({"algorithm": "RS256"});
                    c
                },
                "profiles.billing.jwt.algorithm",
            ),
        ];
        for (what, config, path) in cases {
            let err = parse_value(&config).expect_err(what);
            assert_eq!(err.path, path, "{what}: {err}");
            assert!(!err.to_string().contains("PRIVATE KEY"), "{what}: {err}");
        }
    }

    /// The committed JSON Schema matches the Rust types; `make schema` rewrites it.
    #[test]
    fn json_schema_is_up_to_date() {
        let mut schema =
            schemars::generate::SchemaSettings::draft2020_12().into_generator().into_root_schema_for::<RawConfig>();
        schema.insert("$id".into(), json!("https://github.com/oauth2-cc/oauth2-cc/schema/oauth2-cc.schema.json"));
        schema.insert("title".into(), json!("oauth2-cc plugin configuration"));
        let text = serde_json::to_string_pretty(&schema).expect("serializable") + "\n";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema/oauth2-cc.schema.json");
        if std::env::var_os("UPDATE_SCHEMA").is_some() {
            std::fs::write(path, &text).expect("schema written");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(committed == text, "schema/oauth2-cc.schema.json is stale: run `make schema`");
    }

    #[test]
    fn not_json_is_refused() {
        let err = parse(b"{not json", &no_env).expect_err("invalid");
        assert!(err.to_string().contains("key must be a string"), "{err}");
        assert!(parse(b"{} trailing", &no_env).is_err());
    }
}
