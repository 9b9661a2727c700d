//! The token request a profile sends: method, `:path`, headers and body for the callout.
//!
//! Parameters follow RFC 6749 §4.4.2 (`grant_type`, `scope`), RFC 8707 (`resource`, repeated) and
//! the common `audience` extension; the profile's `params` replace any parameter of the same name
//! and add new ones. Client authentication follows RFC 6749 §2.3.1: for `client_secret_basic` the
//! id and secret are each form-urlencoded before they are joined and base64-encoded.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::config::{ClientAuth, Profile, TokenMethod};
use crate::url::HttpUrl;

/// A token request ready to hand to `dispatch_http_call`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct TokenRequest {
    /// Pseudo-headers first (`:method`, `:path`, `:authority`, `:scheme`), then the rest.
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

// Requests carry credentials: keep them out of Debug output.
impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("TokenRequest")
            .field("header_names", &names)
            .field("body_len", &self.body.as_ref().map(Vec::len))
            .finish()
    }
}

#[cfg(test)]
impl TokenRequest {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Client authentication material computed for one request (a signed assertion, when used).
#[derive(Default)]
pub(crate) struct RequestExtras<'a> {
    /// RFC 7523 §2.2 client assertion: sent as `client_assertion`.
    pub client_assertion: Option<&'a str>,
    /// RFC 7523 §2.1 authorization grant assertion: sent as `assertion`.
    pub grant_assertion: Option<&'a str>,
    /// RFC 8693 §2.1: the subject (and actor) of a token exchange.
    pub exchange: Option<ExchangeParams<'a>>,
}

/// The RFC 8693 §2.1 parameters of one exchange (the profile gives audience, resource and scope).
#[derive(Clone, Copy)]
pub(crate) struct ExchangeParams<'a> {
    pub(crate) subject_token: &'a str,
    pub(crate) subject_token_type: &'a str,
    /// `actor_token` and `actor_token_type`.
    pub(crate) actor: Option<(&'a str, &'a str)>,
    pub(crate) requested_token_type: Option<&'a str>,
}

pub(crate) use crate::assertion::CLIENT_ASSERTION_TYPE;

