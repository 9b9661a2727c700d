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
    #[cfg_attr(test, schemars(extend("minProperties" = 1, "propertyNames" = {"pattern": super::schema::PROFILE_NAME})))]
    pub(super) profiles: BTreeMap<String, RawProfile>,
    #[serde(default)]
    /// Which requests get which profile's token; the first matching route wins, no match means no token.
    pub(super) routes: Vec<RawRoute>,
    #[serde(default)]
    /// The local reply sent when no token can be had.
    pub(super) on_failure: RawOnFailure,
    #[serde(default)]
    /// Requests one worker may hold paused waiting for a token (default 1000); beyond it, the failure reply at once.
    #[cfg_attr(test, schemars(extend("default" = 1000, "minimum" = 1, "maximum" = 1_000_000)))]
    pub(super) max_paused_requests: Option<u32>,
    /// Let Envoy routes choose: route metadata `filter_metadata.oauth2_cc` with `profile` selects a profile and
    /// `disabled: true` opts the route out, before `routes` are consulted (default false; one property read per request).
    #[serde(default)]
    pub(super) route_metadata: bool,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
// The rules between fields (token_url or issuer, the secret or key an auth method needs...).
#[cfg_attr(test, schemars(extend("allOf" = super::schema::profile_rules())))]
pub(super) struct RawProfile {
    /// The Envoy cluster that reaches the token endpoint (its TLS settings do mTLS).
    #[cfg_attr(test, schemars(extend("pattern" = r"\S")))]
    pub(super) cluster: String,
    /// Absolute http(s) URL of the token endpoint: gives the callout's :authority and :path.
    #[serde(default)]
    #[cfg_attr(test, schemars(extend("pattern" = super::schema::HTTP_URL)))]
    pub(super) token_url: Option<String>,
    /// Instead of token_url: the issuer whose OpenID Connect / RFC 8414 metadata names the token endpoint,
    /// read through `cluster` at start-up.
    #[serde(default)]
    #[cfg_attr(test, schemars(extend("pattern" = super::schema::HTTP_URL,
        "not" = {"type": "string", "pattern": "[?]"})))]
    pub(super) issuer: Option<String>,
    /// The OAuth client identifier.
    #[cfg_attr(test, schemars(extend("minLength" = 1)))]
    pub(super) client_id: String,
    #[serde(default)]
    /// The client secret (client_secret_basic, client_secret_post, client_secret_jwt).
    pub(super) client_secret: Option<SecretSource>,
    #[serde(default)]
    /// Client authentication at the token endpoint (default client_secret_basic).
    #[cfg_attr(test, schemars(extend("default" = "client_secret_basic")))]
    pub(super) auth_method: AuthMethod,
    #[serde(default)]
    /// grant_type parameter (default client_credentials; urn:ietf:params:oauth:grant-type:jwt-bearer sends a signed assertion).
    #[cfg_attr(test, schemars(extend("default" = "client_credentials", "minLength" = 1)))]
    pub(super) grant_type: Option<String>,
    #[serde(default)]
    /// Scopes, sent space-joined as `scope`.
    #[cfg_attr(test, schemars(extend("items" = {"type": "string", "pattern": "^[^ ]+$"})))]
    pub(super) scopes: Vec<String>,
    #[serde(default)]
    /// `audience` parameter (Auth0, Okta and others).
    pub(super) audience: Option<String>,
    #[serde(default)]
    /// RFC 8707 resource indicator(s), one `resource` parameter each.
    #[cfg_attr(test, schemars(schema_with = "super::schema::resource"))]
    pub(super) resource: OneOrMany,
    #[serde(default)]
    /// Extra parameters; one named like a filter parameter (scope, client_id, grant_type...) replaces it.
    #[cfg_attr(test, schemars(extend("propertyNames" = {"minLength": 1})))]
    pub(super) params: BTreeMap<String, String>,
    #[serde(default)]
    /// Extra headers on the token request.
    #[cfg_attr(test, schemars(extend("propertyNames" = super::schema::token_request_header_names(),
        "additionalProperties" = {"type": "string", "pattern": super::schema::HEADER_VALUE})))]
    pub(super) token_request_headers: BTreeMap<String, String>,
    #[serde(default)]
    /// POST (form body, default) or GET (parameters in the query; only with client_secret_basic,
    /// tls_client_auth or none, and not with the JWT-bearer grant: RFC 6749 §2.3.1).
    #[cfg_attr(test, schemars(extend("default" = "POST")))]
    pub(super) method: TokenMethod,
    #[serde(default)]
    /// Timeout of one token request (default 5000).
    #[cfg_attr(test, schemars(extend("default" = super::runtime::DEFAULT_TIMEOUT_MS,
        "minimum" = 1, "maximum" = super::runtime::MAX_DURATION_MS)))]
    pub(super) timeout_ms: Option<u64>,
    #[serde(default)]
    /// Longest a request waits for a token before the failure reply (default timeout_ms + 1000).
    #[cfg_attr(test, schemars(extend("minimum" = 1, "maximum" = super::runtime::MAX_DURATION_MS)))]
    pub(super) max_wait_ms: Option<u64>,
    #[serde(default)]
    /// Field of the token in the response JSON, dotted for nested objects (default access_token).
    #[cfg_attr(test, schemars(extend("default" = "access_token", "pattern" = super::schema::FIELD_PATH)))]
    pub(super) token_field: Option<String>,
    #[serde(default)]
    /// Field of the lifetime in seconds, dotted for nested objects (default expires_in).
    #[cfg_attr(test, schemars(extend("default" = "expires_in", "pattern" = super::schema::FIELD_PATH)))]
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
    #[cfg_attr(test, schemars(extend("default" = [401],
        "items" = {"type": "integer", "minimum": 100, "maximum": 599})))]
    pub(super) purge_on_status: Option<Vec<u32>>,
    #[serde(default)]
    /// RFC 7523 assertion settings (private_key_jwt, client_secret_jwt, JWT-bearer grant).
    pub(super) jwt: Option<RawJwt>,
    /// Token requests allowed per hour (protects IdP quotas; unlimited if absent).
    #[serde(default)]
    #[cfg_attr(test, schemars(extend("minimum" = 1)))]
    pub(super) max_fetches_per_hour: Option<u32>,
    /// Largest token (or metadata) response body read, in bytes (default 65536); a larger one is a failure.
    #[serde(default)]
    #[cfg_attr(test, schemars(extend("default" = 65536,
        "minimum" = 256, "maximum" = super::runtime::MAX_RESPONSE_BYTES_LIMIT)))]
    pub(super) max_response_bytes: Option<usize>,
    /// RFC 8693 token exchange: required with grant_type urn:ietf:params:oauth:grant-type:token-exchange,
    /// refused otherwise (docs/token-exchange.md).
    #[serde(default)]
    pub(super) token_exchange: Option<super::raw_exchange::RawTokenExchange>,
}

