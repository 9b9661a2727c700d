//! Fuzzed routes and requests: a config built from fuzzed `match` fields either compiles or is
//! refused, and a compiled route table selects a profile for any request without panicking.
//! Authority patterns are also fuzzed directly; a pattern that parses matches its own text.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use oauth2_cc::core::config;
use oauth2_cc::core::route::{AuthorityPattern, RequestFacts, Selection};
use serde_json::{Map, Value, json};

#[derive(Arbitrary, Debug)]
struct Input {
    routes: Vec<RouteSpec>,
    /// The top-level `route_metadata` switch.
    route_metadata: bool,
    request: Request,
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

#[derive(Arbitrary, Debug)]
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
    fn header(&mut self, lower_case_name: &str) -> Option<String> {
        self.headers.iter().find(|(name, _)| name.eq_ignore_ascii_case(lower_case_name)).map(|(_, v)| v.clone())
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
    let Input { routes, route_metadata, mut request, pattern, other } = input;

    let routes: Vec<Value> = routes.iter().take(8).map(route_json).collect();
    let config_json = json!({"profiles": {"billing": profile("svc-a"), "crm": profile("svc-b")}, "routes": routes,
                             "route_metadata": route_metadata});
    if let Ok(config) = config::parse(config_json.to_string().as_bytes(), &|_| None) {
        let profiles = config.profiles.len();
        if let Some(index) = config.routes.select(&mut request) {
            assert!(index < profiles, "route selects profile {index} of {profiles}");
        }
        match config.routes.select_request(&mut request) {
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
    }
    let _ = AuthorityPattern::parse(&other).map(|p| p.matches(&pattern));
});
