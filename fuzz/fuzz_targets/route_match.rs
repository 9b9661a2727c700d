//! Fuzzed routes and requests: a config built from fuzzed `match` fields either compiles or is
//! refused, and a compiled route table selects a profile for any request without panicking.
//! Request fields may be derived from a route's own fields, so the matching branches are reached
//! and not only the early "no match" exits. Authority patterns are also fuzzed directly: a pattern
//! that parses matches its own text and, for `*.suffix`, any host ending in `.suffix`.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use oauth2_cc_core::config;
use oauth2_cc_core::request::RequestFacts;
use oauth2_cc_core::test_support::{AuthorityPattern, Selection, select, select_request};
use serde_json::{Map, Value, json};

#[derive(Arbitrary, Debug)]
struct Input {
    routes: Vec<RouteSpec>,
    /// The top-level `route_metadata` switch.
    route_metadata: bool,
    request: RequestSpec,
    /// Parsed with `AuthorityPattern::parse` and matched against `other`.
    pattern: String,
    other: String,
}

#[derive(Arbitrary, Debug)]
struct RouteSpec {
    authority: Option<String>,
    path: Option<PathSpec>,
    method: Option<String>,
    header: Option<(String, Option<String>)>,
    route_name: Option<String>,
    /// Which profile the route names (`None` opts requests out).
    profile: Option<bool>,
}

#[derive(Arbitrary, Debug)]
enum PathSpec {
    Prefix(String),
    Exact(String),
}

/// A request field: given outright, or taken from route `index` (modulo the route count) with `tail`.
#[derive(Arbitrary, Debug)]
enum Fact {
    Given(Option<String>),
    FromRoute { index: u8, tail: String },
}

#[derive(Arbitrary, Debug)]
struct RequestSpec {
    /// From a route: `tail` replaces a leading `*` of its pattern, or is appended after a `:`.
    authority: Fact,
    /// From a route: its prefix or exact path, then `tail`.
    path: Fact,
    /// From a route: its method, lower-cased when `tail` is empty (methods match case-insensitively).
    method: Fact,
    headers: Vec<(String, String)>,
    /// Adds the header a route looks for, with the value it wants.
    header_from_route: Option<u8>,
    route_name: Fact,
    metadata_profile: Option<String>,
    metadata_disabled: bool,
}

struct Request {
    authority: Option<String>,
    path: Option<String>,
    method: Option<String>,
    headers: Vec<(String, String)>,
    route_name: Option<String>,
    metadata_profile: Option<String>,
    metadata_disabled: bool,
}

impl RequestFacts for Request {
    fn authority(&mut self) -> Option<&str> {
        self.authority.as_deref()
    }
    fn path(&mut self) -> Option<&str> {
        self.path.as_deref()
    }
    fn method(&mut self) -> Option<&str> {
        self.method.as_deref()
    }
    fn header(&mut self, lower_case_name: &str) -> Option<Vec<u8>> {
        self.headers.iter().find(|(name, _)| name.eq_ignore_ascii_case(lower_case_name)).map(|(_, v)| v.clone().into_bytes())
    }
    fn route_name(&mut self) -> Option<String> {
        self.route_name.clone()
    }
    fn metadata_profile(&mut self) -> Option<String> {
        self.metadata_profile.clone()
    }
    fn metadata_disabled(&mut self) -> bool {
        self.metadata_disabled
    }
}

fn resolve(fact: Fact, routes: &[RouteSpec], field: impl Fn(&RouteSpec, String) -> Option<String>) -> Option<String> {
    match fact {
        Fact::Given(value) => value,
        Fact::FromRoute { index, tail } if !routes.is_empty() => {
            field(&routes[usize::from(index) % routes.len()], tail)
        }
        Fact::FromRoute { .. } => None,
    }
}