/// Builds the token request for `profile`, sent to `token_url` (the fixed or discovered endpoint).
pub(crate) fn build(profile: &Profile, token_url: &HttpUrl, extras: &RequestExtras) -> TokenRequest {
    let mut params: Vec<(&str, &str)> = Vec::with_capacity(8);
    params.push(("grant_type", &profile.grant_type));
    if let Some(exchange) = &extras.exchange {
        params.push(("subject_token", exchange.subject_token));
        params.push(("subject_token_type", exchange.subject_token_type));
        if let Some((token, token_type)) = exchange.actor {
            params.push(("actor_token", token));
            params.push(("actor_token_type", token_type));
        }
        if let Some(requested) = exchange.requested_token_type {
            params.push(("requested_token_type", requested));
        }
    }
    let scope = profile.scopes.join(" ");
    if !scope.is_empty() {
        params.push(("scope", &scope));
    }
    if let Some(audience) = &profile.audience {
        params.push(("audience", audience));
    }
    for resource in &profile.resources {
        params.push(("resource", resource));
    }
    if let Some(assertion) = extras.grant_assertion {
        params.push(("assertion", assertion));
    }
    let mut headers: Vec<(String, String)> = Vec::with_capacity(8);
    match &profile.client_auth {
        ClientAuth::Basic { secret } => {
            let user = form_encode_component(&profile.client_id);
            let password = form_encode_component(secret.expose());
            let credentials = STANDARD.encode(format!("{user}:{password}"));
            headers.push(("authorization".into(), format!("Basic {credentials}")));
        }
        ClientAuth::Post { secret } => {
            params.push(("client_id", &profile.client_id));
            params.push(("client_secret", secret.expose()));
        }
        ClientAuth::ClientIdOnly => params.push(("client_id", &profile.client_id)),
        ClientAuth::Jwt { send_client_id, .. } => {
            if *send_client_id {
                params.push(("client_id", &profile.client_id));
            }
        }
    }
    if let Some(assertion) = extras.client_assertion {
        params.push(("client_assertion_type", CLIENT_ASSERTION_TYPE));
        params.push(("client_assertion", assertion));
    }
    // Configured params replace every default of the same name, then add the new ones.
    params.retain(|(name, _)| !profile.params.iter().any(|(p, _)| p == name));
    params.extend(profile.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));

    let encoded = {
        let mut serializer = form_urlencoded::Serializer::new(String::new());
        serializer.extend_pairs(params.iter());
        serializer.finish()
    };
    let (method, path, body) = match profile.method {
        TokenMethod::Post => ("POST", token_url.path_and_query.clone(), Some(encoded.into_bytes())),
        TokenMethod::Get => {
            let separator = if token_url.path_and_query.contains('?') { '&' } else { '?' };
            ("GET", format!("{}{separator}{encoded}", token_url.path_and_query), None)
        }
    };
    let mut all = Vec::with_capacity(headers.len() + profile.request_headers.len() + 6);
    all.push((":method".to_string(), method.to_string()));
    all.push((":path".to_string(), path));
    all.push((":authority".to_string(), token_url.authority.clone()));
    all.push((":scheme".to_string(), token_url.scheme.to_string()));
    all.push(("accept".to_string(), "application/json".to_string()));
    if body.is_some() {
        all.push(("content-type".to_string(), "application/x-www-form-urlencoded".to_string()));
    }
    all.extend(headers);
    // Configured headers replace the filter's own (e.g. a custom `accept`).
    for (name, value) in &profile.request_headers {
        all.retain(|(n, _)| n != name);
        all.push((name.clone(), value.clone()));
    }
    TokenRequest { headers: all, body }
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 Appendix B).
fn form_encode_component(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use serde_json::json;

    fn profile(extra: serde_json::Value) -> Profile {
        let mut p = json!({"cluster": "idp", "token_url": "https://idp.example.com/oauth2/token",
                           "client_id": "svc:a+b", "client_secret": "p@ss:w%rd +/&=?"});
        for (k, v) in extra.as_object().expect("object") {
            p[k] = v.clone();
        }
        let config = json!({"profiles": {"p": p}});
        parse(config.to_string().as_bytes(), &|_| None).expect("valid").profiles.remove(0)
    }

    fn build_fixed(profile: &Profile, extras: &RequestExtras) -> TokenRequest {
        let crate::config::TokenEndpoint::Fixed(url) = &profile.endpoint else { panic!("fixed endpoint") };
        build(profile, url, extras)
    }

    fn body_pairs(request: &TokenRequest) -> Vec<(String, String)> {
        form_urlencoded::parse(request.body.as_deref().expect("body")).into_owned().collect()
    }

    #[test]
    fn client_secret_basic_encodes_per_rfc6749_2_3_1() {
        let request = build_fixed(&profile(json!({})), &RequestExtras::default());
        // "svc:a+b" -> "svc%3Aa%2Bb"; "p@ss:w%rd +/&=?" -> "p%40ss%3Aw%25rd+%2B%2F%26%3D%3F"
        let expected = format!("Basic {}", STANDARD.encode("svc%3Aa%2Bb:p%40ss%3Aw%25rd+%2B%2F%26%3D%3F"));
        assert_eq!(request.header("authorization"), Some(expected.as_str()));
        assert_eq!(request.header(":method"), Some("POST"));
        assert_eq!(request.header(":path"), Some("/oauth2/token"));
        assert_eq!(request.header(":authority"), Some("idp.example.com"));
        assert_eq!(request.header("content-type"), Some("application/x-www-form-urlencoded"));
        assert_eq!(request.header("accept"), Some("application/json"));
        assert_eq!(body_pairs(&request), vec![("grant_type".into(), "client_credentials".into())]);
    }

    #[test]
    fn client_secret_post_sends_credentials_in_body() {
        let request = build_fixed(
            &profile(json!({"auth_method": "client_secret_post", "scopes": ["read", "write"]})),
            &RequestExtras::default(),
        );
        assert_eq!(request.header("authorization"), None);
        assert_eq!(
            body_pairs(&request),
            vec![
                ("grant_type".into(), "client_credentials".into()),
                ("scope".into(), "read write".into()),
                ("client_id".into(), "svc:a+b".into()),
                ("client_secret".into(), "p@ss:w%rd +/&=?".into()),
            ]
        );
    }

    #[test]
    fn audience_resources_and_params_override() {
        let request = build_fixed(
            &profile(
                json!({"auth_method": "none", "client_secret": null, "scopes": ["read"], "audience": "api://billing",
                            "resource": ["https://a.example", "https://b.example"],
                            "params": {"scope": "custom", "tenant": "t1"}}),
            ),
            &RequestExtras::default(),
        );
        assert_eq!(
            body_pairs(&request),
            vec![
                ("grant_type".into(), "client_credentials".into()),
                ("audience".into(), "api://billing".into()),
                ("resource".into(), "https://a.example".into()),
                ("resource".into(), "https://b.example".into()),
                ("client_id".into(), "svc:a+b".into()),
                ("scope".into(), "custom".into()),
                ("tenant".into(), "t1".into()),
            ]
        );
    }

    #[test]
    fn get_method_puts_parameters_in_the_query() {
        let mut p = profile(json!({"method": "GET", "token_url": "https://idp.example.com/token?api-version=2"}));
        p.scopes = vec!["a".into()];
        let request = build_fixed(&p, &RequestExtras::default());
        assert_eq!(request.header(":method"), Some("GET"));
        assert_eq!(request.header(":path"), Some("/token?api-version=2&grant_type=client_credentials&scope=a"));
        assert!(request.body.is_none());
        assert_eq!(request.header("content-type"), None);
    }

    #[test]
    fn custom_headers_replace_defaults_and_assertions_are_sent() {
        let request = build_fixed(
            &profile(
                json!({"auth_method": "none", "client_secret": null, "token_request_headers": {"Accept": "application/jwt", "X-Api-Key": "k"}}),
            ),
            &RequestExtras { client_assertion: Some("a.b.c"), ..RequestExtras::default() },
        );
        assert_eq!(request.header("accept"), Some("application/jwt"));
        assert_eq!(request.header("x-api-key"), Some("k"));
        let pairs = body_pairs(&request);
        assert!(pairs.contains(&("client_assertion_type".into(), CLIENT_ASSERTION_TYPE.into())));
        assert!(pairs.contains(&("client_assertion".into(), "a.b.c".into())));
    }

    #[test]
    fn token_exchange_sends_the_subject_actor_and_types_with_any_client_authentication() {
        let p = profile(json!({"grant_type": crate::config::TOKEN_EXCHANGE_GRANT_TYPE, "audience": "tools",
                               "resource": "https://tools.example", "scopes": ["read"], "token_exchange": {}}));
        let exchange = ExchangeParams {
            subject_token: "subject.jwt",
            subject_token_type: crate::config::ACCESS_TOKEN_TYPE,
            actor: Some(("actor-token", "urn:ietf:params:oauth:token-type:jwt")),
            requested_token_type: Some("urn:ietf:params:oauth:token-type:access_token"),
        };
        let request = build_fixed(&p, &RequestExtras { exchange: Some(exchange), ..RequestExtras::default() });
        assert_eq!(request.header(":method"), Some("POST"));
        assert!(request.header("authorization").is_some_and(|v| v.starts_with("Basic ")), "client_secret_basic");
        assert_eq!(
            body_pairs(&request),
            vec![
                ("grant_type".into(), "urn:ietf:params:oauth:grant-type:token-exchange".into()),
                ("subject_token".into(), "subject.jwt".into()),
                ("subject_token_type".into(), "urn:ietf:params:oauth:token-type:access_token".into()),
                ("actor_token".into(), "actor-token".into()),
                ("actor_token_type".into(), "urn:ietf:params:oauth:token-type:jwt".into()),
                ("requested_token_type".into(), "urn:ietf:params:oauth:token-type:access_token".into()),
                ("scope".into(), "read".into()),
                ("audience".into(), "tools".into()),
                ("resource".into(), "https://tools.example".into()),
            ]
        );
        let debug = format!("{request:?}");
        assert!(!debug.contains("subject.jwt") && !debug.contains("actor-token"), "{debug}");
    }

    #[test]
    fn debug_hides_credentials() {
        let request = build_fixed(&profile(json!({"auth_method": "client_secret_post"})), &RequestExtras::default());
        let debug = format!("{request:?}");
        assert!(!debug.contains("p@ss") && !debug.contains("p%40ss"), "{debug}");
    }
}
