//! The token endpoint's answer: a [`TokenGrant`] (RFC 6749 §5.1) or a [`TokenError`].
//!
//! The access token and its lifetime are read from configurable, possibly nested, fields. An error
//! body (RFC 6749 §5.2) is recognised whatever the status (some IdPs answer 200 with `error`), and
//! errors are classified so the lifecycle can tell a configuration fault (`invalid_client`: retrying
//! soon will not help) from a transient one (a 503, a timeout, a garbled body).

use std::fmt;

use serde_json::Value;

use crate::assertion::AssertionError;
use crate::config::FieldPath;

/// Largest token the filter will inject; far beyond any real JWT, well below header limits.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest lifetime taken at face value (ten years); larger values are capped to it.
pub const MAX_LIFETIME_S: u64 = 10 * 365 * 86_400;

/// A token the IdP granted.
#[derive(Clone, PartialEq)]
pub struct TokenGrant {
    pub access_token: String,
    /// Lifetime in seconds from the response; `None` when the IdP sent none.
    pub expires_in_s: Option<u64>,
    /// When the IdP advises refreshing (`refresh_in`, seconds), if it says.
    pub refresh_in_s: Option<u64>,
}

impl fmt::Debug for TokenGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenGrant")
            .field("access_token", &"[redacted]")
            .field("expires_in_s", &self.expires_in_s)
            .finish()
    }
}

/// Why a token response gave no token. `Display` never includes the body or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The IdP answered with an RFC 6749 §5.2 error code.
    #[error("token endpoint answered {status} with OAuth error {code:?}")]
    OAuth { status: u32, code: String },
    /// A non-2xx status without an OAuth error body.
    #[error("token endpoint answered status {status}")]
    Status { status: u32 },
    /// The body is not a JSON object.
    #[error("token endpoint answered {status} with a body that is not a JSON object")]
    NotJson { status: u32 },
    /// The token field is missing or not a non-empty string.
    #[error("token response has no non-empty string at {field:?}")]
    MissingToken { field: String },
    /// The token holds bytes that cannot go in a header value (CR, LF, NUL...), or is too large.
    #[error("token response holds a token with bytes not allowed in a header value, or too long")]
    UnsafeToken,
    /// `expires_in` is present but not a positive number of seconds.
    #[error("token response has an invalid {field:?} (not a positive number of seconds)")]
    BadExpiresIn { field: String },
    /// The body is larger than the configured cap.
    #[error("token response is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// No answer: the callout failed or timed out (status 0 or no headers).
    #[error("no response from the token endpoint (connection failure or timeout)")]
    NoResponse,
    /// Envoy itself answered for the token endpoint: connection refused or reset, TLS handshake
    /// refused, no healthy host, timeout. `detail` is Envoy's own text, safe to log.
    #[error("token endpoint unreachable: Envoy answered {status} ({detail})")]
    Unreachable { status: u32, detail: String },
    /// The request was not sent: its RFC 7523 assertion could not be signed. The signer's error
    /// holds no key material ([`AssertionError`]).
    #[error("the JWT assertion could not be signed: {0}")]
    AssertionFailed(AssertionError),
}

/// How the lifecycle should treat a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Retry with the normal backoff.
    Transient,
    /// The IdP rejects this client's configuration; retrying soon will not help.
    ConfigurationFault,
}

impl TokenError {
    pub fn class(&self) -> FailureClass {
        match self {
            TokenError::OAuth { code, .. } => match code.as_str() {
                "invalid_client"
                | "unauthorized_client"
                | "invalid_scope"
                | "unsupported_grant_type"
                | "invalid_grant"
                | "invalid_request" => FailureClass::ConfigurationFault,
                _ => FailureClass::Transient,
            },
            _ => FailureClass::Transient,
        }
    }

    /// A short stable label for metrics and logs.
    pub fn label(&self) -> &str {
        match self {
            TokenError::OAuth { code, .. } => code_label(code),
            TokenError::Status { .. } => "http_status",
            TokenError::NotJson { .. } => "bad_body",
            TokenError::MissingToken { .. } => "missing_token",
            TokenError::UnsafeToken => "unsafe_token",
            TokenError::BadExpiresIn { .. } => "bad_expires_in",
            TokenError::TooLarge { .. } => "too_large",
            TokenError::NoResponse | TokenError::Unreachable { .. } => "no_response",
            TokenError::AssertionFailed(_) => "assertion_failed",
        }
    }
}

/// Known RFC 6749 §5.2 codes keep their name; anything else the IdP invents becomes `other_error`
/// so a hostile or buggy IdP cannot create unbounded metric names, and its free text never reaches
/// a log line (a careless IdP may echo the client's secret in it).
fn code_label(code: &str) -> &str {
    match code {
        "invalid_request"
        | "invalid_client"
        | "invalid_grant"
        | "unauthorized_client"
        | "unsupported_grant_type"
        | "invalid_scope"
        | "temporarily_unavailable"
        | "server_error"
        | "slow_down" => code,
        _ => "other_error",
    }
}

