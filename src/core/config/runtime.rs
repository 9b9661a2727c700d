//! The compiled configuration the filter runs on: profiles, their client authentication, where the
//! token goes, and the lifetime and backoff policies that `cache` applies. Every value here has
//! passed validation; the defaults are the documented ones.

use crate::assertion::{AssertionSigner, AssertionTemplate};
use crate::route::RouteTable;
use crate::secret::Secret;
use crate::url::HttpUrl;

pub(crate) use super::raw::{AuthMethod, TokenMethod};

/// The validated configuration the filter runs on.
#[derive(Debug)]
pub struct Config {
    pub profiles: Vec<Profile>,
    pub(crate) routes: RouteTable,
    pub(crate) failure_status: u32,
    /// Requests one VM (worker) may hold paused waiting for a token; beyond it, the failure reply.
    pub(crate) max_paused_requests: usize,
}

/// Where the token endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenEndpoint {
    Fixed(HttpUrl),
    /// Read from the issuer's metadata at start-up.
    Discovered {
        issuer: String,
        issuer_url: HttpUrl,
    },
}

/// The client authentication a profile uses, with the secret it needs.
#[derive(Debug, Clone)]
pub(crate) enum ClientAuth {
    Basic {
        secret: Secret,
    },
    Post {
        secret: Secret,
    },
    /// `none` and `tls_client_auth`: only `client_id` is sent.
    ClientIdOnly,
    /// `client_secret_jwt` and `private_key_jwt`: a fresh signed assertion per token request.
    Jwt {
        assertion: JwtAssertion,
        send_client_id: bool,
    },
}

/// How to make the RFC 7523 assertions of a profile: the checked key and the fixed claims.
#[derive(Debug, Clone)]
pub(crate) struct JwtAssertion {
    pub(crate) signer: AssertionSigner,
    pub(crate) template: AssertionTemplate,
}

pub(crate) const DEFAULT_ASSERTION_LIFETIME_S: u64 = 60;

/// One named way of getting a token.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub(crate) cluster: String,
    pub(crate) endpoint: TokenEndpoint,
    pub(crate) client_id: String,
    pub(crate) auth_method: AuthMethod,
    pub(crate) client_auth: ClientAuth,
    pub(crate) grant_type: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) audience: Option<String>,
    pub(crate) resources: Vec<String>,
    /// Extra body/query parameters; a name given here replaces the filter's own parameter.
    pub(crate) params: Vec<(String, String)>,
    pub(crate) request_headers: Vec<(String, String)>,
    pub(crate) method: TokenMethod,
    pub(crate) timeout_ms: u64,
    pub(crate) max_wait_ms: u64,
    pub(crate) token_field: FieldPath,
    pub(crate) expires_in_field: FieldPath,
    pub(crate) inject: Injection,
    pub(crate) lifetime: LifetimePolicy,
    pub(crate) backoff: BackoffPolicy,
    /// Token requests allowed per hour, if limited.
    pub(crate) max_fetches_per_hour: Option<u32>,
    /// Largest response body read.
    pub max_response_bytes: usize,
    /// RFC 7523 §2.1 JWT-bearer grant: the assertion sent as `assertion`.
    pub(crate) grant_assertion: Option<JwtAssertion>,
    /// Upstream statuses that mean "this token was rejected": the cached token is dropped.
    pub(crate) purge_on_status: Vec<u32>,
    /// The shared-data key of this profile's cache entry; changes when what the token depends on changes.
    pub cache_key: String,
    /// RFC 8693 token exchange: a token per subject instead of one per profile.
    pub(crate) exchange: Option<TokenExchange>,
}

/// Where the token goes on the upstream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Injection {
    /// Lower-case header name.
    pub(crate) header: String,
    pub(crate) prefix: String,
    pub(crate) keep_existing: bool,
}

/// How a token's lifetime is turned into refresh and expiry times.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LifetimePolicy {
    /// Fraction of the lifetime after which a background refresh starts.
    pub(crate) ahead_ratio: f64,
    /// Lifetime assumed when the IdP sends no `expires_in`.
    pub(crate) default_ttl_s: u64,
    /// Safety margin taken off the lifetime (capped at a tenth of it for short-lived tokens).
    pub(crate) skew_s: u64,
}

/// Retry spacing after failed token requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackoffPolicy {
    pub(crate) base_ms: u64,
    pub(crate) max_ms: u64,
}

/// A dotted path into a JSON object (`data.token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(pub Vec<String>);