/// Settings of the RFC 7523 assertions (`private_key_jwt`, `client_secret_jwt`, JWT-bearer grant).
#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwt {
    /// JWS algorithm: RS256/384/512, PS256/384/512, ES256, ES384, EdDSA, or HS256/384/512 (client_secret_jwt).
    #[cfg_attr(test, schemars(extend("enum" = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
        "ES256", "ES384", "EdDSA", "HS256", "HS384", "HS512", null])))]
    pub(super) algorithm: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 RSA, SEC1 EC) for private_key_jwt.
    pub(super) private_key: Option<SecretSource>,
    /// `kid` header.
    pub(super) kid: Option<String>,
    #[serde(default)]
    #[cfg_attr(test, schemars(schema_with = "super::schema::assertion_audience"))]
    pub(super) audience: OneOrMany,
    /// `iss` claim (default client_id).
    #[cfg_attr(test, schemars(extend("minLength" = 1)))]
    pub(super) issuer: Option<String>,
    /// `sub` claim (default client_id).
    #[cfg_attr(test, schemars(extend("minLength" = 1)))]
    pub(super) subject: Option<String>,
    #[serde(default)]
    /// Extra JOSE header fields (x5t, typ...).
    #[cfg_attr(test, schemars(extend("propertyNames" = {"not": {"enum": crate::assertion::RESERVED_HEADERS}})))]
    pub(super) headers: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    /// Extra claims; iat, exp, nbf and jti are the filter's.
    #[cfg_attr(test, schemars(extend("propertyNames" = {"not": {"enum": crate::assertion::RESERVED_CLAIMS}})))]
    pub(super) claims: serde_json::Map<String, serde_json::Value>,
    /// Seconds from iat to exp (default 60).
    #[cfg_attr(test, schemars(extend("default" = 60, "minimum" = 1)))]
    pub(super) lifetime_s: Option<u64>,
    #[serde(default)]
    /// Add nbf = iat.
    pub(super) include_nbf: bool,
    /// Send client_id in the body next to the assertion (default true).
    #[cfg_attr(test, schemars(extend("default" = true)))]
    pub(super) send_client_id: Option<bool>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawInject {
    /// Header name (default authorization).
    #[cfg_attr(test, schemars(extend("default" = "authorization", "pattern" = super::schema::HEADER_NAME,
        "not" = {"type": "string", "pattern": super::schema::any_case(&["host"])})))]
    pub(super) header: Option<String>,
    /// Written before the token (default "Bearer "; "" sends the raw token).
    #[cfg_attr(test, schemars(extend("default" = "Bearer ", "pattern" = super::schema::HEADER_VALUE)))]
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
    #[cfg_attr(test, schemars(extend("default" = 0.8, "exclusiveMinimum" = 0, "maximum" = 1)))]
    pub(super) ahead_ratio: Option<f64>,
    /// Lifetime assumed when the response has none (default 300).
    #[cfg_attr(test, schemars(extend("default" = 300, "minimum" = 1, "maximum" = 31_536_000)))]
    pub(super) default_ttl_s: Option<u64>,
    /// Seconds taken off the lifetime, at most a tenth of it (default 5).
    #[cfg_attr(test, schemars(extend("default" = 5, "maximum" = 3600)))]
    pub(super) skew_s: Option<u64>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    /// First retry ceiling (default 1000); doubles per failure.
    #[cfg_attr(test, schemars(extend("default" = super::runtime::DEFAULT_BACKOFF_BASE_MS,
        "minimum" = 1, "maximum" = super::runtime::MAX_DURATION_MS)))]
    pub(super) base_ms: Option<u64>,
    /// Largest retry ceiling (default 60000); configuration faults such as invalid_client use it at once.
    #[cfg_attr(test, schemars(extend("default" = super::runtime::DEFAULT_BACKOFF_MAX_MS,
        "minimum" = 1, "maximum" = super::runtime::MAX_DURATION_MS)))]
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
// path_prefix or path_exact, not both.
#[cfg_attr(test, schemars(extend("not" = {"required": ["path_prefix", "path_exact"],
    "properties": {"path_prefix": {"type": "string"}, "path_exact": {"type": "string"}}})))]