/// Parses a token endpoint response.
// Out of line: one caller must not absorb it into a large wasm function (docs/memory.md, "Function shape").
#[inline(never)]
pub fn parse(
    status: u32,
    body: &[u8],
    token_field: &FieldPath,
    expires_in_field: &FieldPath,
    max_body_bytes: usize,
) -> Result<TokenGrant, TokenError> {
    if status == 0 {
        return Err(TokenError::NoResponse);
    }
    if body.len() > max_body_bytes {
        return Err(TokenError::TooLarge { limit: max_body_bytes });
    }
    let json: Option<Value> = serde_json::from_slice(body).ok().filter(Value::is_object);
    if let Some(code) = json.as_ref().and_then(|v| v.get("error")).and_then(Value::as_str) {
        return Err(TokenError::OAuth { status, code: code_label(code).to_string() });
    }
    if !(200..300).contains(&status) {
        if let Some(detail) = envoy_local_reply(status, body) {
            return Err(TokenError::Unreachable { status, detail });
        }
        return Err(TokenError::Status { status });
    }
    let json = json.ok_or(TokenError::NotJson { status })?;
    let token = lookup(&json, token_field)
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TokenError::MissingToken { field: token_field.display() })?;
    if token.len() > MAX_TOKEN_BYTES || !token.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(TokenError::UnsafeToken);
    }
    let expires_in_s = match lookup(&json, expires_in_field) {
        None | Some(Value::Null) => None,
        Some(value) => {
            Some(seconds(value).ok_or_else(|| TokenError::BadExpiresIn { field: expires_in_field.display() })?)
        }
    };
    // Some IdPs (Azure managed identity among them) advise when to refresh; a bad value is ignored.
    let refresh_in_s = json.get("refresh_in").and_then(seconds);
    Ok(TokenGrant { access_token: token.to_string(), expires_in_s, refresh_in_s })
}

/// The texts Envoy answers a callout with when it could not get a response from the cluster.
const ENVOY_LOCAL_REPLIES: [&str; 4] = [
    "upstream connect error or disconnect/reset before headers",
    "no healthy upstream",
    "upstream request timeout",
    "no cluster match",
];

/// Envoy's own reply for an unreachable token endpoint, as a short printable detail.
fn envoy_local_reply(status: u32, body: &[u8]) -> Option<String> {
    if !(500..600).contains(&status) {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    ENVOY_LOCAL_REPLIES
        .iter()
        .any(|prefix| text.starts_with(prefix))
        .then(|| text.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(200).collect())
}

fn lookup<'a>(json: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    path.0.iter().try_fold(json, |value, key| value.get(key))
}

