//! The parts of the JSON Schema that serde's types cannot say: value ranges, patterns and the
//! rules between fields that `profile`, `auth` and `routes` enforce at load. `raw` attaches them
//! with schemars attributes; the test `json_schema_is_up_to_date` writes the schema (`make schema`),
//! and tests/e2e/test_schema_agreement.py holds the schema and the filter to the same verdicts.

use serde_json::{Value, json};

use crate::assertion::JWT_BEARER_GRANT_TYPE;

/// Where the published schema is identified (no network location is implied).
pub(super) const SCHEMA_ID: &str = "urn:oauth2-cc:schema:plugin-configuration:v1";

/// An HTTP header name (RFC 9110 token characters).
pub(super) const HEADER_NAME: &str = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";
/// A header value without control characters (tab allowed).
pub(super) const HEADER_VALUE: &str = "^[^\\u0000-\\u0008\\u000a-\\u001f\\u007f]*$";
/// A profile name.
pub(super) const PROFILE_NAME: &str = r"^[A-Za-z0-9._-]+$";
/// A dotted field path: names joined by '.', none empty.
pub(super) const FIELD_PATH: &str = r"^[^.]+(\.[^.]+)*$";
/// An absolute http(s) URL as the filter reads it: a host, no user info, no fragment, no spaces.
pub(super) const HTTP_URL: &str = concat!(
    r"^[Hh][Tt][Tt][Pp][Ss]?://",
    r"[^/?#@\x00-\x20\x7f]*[^/?#@:\x00-\x20\x7f\[][^/?#@\x00-\x20\x7f]*",
    r"([/?][^#\x00-\x20\x7f]*)?$"
);

/// A route's host pattern: `host`, `host:port`, `*.suffix`, or a bracketed IPv6 literal.
pub(super) const AUTHORITY: &str = concat!(
    r"^((\*\.)?[A-Za-z0-9._-]*[A-Za-z0-9_-][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])",
    // A port from 1 to 65535.
    r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?$"
);

/// Case-insensitive exact match of one of `words` (JSON Schema regexes have no flags).
pub(super) fn any_case(words: &[&str]) -> String {
    let alternatives: Vec<String> =
        words
            .iter()
            .map(|word| {
                word.chars()
                    .map(|c| {
                        if c.is_ascii_alphabetic() {
                            format!("[{}{}]", c.to_ascii_uppercase(), c)
                        } else {
                            c.to_string()
                        }
                    })
                    .collect()
            })
            .collect();
    format!("^({})$", alternatives.join("|"))
}

/// Names of the token request's extra headers: not one the filter or Envoy sets.
pub(super) fn token_request_header_names() -> Value {
    json!({"pattern": HEADER_NAME, "not": {"pattern": any_case(&["host", "content-length", "transfer-encoding"])}})
}

pub(super) fn resource(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "RFC 8707 resource indicator(s), one `resource` parameter each: absolute URIs.",
        "anyOf": [
            {"type": "null"},
            {"type": "string", "pattern": ":"},
            {"type": "array", "items": {"type": "string", "pattern": ":"}}
        ]
    })
}

pub(super) fn assertion_audience(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "`aud` claim: one string or a list (default the token endpoint's URL).",
        "anyOf": [
            {"type": "null"},
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}
        ]
    })
}

/// `field` is given and not null (serde reads null as absent).
fn has(field: &str) -> Value {
    json!({"type": "object", "required": [field], "properties": {field: {"not": {"type": "null"}}}})
}

fn lacks(field: &str) -> Value {
    json!({"not": has(field)})
}

fn auth_method_is(methods: &[&str]) -> Value {
    json!({"required": ["auth_method"], "properties": {"auth_method": {"enum": methods}}})
}

/// `token_exchange.subject`: a header (with its prefix) or a metadata key, one of the two.
pub(super) fn subject_sources() -> Value {
    json!([
        {"allOf": [has("header"), lacks("metadata")]},
        {"allOf": [has("metadata"), lacks("header"), lacks("prefix")]}
    ])
}

/// `token_exchange.actor`: a static token or another profile, one of the two.
pub(super) fn actor_sources() -> Value {
    json!([{"allOf": [has("token"), lacks("profile")]}, {"allOf": [has("profile"), lacks("token")]}])
}

