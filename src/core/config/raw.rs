//! The configuration as written: the serde model of the plugin JSON, from which the JSON Schema
//! (`make schema`) is generated. Nothing here is validated beyond JSON types and field names;
//! `compile` and its section modules turn it into the runtime types of `runtime`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::secret::Secret;

#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    /// Named ways of getting a token. Names use letters, digits, '-', '_' and '.'.
    pub(super) profiles: BTreeMap<String, RawProfile>,
    #[serde(default)]
    /// Which requests get which profile's token; the first matching route wins, no match means no token.
    pub(super) routes: Vec<RawRoute>,
    #[serde(default)]
    /// The local reply sent when no token can be had.
    pub(super) on_failure: RawOnFailure,
    #[serde(default)]
    /// Requests one worker may hold paused waiting for a token (default 1000); beyond it, the failure reply at once.
    pub(super) max_paused_requests: Option<u32>,
    /// Let Envoy routes choose: route metadata `filter_metadata.oauth2_cc` with `profile` selects a profile and
    /// `disabled: true` opts the route out, before `routes` are consulted (default false; one property read per request).
    #[serde(default)]
    pub(super) route_metadata: bool,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
// GET puts every parameter in the URL: only methods whose credentials travel elsewhere may use it.
#[cfg_attr(test, schemars(extend("if" = {"properties": {"method": {"enum": ["GET", "get"]}}, "required": ["method"]},
    "then" = {"properties": {
        "auth_method": {"enum": ["client_secret_basic", "tls_client_auth", "none"]},
        "grant_type": {"not": {"const": "urn:ietf:params:oauth:grant-type:jwt-bearer"}}}})))]
pub(super) struct RawProfile {
    /// The Envoy cluster that reaches the token endpoint (its TLS settings do mTLS).
    pub(super) cluster: String,
    /// Absolute http(s) URL of the token endpoint: gives the callout's :authority and :path.
    #[serde(default)]
    pub(super) token_url: Option<String>,
    /// Instead of token_url: the issuer whose OpenID Connect / RFC 8414 metadata names the token endpoint,
    /// read through `cluster` at start-up.
    #[serde(default)]
    pub(super) issuer: Option<String>,
    /// The OAuth client identifier.
    pub(super) client_id: String,
    #[serde(default)]
    /// The client secret (client_secret_basic, client_secret_post, client_secret_jwt).
    pub(super) client_secret: Option<SecretSource>,
    #[serde(default)]
    /// Client authentication at the token endpoint (default client_secret_basic).
    pub(super) auth_method: AuthMethod,
    #[serde(default)]
    /// grant_type parameter (default client_credentials; urn:ietf:params:oauth:grant-type:jwt-bearer sends a signed assertion).
    pub(super) grant_type: Option<String>,
    #[serde(default)]
    /// Scopes, sent space-joined as `scope`.
    pub(super) scopes: Vec<String>,
    #[serde(default)]
    /// `audience` parameter (Auth0, Okta and others).
    pub(super) audience: Option<String>,
    #[serde(default)]
    /// RFC 8707 resource indicator(s), one `resource` parameter each.
    pub(super) resource: OneOrMany,
    #[serde(default)]
    /// Extra parameters; one named like a filter parameter (scope, client_id, grant_type...) replaces it.
    pub(super) params: BTreeMap<String, String>,
    #[serde(default)]
    /// Extra headers on the token request.
    pub(super) token_request_headers: BTreeMap<String, String>,
    #[serde(default)]
    /// POST (form body, default) or GET (parameters in the query; only with client_secret_basic,
    /// tls_client_auth or none, and not with the JWT-bearer grant: RFC 6749 §2.3.1).
    pub(super) method: TokenMethod,
    #[serde(default)]
    /// Timeout of one token request (default 5000).
    pub(super) timeout_ms: Option<u64>,
    #[serde(default)]
    /// Longest a request waits for a token before the failure reply (default timeout_ms + 1000).
    pub(super) max_wait_ms: Option<u64>,
    #[serde(default)]
    /// Field of the token in the response JSON, dotted for nested objects (default access_token).
    pub(super) token_field: Option<String>,
    #[serde(default)]
    /// Field of the lifetime in seconds, dotted for nested objects (default expires_in).
    pub(super) expires_in_field: Option<String>,
    #[serde(default)]
    /// Where the token goes on the upstream request.
    pub(super) inject: RawInject,
    #[serde(default)]
    /// When to refresh and how long a token is trusted.
    pub(super) refresh: RawRefresh,
    #[serde(default)]
    /// Retry spacing after failed token requests.
    pub(super) backoff: RawBackoff,
    #[serde(default)]
    /// Upstream statuses that drop the token that was sent, so a new one is fetched (default [401]).
    pub(super) purge_on_status: Option<Vec<u32>>,
    #[serde(default)]
    /// RFC 7523 assertion settings (private_key_jwt, client_secret_jwt, JWT-bearer grant).
    pub(super) jwt: Option<RawJwt>,
    /// Token requests allowed per hour (protects IdP quotas; unlimited if absent).
    #[serde(default)]
    pub(super) max_fetches_per_hour: Option<u32>,
    /// Largest token (or metadata) response body read, in bytes (default 65536); a larger one is a failure.
    #[serde(default)]
    pub(super) max_response_bytes: Option<usize>,
}

