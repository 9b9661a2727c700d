//! Which profile, if any, a request gets: the route table compiled from `routes`.
//!
//! Matchers are checked in order and the first that matches wins; a matching route with no profile
//! opts the request out. With `route_metadata` on, Envoy's own route configuration decides first:
//! `filter_metadata.oauth2_cc` with `profile: "<name>"` selects a profile and `disabled: true` opts
//! the route out. Request facts come through [`RequestFacts`] so the host fetches only what a
//! matcher actually looks at (a header, the route name or its metadata costs a host call).

use crate::url::split_authority;

/// What a matcher may ask about a request.
pub trait RequestFacts {
    fn authority(&mut self) -> Option<&str>;
    fn path(&mut self) -> Option<&str>;
    fn method(&mut self) -> Option<&str>;
    /// A request header's value as the client sent it: any bytes (obs-text, not UTF-8).
    fn header(&mut self, lower_case_name: &str) -> Option<Vec<u8>>;
    /// Whether the request carries header `lower_case_name`, whatever its value.
    fn has_header(&mut self, lower_case_name: &str) -> bool {
        self.header(lower_case_name).is_some()
    }
    fn route_name(&mut self) -> Option<String>;
    /// `filter_metadata.oauth2_cc.profile` of the Envoy route.
    fn metadata_profile(&mut self) -> Option<String>;
    /// `filter_metadata.oauth2_cc.disabled` of the Envoy route is `true`.
    fn metadata_disabled(&mut self) -> bool;
    /// A string value in the request's dynamic metadata (`None`: absent or not a string).
    fn dynamic_metadata_string(&mut self, _namespace: &str, _key: &str) -> Option<Vec<u8>> {
        None
    }
    /// Whether the request's dynamic metadata has `key` in `namespace`, whatever its value.
    fn dynamic_metadata_has_key(&mut self, _namespace: &str, _key: &str) -> bool {
        false
    }
}

/// Which profile a request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// No token for this request.
    None,
    Profile(usize),
    /// The route's metadata names a profile the configuration does not have: a deployment error
    /// that must not send the request without its token.
    UnknownProfile(String),
}

/// A `Host`/`:authority` pattern. Matching is case-insensitive and ignores a trailing dot on the
/// host; a pattern without a port matches any port, a pattern with one needs that exact port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityPattern {
    host: HostPattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`: any host ending in `.example.com` (not `example.com` itself).
    Suffix(String),
}

impl AuthorityPattern {
    pub fn parse(pattern: &str) -> Option<AuthorityPattern> {
        let (host, port) = split_authority(pattern).ok()?;
        let host = normalize_host(host);
        // Host names, IPv4 and bracketed IPv6 literals, and the leading wildcard: anything else
        // (a slash, a space, a control character) could never match and would hide a typo.
        let host_char = |b: u8| b.is_ascii_alphanumeric() || b"-._*[]:".contains(&b);
        if host.is_empty() || !host.bytes().all(host_char) {
            return None;
        }
        let host = match host.strip_prefix("*.") {
            Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => HostPattern::Suffix(format!(".{suffix}")),
            Some(_) => return None,
            None if host.contains('*') => return None,
            None => HostPattern::Exact(host),
        };
        Some(AuthorityPattern { host, port })
    }

    pub fn matches(&self, authority: &str) -> bool {
        let Ok((host, port)) = split_authority(authority) else {
            return false;
        };
        if self.port.is_some() && self.port != port {
            return false;
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        match &self.host {
            HostPattern::Exact(expected) => host.eq_ignore_ascii_case(expected),
            HostPattern::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

fn normalize_host(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathMatch {
    Any,
    /// Matches the path (query excluded) starting with this prefix.
    Prefix(String),
    /// Matches the path (query excluded) exactly.
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderCondition {
    /// Lower-case name.
    pub(crate) name: String,
    /// `None`: the header must be present; `Some(v)`: its value must equal `v`.
    pub(crate) value: Option<String>,
}

/// One compiled entry of `routes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteMatcher {
    pub(crate) authority: Option<AuthorityPattern>,
    pub(crate) path: PathMatch,
    /// Upper-case method.
    pub(crate) method: Option<String>,
    pub(crate) headers: Vec<HeaderCondition>,
    /// Envoy's route name (`xds.route_name`).
    pub(crate) route_name: Option<String>,
    /// Index into the profile list; `None` opts the request out.
    pub(crate) profile: Option<usize>,
}