/// A positive lifetime in whole seconds from a number or a numeric string (a JSON number in
/// quotes, read by the same parser as the unquoted form); fractions round down (never up: a token
/// must not be thought to live longer than it does), huge values are capped.
fn seconds(value: &Value) -> Option<u64> {
    let number = match value {
        Value::Number(n) => n.as_f64()?,
        // Not `str::parse::<f64>`: serde_json's number parser is linked already, Rust's adds 20 KB.
        Value::String(s) => serde_json::from_str::<f64>(s.trim()).ok()?,
        _ => return None,
    };
    if !number.is_finite() || number < 1.0 {
        return None;
    }
    Some((number.floor() as u64).min(MAX_LIFETIME_S))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> FieldPath {
        FieldPath(p.split('.').map(str::to_string).collect())
    }

    fn parse_default(status: u32, body: &str) -> Result<TokenGrant, TokenError> {
        parse(status, body.as_bytes(), &path("access_token"), &path("expires_in"), 64 * 1024)
    }

    #[test]
    fn rfc6749_5_1_example() {
        let body = r#"{"access_token":"2YotnFZFEjr1zCsicMWpAA","token_type":"example","expires_in":3600,
                       "refresh_token":"tGzv3JOkF0XG5Qx2TlKWIA","example_parameter":"example_value"}"#;
        assert_eq!(
            parse_default(200, body),
            Ok(TokenGrant {
                access_token: "2YotnFZFEjr1zCsicMWpAA".into(),
                expires_in_s: Some(3600),
                refresh_in_s: None
            })
        );
    }

    #[test]
    fn expires_in_shapes() {
        let cases = [
            (r#"{"access_token":"t","expires_in":"3600"}"#, Ok(Some(3600))),
            (r#"{"access_token":"t","expires_in":" 59.9 "}"#, Ok(Some(59))),
            (r#"{"access_token":"t","expires_in":"3.6e3"}"#, Ok(Some(3600))),
            (r#"{"access_token":"t","expires_in":59.9}"#, Ok(Some(59))),
            (r#"{"access_token":"t"}"#, Ok(None)),
            (r#"{"access_token":"t","expires_in":null}"#, Ok(None)),
            (r#"{"access_token":"t","expires_in":1e300}"#, Ok(Some(MAX_LIFETIME_S))),
            (r#"{"access_token":"t","expires_in":0}"#, Err(())),
            (r#"{"access_token":"t","expires_in":-5}"#, Err(())),
            (r#"{"access_token":"t","expires_in":"soon"}"#, Err(())),
            (r#"{"access_token":"t","expires_in":true}"#, Err(())),
        ];
        for (body, expected) in cases {
            let got = parse_default(200, body).map(|g| g.expires_in_s).map_err(|_| ());
            assert_eq!(got, expected, "{body}");
        }
    }

    #[test]
    fn nested_fields() {
        let body = r#"{"data":{"token":"abc","ttl":"120"}}"#;
        let grant = parse(200, body.as_bytes(), &path("data.token"), &path("data.ttl"), 1024).expect("token");
        assert_eq!(grant, TokenGrant { access_token: "abc".into(), expires_in_s: Some(120), refresh_in_s: None });
    }

    #[test]
    fn errors_are_typed_and_classified() {
        let cases: Vec<(u32, &str, TokenError, FailureClass)> = vec![
            (
                400,
                r#"{"error":"invalid_client","error_description":"bad secret"}"#,
                TokenError::OAuth { status: 400, code: "invalid_client".into() },
                FailureClass::ConfigurationFault,
            ),
            (
                200,
                r#"{"error":"invalid_scope"}"#,
                TokenError::OAuth { status: 200, code: "invalid_scope".into() },
                FailureClass::ConfigurationFault,
            ),
            (
                503,
                r#"{"error":"temporarily_unavailable"}"#,
                TokenError::OAuth { status: 503, code: "temporarily_unavailable".into() },
                FailureClass::Transient,
            ),
            (500, "oops", TokenError::Status { status: 500 }, FailureClass::Transient),
            (200, "not json", TokenError::NotJson { status: 200 }, FailureClass::Transient),
            (200, "[1,2]", TokenError::NotJson { status: 200 }, FailureClass::Transient),
            (
                200,
                r#"{"token_type":"Bearer"}"#,
                TokenError::MissingToken { field: "access_token".into() },
                FailureClass::Transient,
            ),
            (
                200,
                r#"{"access_token":""}"#,
                TokenError::MissingToken { field: "access_token".into() },
                FailureClass::Transient,
            ),
            (
                200,
                r#"{"access_token":42}"#,
                TokenError::MissingToken { field: "access_token".into() },
                FailureClass::Transient,
            ),
            (200, r#"{"access_token":"a\r\nx-evil: 1"}"#, TokenError::UnsafeToken, FailureClass::Transient),
            (200, r#"{"access_token":"a\u0000b"}"#, TokenError::UnsafeToken, FailureClass::Transient),
            (200, r#"{"access_token":"a b"}"#, TokenError::UnsafeToken, FailureClass::Transient),
            (0, "", TokenError::NoResponse, FailureClass::Transient),
            (
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
                TokenError::Unreachable {
                    status: 503,
                    detail: "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure".into(),
                },
                FailureClass::Transient,
            ),
            (504, "upstream request timeout", TokenError::Unreachable { status: 504, detail: "upstream request timeout".into() }, FailureClass::Transient),
        ];
        for (status, body, expected, class) in cases {
            let err = parse_default(status, body).expect_err(body);
            assert_eq!(err, expected, "{body}");
            assert_eq!(err.class(), class, "{body}");
        }
    }

    #[test]
    fn size_cap_and_labels() {
        let big = format!(r#"{{"access_token":"{}"}}"#, "a".repeat(2000));
        assert_eq!(
            parse(200, big.as_bytes(), &path("access_token"), &path("expires_in"), 1000),
            Err(TokenError::TooLarge { limit: 1000 })
        );
        assert_eq!(TokenError::OAuth { status: 400, code: "x\u{1}y".repeat(50) }.label(), "other_error");
        assert_eq!(TokenError::OAuth { status: 400, code: "invalid_client".into() }.label(), "invalid_client");
    }

    #[test]
    fn display_and_debug_never_show_the_token() {
        let grant = parse_default(200, r#"{"access_token":"secret-token"}"#).expect("token");
        assert!(!format!("{grant:?}").contains("secret-token"));
    }

    /// The signer's reason reaches the failure, as a fixed text, never key material: an operator
    /// sees why signing failed without the key ever reaching a log line.
    #[test]
    fn assertion_failure_keeps_the_signers_detail() {
        use crate::assertion::JwtAlgorithm;
        let cases = [
            (
                AssertionError::TimeOverflow,
                "the JWT assertion could not be signed: the assertion expiry time overflows",
            ),
            (
                AssertionError::Signing { alg: JwtAlgorithm::PS256, detail: "RSA signing failed" },
                "the JWT assertion could not be signed: signing the PS256 assertion failed: RSA signing failed",
            ),
        ];
        for (error, text) in cases {
            let failure = TokenError::AssertionFailed(error);
            assert_eq!(failure.to_string(), text);
            assert_eq!((failure.label(), failure.class()), ("assertion_failed", FailureClass::Transient), "{failure}");
        }
    }
}
