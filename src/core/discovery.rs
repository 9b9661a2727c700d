//! Authorization server discovery: from a profile's `issuer` to its token endpoint.
//!
//! The filter reads the issuer's metadata through the profile's cluster at start-up: first the
//! OpenID Connect location (`<issuer>/.well-known/openid-configuration`), then, if that is not
//! found, the RFC 8414 location (`/.well-known/oauth-authorization-server` inserted before the
//! issuer's path). The metadata must name the same issuer (RFC 8414 §3.3, OIDC Discovery §4.3)
//! and, when it lists the supported client authentication methods, the profile's method.

use serde_json::Value;

use crate::url::{HttpUrl, UrlError};

/// The metadata documents to try, in order.
pub(crate) fn metadata_urls(issuer: &HttpUrl) -> Vec<HttpUrl> {
    let path = issuer.path_and_query.trim_end_matches('/');
    let at =
        |path_and_query: String| HttpUrl { scheme: issuer.scheme, authority: issuer.authority.clone(), path_and_query };
    vec![
        at(format!("{path}/.well-known/openid-configuration")),
        at(format!("/.well-known/oauth-authorization-server{path}")),
    ]
}

/// Why discovery gave no token endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DiscoveryError {
    /// The document is not at this location (try the next one).
    #[error("no metadata document at the OpenID Connect or RFC 8414 location")]
    NotFound,
    #[error("metadata request answered status {0}")]
    Status(u32),
    #[error("no response to the metadata request")]
    NoResponse,
    #[error("metadata is not a JSON object")]
    NotJson,
    /// The metadata body is larger than the profile's `max_response_bytes`.
    #[error("metadata response is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("metadata names issuer {found:?}, not the configured one")]
    IssuerMismatch { found: String },
    #[error("metadata has no token_endpoint")]
    NoTokenEndpoint,
    #[error("metadata token_endpoint: {0}")]
    BadTokenEndpoint(UrlError),
    #[error(
        "the IdP does not list auth_method {method} in token_endpoint_auth_methods_supported ({})",
        supported.join(", ")
    )]
    AuthMethodNotSupported { method: String, supported: Vec<String> },
}

impl DiscoveryError {
    /// Errors a retry cannot fix: the IdP and the configuration disagree.
    pub(crate) fn is_configuration_fault(&self) -> bool {
        matches!(
            self,
            DiscoveryError::IssuerMismatch { .. }
                | DiscoveryError::NoTokenEndpoint
                | DiscoveryError::BadTokenEndpoint(_)
                | DiscoveryError::AuthMethodNotSupported { .. }
        )
    }
}

/// The token endpoint from a metadata response.
pub(crate) fn parse_metadata(
    status: u32,
    body: &[u8],
    expected_issuer: &str,
    auth_method: &str,
) -> Result<HttpUrl, DiscoveryError> {
    match status {
        0 => return Err(DiscoveryError::NoResponse),
        404 => return Err(DiscoveryError::NotFound),
        200..=299 => {}
        other => return Err(DiscoveryError::Status(other)),
    }
    let json: Value = serde_json::from_slice(body).ok().filter(Value::is_object).ok_or(DiscoveryError::NotJson)?;
    let issuer = json.get("issuer").and_then(Value::as_str).unwrap_or_default();
    if issuer.trim_end_matches('/') != expected_issuer.trim_end_matches('/') {
        return Err(DiscoveryError::IssuerMismatch { found: issuer.chars().take(200).collect() });
    }
    let endpoint = json.get("token_endpoint").and_then(Value::as_str).ok_or(DiscoveryError::NoTokenEndpoint)?;
    let endpoint = HttpUrl::parse(endpoint).map_err(DiscoveryError::BadTokenEndpoint)?;
    if let Some(supported) = json.get("token_endpoint_auth_methods_supported").and_then(Value::as_array) {
        let supported: Vec<String> = supported.iter().filter_map(Value::as_str).map(str::to_string).collect();
        if !supported.iter().any(|m| m == auth_method) {
            return Err(DiscoveryError::AuthMethodNotSupported { method: auth_method.to_string(), supported });
        }
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> HttpUrl {
        HttpUrl::parse(s).expect("url")
    }

    #[test]
    fn metadata_locations() {
        let paths = |issuer: &str| -> Vec<String> {
            metadata_urls(&url(issuer)).into_iter().map(|u| u.path_and_query).collect()
        };
        assert_eq!(
            paths("https://idp.example.com"),
            vec!["/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"]
        );
        assert_eq!(
            paths("https://idp.example.com/realms/acme/"),
            vec![
                "/realms/acme/.well-known/openid-configuration",
                "/.well-known/oauth-authorization-server/realms/acme"
            ]
        );
    }

    #[test]
    fn parses_and_checks_metadata() {
        let issuer = "https://idp.example.com/realms/acme";
        let good = br#"{"issuer":"https://idp.example.com/realms/acme","token_endpoint":"https://idp.example.com/realms/acme/token",
                        "token_endpoint_auth_methods_supported":["client_secret_basic","private_key_jwt"]}"#;
        assert_eq!(
            parse_metadata(200, good, issuer, "client_secret_basic").map(|u| u.path_and_query),
            Ok("/realms/acme/token".into())
        );
        assert!(matches!(
            parse_metadata(200, good, issuer, "client_secret_post"),
            Err(DiscoveryError::AuthMethodNotSupported { .. })
        ));
        let unlisted = br#"{"issuer":"https://idp.example.com/realms/acme/","token_endpoint":"https://idp/t"}"#;
        assert!(parse_metadata(200, unlisted, issuer, "client_secret_post").is_ok(), "no list: any method");
        let other = br#"{"issuer":"https://evil.example.com","token_endpoint":"https://evil/t"}"#;
        assert!(matches!(parse_metadata(200, other, issuer, "none"), Err(DiscoveryError::IssuerMismatch { .. })));
        assert_eq!(parse_metadata(404, b"", issuer, "none"), Err(DiscoveryError::NotFound));
        assert_eq!(parse_metadata(503, b"", issuer, "none"), Err(DiscoveryError::Status(503)));
        assert_eq!(parse_metadata(200, b"<html>", issuer, "none"), Err(DiscoveryError::NotJson));
        let no_endpoint = br#"{"issuer":"https://idp.example.com/realms/acme"}"#;
        assert_eq!(parse_metadata(200, no_endpoint, issuer, "none"), Err(DiscoveryError::NoTokenEndpoint));
        assert!(DiscoveryError::NoTokenEndpoint.is_configuration_fault());
        assert!(!DiscoveryError::Status(503).is_configuration_fault());
    }

    /// An oversized metadata body is its own failure, not "not JSON", and a retry may fix it.
    #[test]
    fn too_large_is_reported_as_such() {
        let error = DiscoveryError::TooLarge { limit: 65_536 };
        assert_eq!(error.to_string(), "metadata response is larger than 65536 bytes");
        assert!(!error.is_configuration_fault());
    }
}