impl RouteMatcher {
    fn matches(&self, facts: &mut dyn RequestFacts) -> bool {
        if let Some(pattern) = &self.authority
            && !facts.authority().is_some_and(|a| pattern.matches(a))
        {
            return false;
        }
        match &self.path {
            PathMatch::Any => {}
            PathMatch::Prefix(prefix) => {
                if !facts.path().is_some_and(|p| path_only(p).starts_with(prefix.as_str())) {
                    return false;
                }
            }
            PathMatch::Exact(exact) => {
                if facts.path().map(path_only) != Some(exact.as_str()) {
                    return false;
                }
            }
        }
        if let Some(method) = &self.method
            && !facts.method().is_some_and(|m| m.eq_ignore_ascii_case(method))
        {
            return false;
        }
        for condition in &self.headers {
            match (facts.header(&condition.name), &condition.value) {
                (None, _) => return false,
                // Bytes against bytes: a value that is not UTF-8 simply is not equal.
                (Some(actual), Some(expected)) if actual.as_slice() != expected.as_bytes() => return false,
                _ => {}
            }
        }
        if let Some(name) = &self.route_name
            && facts.route_name().as_deref() != Some(name.as_str())
        {
            return false;
        }
        true
    }
}

fn path_only(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// The ordered route matchers, and whether Envoy route metadata is consulted first.
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteTable {
    matchers: Vec<RouteMatcher>,
    /// Profile names by index, for metadata lookups; empty when metadata is not consulted.
    metadata_profiles: Vec<String>,
}

impl RouteTable {
    pub(crate) fn new(matchers: Vec<RouteMatcher>) -> Self {
        RouteTable { matchers, metadata_profiles: Vec::new() }
    }

    /// Consults `filter_metadata.oauth2_cc` of Envoy's route before the matchers.
    pub(crate) fn with_route_metadata(mut self, profile_names: Vec<String>) -> Self {
        self.metadata_profiles = profile_names;
        self
    }

    /// The profile index for a request: the first matching route decides; no match, no profile.
    pub(crate) fn select(&self, facts: &mut dyn RequestFacts) -> Option<usize> {
        self.matchers.iter().find(|m| m.matches(facts)).and_then(|m| m.profile)
    }

    /// The selection for a request: route metadata first (when enabled), then the matchers.
    pub(crate) fn select_request(&self, facts: &mut dyn RequestFacts) -> Selection {
        if !self.metadata_profiles.is_empty() {
            if facts.metadata_disabled() {
                return Selection::None;
            }
            if let Some(name) = facts.metadata_profile() {
                return match self.metadata_profiles.iter().position(|p| *p == name) {
                    Some(index) => Selection::Profile(index),
                    None => Selection::UnknownProfile(name),
                };
            }
        }
        match self.select(facts) {
            Some(index) => Selection::Profile(index),
            None => Selection::None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[derive(Default)]
    pub(crate) struct FakeRequest {
        pub(crate) authority: Option<String>,
        pub(crate) path: Option<String>,
        pub(crate) method: Option<String>,
        pub(crate) headers: Vec<(String, Vec<u8>)>,
        pub(crate) route_name: Option<String>,
        pub(crate) metadata_profile: Option<String>,
        pub(crate) metadata_disabled: bool,
    }

    impl RequestFacts for FakeRequest {
        fn authority(&mut self) -> Option<&str> {
            self.authority.as_deref()
        }
        fn path(&mut self) -> Option<&str> {
            self.path.as_deref()
        }
        fn method(&mut self) -> Option<&str> {
            self.method.as_deref()
        }
        fn header(&mut self, name: &str) -> Option<Vec<u8>> {
            self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
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

    fn request(authority: &str, path: &str) -> FakeRequest {
        FakeRequest {
            authority: Some(authority.into()),
            path: Some(path.into()),
            method: Some("GET".into()),
            ..Default::default()
        }
    }

    #[test]
    fn authority_patterns() {
        let cases = [
            ("billing.internal", "billing.internal", true),
            ("billing.internal", "BILLING.Internal", true),
            ("billing.internal", "billing.internal.", true),
            ("billing.internal", "billing.internal:8080", true),
            ("billing.internal.", "billing.internal", true),
            ("billing.internal:8080", "billing.internal:8080", true),
            ("billing.internal:8080", "billing.internal", false),
            ("billing.internal:8080", "billing.internal:9090", false),
            ("billing.internal", "evil-billing.internal", false),
            ("billing.internal", "billing.internal.evil.com", false),
            ("*.example.com", "api.example.com", true),
            ("*.example.com", "a.b.EXAMPLE.com:443", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "badexample.com", false),
            ("[::1]:8080", "[::1]:8080", true),
            ("billing.internal", "billing.internal:notaport", false),
            ("billing.internal:8443", "billing.internal:+8443", false),
        ];
        for (pattern, authority, expected) in cases {
            let compiled = AuthorityPattern::parse(pattern).expect(pattern);
            assert_eq!(compiled.matches(authority), expected, "{pattern} vs {authority}");
        }
        for bad in [
            "",
            "*.",
            "a.*.com",
            "host:port",
            "host:0",
            "host:65536",
            "host:+80",
            "host:",
            "*",
            "api.example.com/",
            "a b",
            "\u{0}",
            "https://x",
        ] {
            assert!(AuthorityPattern::parse(bad).is_none(), "{bad}");
        }
    }

    fn matcher(profile: usize) -> RouteMatcher {
        RouteMatcher {
            authority: None,
            path: PathMatch::Any,
            method: None,
            headers: vec![],
            route_name: None,
            profile: Some(profile),
        }
    }

    #[test]
    fn first_match_wins_and_null_profile_opts_out() {
        let table = RouteTable::new(vec![
            RouteMatcher { path: PathMatch::Exact("/health".into()), profile: None, ..matcher(0) },
            RouteMatcher { path: PathMatch::Prefix("/v1/".into()), ..matcher(1) },
            RouteMatcher { authority: AuthorityPattern::parse("billing.internal"), ..matcher(2) },
        ]);
        let cases = [
            ("billing.internal", "/health", None),
            ("billing.internal", "/health?x=1", None),
            ("other", "/v1/items?q=1", Some(1)),
            ("billing.internal", "/v2/x", Some(2)),
            ("other", "/v2/x", None),
            ("other", "/v1", None),
        ];
        for (authority, path, expected) in cases {
            assert_eq!(table.select(&mut request(authority, path)), expected, "{authority}{path}");
        }
    }

    #[test]
    fn route_metadata_decides_first_when_enabled() {
        let table = RouteTable::new(vec![RouteMatcher { path: PathMatch::Prefix("/".into()), ..matcher(0) }])
            .with_route_metadata(vec!["a".into(), "b".into()]);
        let mut plain = request("h", "/x");
        assert_eq!(table.select_request(&mut plain), Selection::Profile(0));
        plain.metadata_profile = Some("b".into());
        assert_eq!(table.select_request(&mut plain), Selection::Profile(1));
        plain.metadata_profile = Some("zzz".into());
        assert_eq!(table.select_request(&mut plain), Selection::UnknownProfile("zzz".into()));
        plain.metadata_disabled = true;
        assert_eq!(table.select_request(&mut plain), Selection::None);
        let without = RouteTable::new(vec![]);
        let mut tagged = request("h", "/x");
        tagged.metadata_profile = Some("b".into());
        assert_eq!(without.select_request(&mut tagged), Selection::None, "metadata ignored unless enabled");
    }

    #[test]
    fn method_headers_and_route_name() {
        let table = RouteTable::new(vec![
            RouteMatcher { method: Some("POST".into()), ..matcher(0) },
            RouteMatcher {
                headers: vec![HeaderCondition { name: "x-tenant".into(), value: Some("a".into()) }],
                ..matcher(1)
            },
            RouteMatcher { headers: vec![HeaderCondition { name: "x-use-token".into(), value: None }], ..matcher(2) },
            RouteMatcher { route_name: Some("billing-route".into()), ..matcher(3) },
        ]);
        let mut post = request("h", "/");
        post.method = Some("post".into());
        assert_eq!(table.select(&mut post), Some(0));
        let mut tenant = request("h", "/");
        tenant.headers = vec![("x-tenant".into(), b"a".to_vec())];
        assert_eq!(table.select(&mut tenant), Some(1));
        tenant.headers = vec![("x-tenant".into(), b"b".to_vec())];
        assert_eq!(table.select(&mut tenant), None);
        // obs-text and bytes that are not UTF-8: not equal to "a", and never a panic.
        tenant.headers = vec![("x-tenant".into(), b"\xff\xfe".to_vec())];
        assert_eq!(table.select(&mut tenant), None);
        tenant.headers = vec![("x-tenant".into(), b"a\x80".to_vec())];
        assert_eq!(table.select(&mut tenant), None);
        tenant.headers = vec![("x-use-token".into(), b"\x81".to_vec())];
        assert_eq!(table.select(&mut tenant), Some(2), "a present header is present, whatever its bytes");
        tenant.headers = vec![("x-use-token".into(), Vec::new())];
        assert_eq!(table.select(&mut tenant), Some(2));
        let mut named = request("h", "/");
        named.route_name = Some("billing-route".into());
        assert_eq!(table.select(&mut named), Some(3));
        assert_eq!(table.select(&mut request("h", "/")), None);
    }
}
