//! What the hosts' tests and the fuzz targets (`fuzz/`) check beyond the hosts' API: the parsers
//! the fuzzers feed hostile bytes, route selection, and the secret a configuration read. Behind the
//! `test-support` feature, which only dev-dependencies and the fuzz crate turn on.

pub use crate::config::runtime::FieldPath;
pub use crate::entry::{Entry, EntryView};
pub use crate::route::{AuthorityPattern, Selection};
pub use crate::token_response::{
    MAX_LIFETIME_S, MAX_TOKEN_BYTES, TokenError, TokenGrant, parse as parse_token_response,
};

use crate::config::runtime::ClientAuth;
use crate::config::{Config, Profile};
use crate::route::RequestFacts;

/// The profile the route table picks for a request (`None`: no token).
pub fn select(config: &Config, facts: &mut dyn RequestFacts) -> Option<usize> {
    config.routes.select(facts)
}

/// The route table's full answer for a request, unknown metadata profiles included.
pub fn select_request(config: &Config, facts: &mut dyn RequestFacts) -> Selection {
    config.routes.select_request(facts)
}

/// The client secret a `client_secret_basic` or `client_secret_post` profile sends.
pub fn client_secret(profile: &Profile) -> Option<&str> {
    match &profile.client_auth {
        ClientAuth::Basic { secret } | ClientAuth::Post { secret } => Some(secret.expose()),
        ClientAuth::ClientIdOnly | ClientAuth::Jwt { .. } => None,
    }
}