impl FieldPath {
    pub(super) fn parse(path: &str) -> Option<FieldPath> {
        let parts: Vec<String> = path.split('.').map(str::to_string).collect();
        if parts.iter().any(String::is_empty) {
            return None;
        }
        Some(FieldPath(parts))
    }

    pub(crate) fn display(&self) -> String {
        self.0.join(".")
    }
}

pub(crate) const DEFAULT_GRANT_TYPE: &str = "client_credentials";
pub(crate) const DEFAULT_TIMEOUT_MS: u64 = 5_000;
pub(crate) const DEFAULT_AHEAD_RATIO: f64 = 0.8;
pub(crate) const DEFAULT_TTL_S: u64 = 300;
pub(crate) const DEFAULT_SKEW_S: u64 = 5;
pub(crate) const DEFAULT_BACKOFF_BASE_MS: u64 = 1_000;
pub(crate) const DEFAULT_BACKOFF_MAX_MS: u64 = 60_000;
pub(crate) const DEFAULT_FAILURE_STATUS: u32 = 503;
pub(crate) const DEFAULT_MAX_PAUSED_REQUESTS: usize = 1_000;
pub(crate) const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;
pub(super) const MAX_RESPONSE_BYTES_LIMIT: usize = 1024 * 1024;
/// Upper bound for any configured duration: a day is far beyond any sane timeout or wait.
pub(super) const MAX_DURATION_MS: u64 = 86_400_000;

/// RFC 8693 §2.1 `grant_type` of a token-exchange profile.
pub(crate) const TOKEN_EXCHANGE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 §3 token type of an OAuth access token: the default subject and actor token type.
pub(crate) const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The dynamic-metadata namespace Envoy's jwt_authn filter writes its verified payload under.
pub(crate) const JWT_AUTHN_NAMESPACE: &str = "envoy.filters.http.jwt_authn";
/// Subject entries per set of the per-subject cache (docs/token-exchange.md, "Store layout").
pub(crate) const SUBJECT_SET_WAYS: usize = 8;

/// How a token-exchange profile gets and caches per-subject tokens (docs/token-exchange.md).
#[derive(Debug, Clone)]
pub(crate) struct TokenExchange {
    pub(crate) subject: SubjectSource,
    pub(crate) subject_token_type: String,
    pub(crate) requested_token_type: Option<String>,
    pub(crate) actor: Option<Actor>,
    pub(crate) missing_subject: MissingSubject,
    /// The jwt_authn `payload_in_metadata` key that must be present for the request, if required.
    pub(crate) verified_by_jwt_authn: Option<String>,
    pub(crate) cache: SubjectCacheBounds,
    pub(crate) limits: ExchangeLimits,
}

/// Where a request's subject token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SubjectSource {
    /// The value of request header `name` (lower case) after `prefix` (compared ignoring case).
    Header { name: String, prefix: String },
    /// A string in the request's dynamic metadata.
    Metadata { namespace: String, key: String },
}

/// What to do with a request that has no subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MissingSubject {
    /// Answer 401.
    Reject,
    /// Send it on untouched, with no token.
    Pass,
}

/// The RFC 8693 `actor_token` of an exchange.
#[derive(Debug, Clone)]
pub(crate) enum Actor {
    Static {
        token: Secret,
        token_type: String,
    },
    /// The current token of profile `index` (a non-exchange profile of the same configuration).
    Profile {
        name: String,
        index: usize,
        token_type: String,
    },
}

/// The bounds of one profile's per-subject cache: `sets` sets of [`SUBJECT_SET_WAYS`] entries,
/// each set's value at most `set_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubjectCacheBounds {
    pub(crate) max_subjects: usize,
    pub(crate) sets: usize,
    pub(crate) max_bytes: u64,
    pub(crate) set_bytes: usize,
}

/// Limits on a profile's token requests, per Envoy process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExchangeLimits {
    pub(crate) per_second: u32,
    pub(crate) burst: u32,
    pub(crate) max_in_flight: u32,
}

/// The least byte share of one set: one largest token and its entry's bookkeeping.
pub(crate) const MIN_SUBJECT_SET_BYTES: usize = crate::token_response::MAX_TOKEN_BYTES + 256;
pub(crate) const DEFAULT_MAX_SUBJECTS: u32 = 1024;
pub(crate) const DEFAULT_SUBJECT_CACHE_BYTES: u64 = 8 * 1024 * 1024;
pub(crate) const DEFAULT_EXCHANGES_PER_SECOND: u32 = 20;
pub(crate) const DEFAULT_MAX_IN_FLIGHT: u32 = 8;