fn request(spec: RequestSpec, routes: &[RouteSpec]) -> Request {
    let authority = resolve(spec.authority, routes, |r, tail| {
        let pattern = r.authority.as_deref()?;
        Some(match pattern.strip_prefix('*') {
            Some(suffix) => format!("{tail}{suffix}"),
            None if tail.is_empty() => pattern.to_string(),
            None => format!("{pattern}:{tail}"),
        })
    });
    let path = resolve(spec.path, routes, |r, tail| match &r.path {
        Some(PathSpec::Prefix(p) | PathSpec::Exact(p)) => Some(format!("{p}{tail}")),
        None => Some(tail),
    });
    let method = resolve(spec.method, routes, |r, tail| {
        let method = r.method.as_deref()?;
        Some(if tail.is_empty() { method.to_ascii_lowercase() } else { method.to_string() })
    });
    let route_name = resolve(spec.route_name, routes, |r, tail| Some(r.route_name.clone().unwrap_or(tail)));
    let mut headers = spec.headers;
    if let Some(index) = spec.header_from_route.filter(|_| !routes.is_empty()) {
        if let Some((name, value)) = &routes[usize::from(index) % routes.len()].header {
            headers.insert(0, (name.clone(), value.clone().unwrap_or_default()));
        }
    }
    Request {
        authority,
        path,
        method,
        headers,
        route_name,
        metadata_profile: spec.metadata_profile,
        metadata_disabled: spec.metadata_disabled,
    }
}

fn profile(client_id: &str) -> Value {
    json!({"cluster": "idp", "token_url": "https://idp.example.com/oauth2/token",
           "client_id": client_id, "client_secret": "s3cret"})
}

fn route_json(spec: &RouteSpec) -> Value {
    let mut matcher = Map::new();
    if let Some(authority) = &spec.authority {
        matcher.insert("authority".into(), json!(authority));
    }
    match &spec.path {
        Some(PathSpec::Prefix(prefix)) => matcher.insert("path_prefix".into(), json!(prefix)),
        Some(PathSpec::Exact(exact)) => matcher.insert("path_exact".into(), json!(exact)),
        None => None,
    };
    if let Some(method) = &spec.method {
        matcher.insert("method".into(), json!(method));
    }
    if let Some((name, value)) = &spec.header {
        matcher.insert("headers".into(), json!([{"name": name, "value": value}]));
    }
    if let Some(route_name) = &spec.route_name {
        matcher.insert("route_name".into(), json!(route_name));
    }
    let profile = match spec.profile {
        Some(true) => json!("billing"),
        Some(false) => json!("crm"),
        None => Value::Null,
    };
    json!({"match": matcher, "profile": profile})
}

fuzz_target!(|input: Input| {
    let Input { mut routes, route_metadata, request: request_spec, pattern, other } = input;
    routes.truncate(8);

    let config_json = json!({"profiles": {"billing": profile("svc-a"), "crm": profile("svc-b")},
                             "routes": routes.iter().map(route_json).collect::<Vec<_>>(),
                             "route_metadata": route_metadata});
    if let Ok(config) = config::parse(config_json.to_string().as_bytes(), &|_| None) {
        let mut request = request(request_spec, &routes);
        let profiles = config.profiles.len();
        if let Some(index) = select(&config, &mut request) {
            assert!(index < profiles, "route selects profile {index} of {profiles}");
        }
        match select_request(&config, &mut request) {
            Selection::Profile(index) => assert!(index < profiles, "selects profile {index} of {profiles}"),
            Selection::UnknownProfile(name) => {
                assert!(route_metadata, "metadata consulted with route_metadata off");
                assert!(!config.profiles.iter().any(|p| p.name == name), "known profile {name:?} called unknown");
            }
            Selection::None => {}
        }
    }

    if let Some(parsed) = AuthorityPattern::parse(&pattern) {
        let _ = parsed.matches(&other);
        assert!(parsed.matches(&pattern), "pattern {pattern:?} does not match its own text");
        if let Some(suffix) = pattern.strip_prefix("*.") {
            let host = format!("{other}.{suffix}");
            if !other.is_empty() && !other.contains([':', '[']) && !suffix.contains(':') {
                assert!(parsed.matches(&host), "pattern {pattern:?} does not match {host:?}");
            }
        }
    }
    let _ = AuthorityPattern::parse(&other).map(|p| p.matches(&pattern));
});
