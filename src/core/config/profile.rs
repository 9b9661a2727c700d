//! Compiles one entry of `profiles`: the endpoint, the request parameters and headers, where the
//! token goes, the lifetime and backoff policies, the limits, and the cache key. Client
//! authentication is `auth`'s.

use super::ConfigError;
use super::auth::{CompiledAuth, compile_auth};
use super::checks::{SecretSources, cache_key, duration, field_path, valid_header_name, valid_header_value};
use super::raw::{RawBackoff, RawInject, RawProfile, RawRefresh};
use super::runtime::*;
use crate::url::HttpUrl;

type At<'a> = &'a dyn Fn(&str) -> String;

/// The parameters and headers of the token request beyond authentication.
struct RequestParts {
    resources: Vec<String>,
    params: Vec<(String, String)>,
    request_headers: Vec<(String, String)>,
}

#[inline(never)]
pub(super) fn compile_profile(name: String, mut raw: RawProfile, env: SecretSources) -> Result<Profile, ConfigError> {
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
    let endpoint = compile_endpoint(&raw, &at)?;
    if raw.client_id.is_empty() {
        return Err(ConfigError::new(at("client_id"), "must not be empty"));
    }
    let grant_type = raw.grant_type.take().unwrap_or_else(|| DEFAULT_GRANT_TYPE.to_string());
    let CompiledAuth { client_auth, grant_assertion } = compile_auth(&mut raw, &grant_type, &at, env)?;
    if grant_type.is_empty() {
        return Err(ConfigError::new(at("grant_type"), "must not be empty"));
    }
    let exchange = super::exchange::compile_exchange(&mut raw, &grant_type, &at, env)?;
    let parts = compile_request_parts(&mut raw, &at)?;
    let timeout_ms = duration(raw.timeout_ms, DEFAULT_TIMEOUT_MS, &at("timeout_ms"))?;
    let max_wait_ms = duration(raw.max_wait_ms, timeout_ms + 1_000, &at("max_wait_ms"))?;
    let token_field = field_path(raw.token_field.as_deref().unwrap_or("access_token"), &at("token_field"))?;
    let expires_in_field =
        field_path(raw.expires_in_field.as_deref().unwrap_or("expires_in"), &at("expires_in_field"))?;
    let inject = compile_inject(std::mem::take(&mut raw.inject), &at)?;
    let lifetime = compile_lifetime(&raw.refresh, &at)?;
    let backoff = compile_backoff(&raw.backoff, &at)?;
    let purge_on_status = raw.purge_on_status.take().unwrap_or_else(|| vec![401]);
    if let Some(bad) = purge_on_status.iter().position(|s| !(100..=599).contains(s)) {
        return Err(ConfigError::new(format!("{}[{bad}]", at("purge_on_status")), "not an HTTP status"));
    }
    let max_response_bytes = compile_limits(&raw, &at)?;
    let cache_key =
        profile_cache_key(&name, &raw, &grant_type, &parts, &token_field, grant_assertion.as_ref(), exchange.as_ref());
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
        resources: parts.resources,
        params: parts.params,
        request_headers: parts.request_headers,
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
        exchange,
    })
}

#[inline(never)]
fn compile_endpoint(raw: &RawProfile, at: At) -> Result<TokenEndpoint, ConfigError> {
    match (raw.token_url.as_deref(), raw.issuer.as_deref()) {
        (Some(url), None) => {
            Ok(TokenEndpoint::Fixed(HttpUrl::parse(url).map_err(|e| ConfigError::new(at("token_url"), e.to_string()))?))
        }
        (None, Some(issuer)) => {
            let issuer_url = HttpUrl::parse(issuer).map_err(|e| ConfigError::new(at("issuer"), e.to_string()))?;
            if issuer_url.path_and_query.contains('?') {
                return Err(ConfigError::new(at("issuer"), "an issuer has no query (RFC 8414 §2)"));
            }
            Ok(TokenEndpoint::Discovered { issuer: issuer.to_string(), issuer_url })
        }
        (None, None) => Err(ConfigError::new(at("token_url"), "is required (or give issuer for discovery)")),
        (Some(_), Some(_)) => Err(ConfigError::new(at("issuer"), "give token_url or issuer, not both")),
    }
}