fn token_exchange_grant() -> Value {
    json!({"required": ["grant_type"], "properties": {"grant_type": {"const": super::TOKEN_EXCHANGE_GRANT_TYPE}}})
}

fn jwt_bearer_grant() -> Value {
    json!({"required": ["grant_type"], "properties": {"grant_type": {"const": JWT_BEARER_GRANT_TYPE}}})
}

const HMAC: [&str; 3] = ["HS256", "HS384", "HS512"];

/// The rules between a profile's fields, each as the filter applies it at load.
pub(super) fn profile_rules() -> Value {
    let hmac_algorithm = json!({"required": ["jwt"], "properties": {"jwt": {
        "type": "object", "required": ["algorithm"], "properties": {"algorithm": {"enum": HMAC}}}}});
    let jwt_lacks_private_key = json!({"properties": {"jwt": lacks("private_key")}});
    json!([
        // Token exchange: the grant and its settings come together; POST only; the subject's
        // header is replaced, never kept.
        {"if": token_exchange_grant(),
         "then": {"allOf": [has("token_exchange"), lacks("max_fetches_per_hour"), lacks("issuer"),
             {"properties": {"method": {"not": {"enum": ["GET", "get"]}},
                             "params": {"propertyNames": {"not": {"enum": ["subject_token", "actor_token"]}}},
                             "inject": {"properties": {"keep_existing": {"not": {"const": true}}}}}}]},
         "else": lacks("token_exchange")},
        // The token endpoint: fixed, or discovered from the issuer; one of the two.
        {"oneOf": [{"allOf": [has("token_url"), lacks("issuer")]}, {"allOf": [has("issuer"), lacks("token_url")]}]},
        // GET puts every parameter in the URL: only methods whose credentials travel elsewhere.
        {"if": {"properties": {"method": {"enum": ["GET", "get"]}}, "required": ["method"]},
         "then": {"properties": {
             "auth_method": {"enum": ["client_secret_basic", "tls_client_auth", "none"]},
             "grant_type": {"not": {"const": JWT_BEARER_GRANT_TYPE}}}}},
        // The secret-based methods (client_secret_basic is the default) need the secret.
        {"if": {"not": auth_method_is(&["none", "tls_client_auth", "private_key_jwt"])},
         "then": has("client_secret")},
        // none and tls_client_auth send no secret (unless a JWT-bearer grant signs with it).
        {"if": {"allOf": [auth_method_is(&["none", "tls_client_auth"]), {"not": jwt_bearer_grant()}]},
         "then": lacks("client_secret")},
        // `jwt` is required by private_key_jwt and the JWT-bearer grant, and used by nothing else.
        {"if": auth_method_is(&["private_key_jwt"]), "then": has("jwt")},
        // (client_secret_jwt signs with its defaults when `jwt` is absent.)
        {"if": {"allOf": [jwt_bearer_grant(), {"not": auth_method_is(&["client_secret_jwt"])}]}, "then": has("jwt")},
        {"if": {"not": {"anyOf": [auth_method_is(&["client_secret_jwt", "private_key_jwt"]), jwt_bearer_grant()]}},
         "then": lacks("jwt")},
        // client_secret_jwt signs with HMAC over the client secret, never a private key.
        {"if": auth_method_is(&["client_secret_jwt"]),
         "then": {"properties": {"jwt": {"anyOf": [{"type": "null"}, {"allOf": [
             {"properties": {"algorithm": {"enum": [HMAC[0], HMAC[1], HMAC[2], null]}}}, lacks("private_key")]}]}}}},
        // An HMAC algorithm signs with the client secret: no private key, the secret required.
        {"if": hmac_algorithm.clone(), "then": {"allOf": [has("client_secret"), jwt_lacks_private_key]}},
        // Every other algorithm (RS256 by default) signs with `jwt.private_key`.
        {"if": {"allOf": [has("jwt"), {"not": auth_method_is(&["client_secret_jwt"])},
             {"not": hmac_algorithm}]},
         "then": {"properties": {"jwt": has("private_key")}}}
    ])
}