/// Settings of the RFC 7523 assertions (`private_key_jwt`, `client_secret_jwt`, JWT-bearer grant).
#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwt {
    /// JWS algorithm: RS256/384/512, PS256/384/512, ES256, ES384, EdDSA, or HS256/384/512 (client_secret_jwt).
    pub(super) algorithm: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 RSA, SEC1 EC) for private_key_jwt.
    pub(super) private_key: Option<SecretSource>,
    /// `kid` header.
    pub(super) kid: Option<String>,
    #[serde(default)]
    pub(super) audience: OneOrMany,
    /// `iss` claim (default client_id).
    pub(super) issuer: Option<String>,
    /// `sub` claim (default client_id).
    pub(super) subject: Option<String>,
    #[serde(default)]
    /// Extra JOSE header fields (x5t, typ...).
    pub(super) headers: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    /// Extra claims; iat, exp, nbf and jti are the filter's.
    pub(super) claims: serde_json::Map<String, serde_json::Value>,
    /// Seconds from iat to exp (default 60).
    pub(super) lifetime_s: Option<u64>,
    #[serde(default)]
    /// Add nbf = iat.
    pub(super) include_nbf: bool,
    /// Send client_id in the body next to the assertion (default true).
    pub(super) send_client_id: Option<bool>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawInject {
    /// Header name (default authorization).
    pub(super) header: Option<String>,
    /// Written before the token (default "Bearer "; "" sends the raw token).
    pub(super) prefix: Option<String>,
    #[serde(default)]
    /// Keep a header the client already sent instead of overwriting it (default false).
    pub(super) keep_existing: bool,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawRefresh {
    /// Fraction of the lifetime after which a background refresh starts (default 0.8).
    pub(super) ahead_ratio: Option<f64>,
    /// Lifetime assumed when the response has none (default 300).
    pub(super) default_ttl_s: Option<u64>,
    /// Seconds taken off the lifetime, at most a tenth of it (default 5).
    pub(super) skew_s: Option<u64>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    /// First retry ceiling (default 1000); doubles per failure.
    pub(super) base_ms: Option<u64>,
    /// Largest retry ceiling (default 60000); configuration faults such as invalid_client use it at once.
    pub(super) max_ms: Option<u64>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    #[serde(rename = "match", default)]
    pub(super) matcher: RawMatch,
    /// The profile whose token the request gets; null opts the matching requests out.
    pub(super) profile: Option<String>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    /// Host pattern: `host`, `host:port` or `*.suffix`; case-insensitive, trailing dot ignored, any port if none given.
    pub(super) authority: Option<String>,
    /// Path prefix (query excluded).
    pub(super) path_prefix: Option<String>,
    /// Exact path (query excluded).
    pub(super) path_exact: Option<String>,
    pub(super) method: Option<String>,
    /// Envoy's route name (xds.route_name).
    pub(super) route_name: Option<String>,
    #[serde(default)]
    /// Headers that must be present (and equal `value` when given).
    pub(super) headers: Vec<RawHeaderMatch>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeaderMatch {
    pub(super) name: String,
    pub(super) value: Option<String>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawOnFailure {
    /// HTTP status of the failure reply (default 503).
    pub(super) status: Option<u32>,
}

/// A string or a list of strings (`"resource": "https://a"` or `["https://a", "https://b"]`).
#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(untagged)]
pub(super) enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(value) => vec![value],
            OneOrMany::Many(values) => values,
        }
    }
}

/// Where a secret comes from: inline in the configuration, an environment variable of the VM, or a
/// file (read by the dynamic module, which re-reads it when it changes).
#[derive(Clone)]
pub enum SecretSource {
    Inline(Secret),
    Env(String),
    File(String),
}

#[cfg(test)]
impl schemars::JsonSchema for SecretSource {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SecretSource".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A secret: inline, {\"env\": \"NAME\"} to read the VM's environment variable NAME (vm_config.environment_variables), or {\"file\": \"/path\"} to read a file (dynamic module only; re-read when it changes, so a mounted Kubernetes Secret rotates without a restart).",
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "object", "properties": {"env": {"type": "string", "minLength": 1}}, "required": ["env"], "additionalProperties": false},
                {"type": "object", "properties": {"file": {"type": "string", "minLength": 1}}, "required": ["file"], "additionalProperties": false}
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
                f.write_str(r#"a string, {"env": "VARIABLE_NAME"} or {"file": "/path"}"#)
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<SecretSource, E> {
                Ok(SecretSource::Inline(Secret::new(value)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
                let mut source: Option<SecretSource> = None;
                while let Some(key) = map.next_key::<String>()? {
                    let make: fn(String) -> SecretSource = match key.as_str() {
                        "env" => SecretSource::Env,
                        "file" => SecretSource::File,
                        _ => return Err(de::Error::unknown_field(&key, &["env", "file"])),
                    };
                    if source.is_some() {
                        return Err(de::Error::custom(r#"give one of "env" and "file""#));
                    }
                    source = Some(make(map.next_value()?));
                }
                source.ok_or_else(|| de::Error::missing_field("env"))
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

    pub(super) fn needs_client_secret(self) -> bool {
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