/// Scopes, resources, extra parameters and extra headers of the token request.
#[inline(never)]
fn compile_request_parts(raw: &mut RawProfile, at: At) -> Result<RequestParts, ConfigError> {
    for (index, scope) in raw.scopes.iter().enumerate() {
        if scope.is_empty() || scope.contains(' ') {
            return Err(ConfigError::new(
                format!("{}[{index}]", at("scopes")),
                "a scope is one non-empty word without spaces (RFC 6749 §3.3)",
            ));
        }
    }
    let resources = std::mem::take(&mut raw.resource).into_vec();
    for (index, resource) in resources.iter().enumerate() {
        if HttpUrl::parse(resource).is_err() && !resource.contains(':') {
            return Err(ConfigError::new(
                format!("{}[{index}]", at("resource")),
                "a resource is an absolute URI (RFC 8707)",
            ));
        }
    }
    if raw.params.keys().any(String::is_empty) {
        return Err(ConfigError::new(at("params"), "a parameter name must not be empty"));
    }
    let params: Vec<(String, String)> = std::mem::take(&mut raw.params).into_iter().collect();
    let mut request_headers = Vec::with_capacity(raw.token_request_headers.len());
    for (header, value) in std::mem::take(&mut raw.token_request_headers) {
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
    Ok(RequestParts { resources, params, request_headers })
}

#[inline(never)]
fn compile_inject(raw: RawInject, at: At) -> Result<Injection, ConfigError> {
    let header = raw.header.unwrap_or_else(|| "authorization".to_string());
    let header = valid_header_name(&header)
        .filter(|h| !h.starts_with(':') && h != "host")
        .ok_or_else(|| ConfigError::new(at("inject.header"), "not a header name the filter may set"))?;
    let prefix = raw.prefix.unwrap_or_else(|| "Bearer ".to_string());
    if !valid_header_value(&prefix) {
        return Err(ConfigError::new(at("inject.prefix"), "contains a control character"));
    }
    Ok(Injection { header, prefix, keep_existing: raw.keep_existing })
}

#[inline(never)]
fn compile_lifetime(raw: &RawRefresh, at: At) -> Result<LifetimePolicy, ConfigError> {
    let lifetime = LifetimePolicy {
        ahead_ratio: raw.ahead_ratio.unwrap_or(DEFAULT_AHEAD_RATIO),
        default_ttl_s: raw.default_ttl_s.unwrap_or(DEFAULT_TTL_S),
        skew_s: raw.skew_s.unwrap_or(DEFAULT_SKEW_S),
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
    Ok(lifetime)
}

#[inline(never)]
fn compile_backoff(raw: &RawBackoff, at: At) -> Result<BackoffPolicy, ConfigError> {
    let backoff = BackoffPolicy {
        base_ms: duration(raw.base_ms, DEFAULT_BACKOFF_BASE_MS, &at("backoff.base_ms"))?,
        max_ms: duration(raw.max_ms, DEFAULT_BACKOFF_MAX_MS, &at("backoff.max_ms"))?,
    };
    if backoff.max_ms < backoff.base_ms {
        return Err(ConfigError::new(at("backoff.max_ms"), "must be at least backoff.base_ms"));
    }
    Ok(backoff)
}

/// The largest response body read; also checks `max_fetches_per_hour`.
#[inline(never)]
fn compile_limits(raw: &RawProfile, at: At) -> Result<usize, ConfigError> {
    let max_response_bytes = raw.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
    if !(256..=MAX_RESPONSE_BYTES_LIMIT).contains(&max_response_bytes) {
        return Err(ConfigError::new(at("max_response_bytes"), "must be from 256 bytes to 1 MiB"));
    }
    if raw.max_fetches_per_hour == Some(0) {
        return Err(ConfigError::new(at("max_fetches_per_hour"), "must be at least 1 (omit it for no limit)"));
    }
    Ok(max_response_bytes)
}

/// Everything the token depends on goes into the key; where it goes (`inject`) and when it is
/// refreshed do not, so such changes keep the cached token across a reload.
#[inline(never)]
fn profile_cache_key(
    name: &str,
    raw: &RawProfile,
    grant_type: &str,
    parts: &RequestParts,
    token_field: &FieldPath,
    grant_assertion: Option<&JwtAssertion>,
    exchange: Option<&TokenExchange>,
) -> String {
    let exchange_part = super::exchange::cache_key_part(exchange);
    let all: [&str; 12] = [
        &raw.cluster,
        raw.token_url.as_deref().or(raw.issuer.as_deref()).unwrap_or_default(),
        &raw.client_id,
        raw.auth_method.name(),
        grant_type,
        &raw.scopes.join(" "),
        raw.audience.as_deref().unwrap_or(""),
        &parts.resources.join(" "),
        &parts.params.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"),
        &token_field.display(),
        // With the JWT-bearer grant, the assertion's claims say whose token it is.
        &grant_assertion
            .map(|a| {
                format!("{:?}|{:?}|{:?}", a.template.issuer, a.template.subject, a.template.audience)
                    + &serde_json::Value::Object(a.template.extra_claims.clone()).to_string()
            })
            .unwrap_or_default(),
        &exchange_part,
    ];
    // Only an exchange profile has the last part: the keys of every other profile stay as they were.
    let used = if exchange.is_some() { all.len() } else { all.len() - 1 };
    cache_key(name, all.get(..used).unwrap_or(&all))
}
