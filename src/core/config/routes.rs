//! Compiles `routes[]`: each entry becomes a [`RouteMatcher`] that names its profile by index.

use super::ConfigError;
use super::checks::valid_header_name;
use super::raw::{RawMatch, RawRoute};
use super::runtime::Profile;
use crate::route::{AuthorityPattern, HeaderCondition, PathMatch, RouteMatcher};

#[inline(never)]
pub(super) fn compile_route(index: usize, raw: RawRoute, profiles: &[Profile]) -> Result<RouteMatcher, ConfigError> {
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
    let authority = match m.authority.as_deref() {
        Some(pattern) => Some(
            AuthorityPattern::parse(pattern)
                .ok_or_else(|| ConfigError::new(at("match.authority"), "not a host[:port] or *.suffix pattern"))?,
        ),
        None => None,
    };
    let path = path_match(&m, &at)?;
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

#[inline(never)]
fn path_match(m: &RawMatch, at: &dyn Fn(&str) -> String) -> Result<PathMatch, ConfigError> {
    match (&m.path_prefix, &m.path_exact) {
        (Some(_), Some(_)) => Err(ConfigError::new(at("match"), "give path_prefix or path_exact, not both")),
        (Some(prefix), None) => {
            if !prefix.starts_with('/') {
                return Err(ConfigError::new(at("match.path_prefix"), "must start with '/'"));
            }
            // Every path starts with "/": no need to read :path for it on each request.
            Ok(if prefix == "/" { PathMatch::Any } else { PathMatch::Prefix(prefix.clone()) })
        }
        (None, Some(exact)) => {
            if !exact.starts_with('/') {
                return Err(ConfigError::new(at("match.path_exact"), "must start with '/'"));
            }
            Ok(PathMatch::Exact(exact.clone()))
        }
        (None, None) => Ok(PathMatch::Any),
    }
}