pub(super) struct RawMatch {
    /// Host pattern: `host`, `host:port` or `*.suffix`; case-insensitive, trailing dot ignored, any port if none given.
    #[cfg_attr(test, schemars(extend("pattern" = super::schema::AUTHORITY)))]
    pub(super) authority: Option<String>,
    /// Path prefix (query excluded).
    #[cfg_attr(test, schemars(extend("pattern" = "^/")))]
    pub(super) path_prefix: Option<String>,
    /// Exact path (query excluded).
    #[cfg_attr(test, schemars(extend("pattern" = "^/")))]
    pub(super) path_exact: Option<String>,
    #[cfg_attr(test, schemars(extend("pattern" = "^[A-Za-z]+$")))]
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
    #[cfg_attr(test, schemars(extend("pattern" = super::schema::HEADER_NAME)))]
    pub(super) name: String,
    pub(super) value: Option<String>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawOnFailure {
    /// HTTP status of the failure reply (default 503).
    #[cfg_attr(test, schemars(extend("default" = 503, "minimum" = 400, "maximum" = 599)))]
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
pub(crate) enum SecretSource {
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
pub(crate) enum AuthMethod {
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
    pub(crate) fn name(self) -> &'static str {
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
pub(crate) enum TokenMethod {
    #[default]
    #[serde(rename = "POST", alias = "post")]
    Post,
    #[serde(rename = "GET", alias = "get")]
    Get,
}
