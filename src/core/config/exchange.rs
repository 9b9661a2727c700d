//! Compiles a profile's `token_exchange` (RFC 8693): where the subject token is, the token types,
//! the actor, what a request without a subject gets, and the bounds of the per-subject cache and of
//! the exchanges. The actor's profile is resolved once every profile is compiled
//! ([`resolve_actors`]). See docs/token-exchange.md.

use super::ConfigError;
use super::checks::{SecretSources, resolve_secret, valid_header_name, valid_header_value};
use super::raw::{RawProfile, TokenMethod};
use super::raw_exchange::{RawActor, RawExchangeLimits, RawMissingSubject, RawSubject, RawSubjectCache};
use super::runtime::*;
use crate::token_response::MAX_TOKEN_BYTES;

type At<'a> = &'a dyn Fn(&str) -> String;

const MAX_SUBJECTS_LIMIT: u32 = 1_000_000;
const MAX_CACHE_BYTES: u64 = 1 << 30;

/// The profile's token exchange: `None` for any other grant; an error when the grant and the
/// `token_exchange` object do not come together, or a field is wrong.
#[inline(never)]
pub(super) fn compile_exchange(
    raw: &mut RawProfile,
    grant_type: &str,
    at: At,
    sources: SecretSources,
) -> Result<Option<TokenExchange>, ConfigError> {
    let exchange_grant = grant_type == TOKEN_EXCHANGE_GRANT_TYPE;
    let Some(mut te) = raw.token_exchange.take() else {
        if exchange_grant {
            return Err(ConfigError::new(
                at("token_exchange"),
                format!("is required with grant_type {TOKEN_EXCHANGE_GRANT_TYPE}"),
            ));
        }
        return Ok(None);
    };
    if !exchange_grant {
        return Err(ConfigError::new(
            at("token_exchange"),
            format!("is only used with grant_type {TOKEN_EXCHANGE_GRANT_TYPE}"),
        ));
    }
    if raw.method == TokenMethod::Get {
        return Err(ConfigError::new(
            at("method"),
            "a token exchange is POSTed: GET would put the subject token in the URL",
        ));
    }
    if raw.issuer.is_some() {
        return Err(ConfigError::new(at("issuer"), "token exchange needs token_url: its endpoint is not discovered"));
    }
    if raw.max_fetches_per_hour.is_some() {
        return Err(ConfigError::new(
            at("max_fetches_per_hour"),
            "is not used with token exchange: token_exchange.limits bounds its token requests",
        ));
    }
    if raw.inject.keep_existing {
        return Err(ConfigError::new(
            at("inject.keep_existing"),
            "is not used with token exchange: the request's own token is the subject, replaced by the exchanged one",
        ));
    }
    for reserved in ["subject_token", "actor_token"] {
        if raw.params.contains_key(reserved) {
            return Err(ConfigError::new(
                format!("{}.{reserved}", at("params")),
                "is the filter's: the subject and actor tokens come from token_exchange",
            ));
        }
    }
    let subject = compile_subject(te.subject.take(), at)?;
    let subject_token_type = token_type(te.subject_token_type.take(), &at("token_exchange.subject_token_type"))?;
    let requested_token_type = match te.requested_token_type.take() {
        Some(value) => Some(token_type(Some(value), &at("token_exchange.requested_token_type"))?),
        None => None,
    };
    let actor = match te.actor.take() {
        Some(actor) => Some(compile_actor(actor, at, sources)?),
        None => None,
    };
    if te.verified_by_jwt_authn.as_deref() == Some("") {
        return Err(ConfigError::new(
            at("token_exchange.verified_by_jwt_authn"),
            "must name the payload_in_metadata key",
        ));
    }
    Ok(Some(TokenExchange {
        subject,
        subject_token_type,
        requested_token_type,
        actor,
        missing_subject: match te.missing_subject {
            RawMissingSubject::Reject => MissingSubject::Reject,
            RawMissingSubject::Pass => MissingSubject::Pass,
        },
        verified_by_jwt_authn: te.verified_by_jwt_authn,
        cache: compile_cache(&te.cache, at)?,
        limits: compile_limits(&te.limits, at)?,
    }))
}

fn compile_subject(raw: Option<RawSubject>, at: At) -> Result<SubjectSource, ConfigError> {
    let path = at("token_exchange.subject");
    let Some(raw) = raw else {
        return Ok(SubjectSource::Header { name: "authorization".into(), prefix: "Bearer ".into() });
    };
    match (raw.header, raw.metadata) {
        (Some(header), None) => {
            let name = valid_header_name(&header)
                .filter(|h| !h.starts_with(':'))
                .ok_or_else(|| ConfigError::new(format!("{path}.header"), "not a request header name"))?;
            let default_prefix = if name == "authorization" { "Bearer " } else { "" };
            let prefix = raw.prefix.unwrap_or_else(|| default_prefix.to_string());
            if !valid_header_value(&prefix) {
                return Err(ConfigError::new(format!("{path}.prefix"), "contains a control character"));
            }
            Ok(SubjectSource::Header { name, prefix })
        }
        (None, Some(metadata)) => {
            if raw.prefix.is_some() {
                return Err(ConfigError::new(format!("{path}.prefix"), "is only used with header"));
            }
            if metadata.namespace.is_empty() {
                return Err(ConfigError::new(format!("{path}.metadata.namespace"), "must not be empty"));
            }
            if metadata.key.is_empty() {
                return Err(ConfigError::new(format!("{path}.metadata.key"), "must not be empty"));
            }
            Ok(SubjectSource::Metadata { namespace: metadata.namespace, key: metadata.key })
        }
        (Some(_), Some(_)) => Err(ConfigError::new(path, "give header or metadata, not both")),
        (None, None) => Err(ConfigError::new(path, "give header or metadata")),
    }
}

fn token_type(value: Option<String>, path: &str) -> Result<String, ConfigError> {
    let value = value.unwrap_or_else(|| ACCESS_TOKEN_TYPE.to_string());
    if value.is_empty() || value.chars().any(char::is_whitespace) {
        return Err(ConfigError::new(path, "a token type is a non-empty URI (RFC 8693 §3)"));
    }
    Ok(value)
}

fn compile_actor(raw: RawActor, at: At, sources: SecretSources) -> Result<Actor, ConfigError> {
    let path = at("token_exchange.actor");
    let token_type = token_type(raw.token_type, &format!("{path}.token_type"))?;
    match (raw.token, raw.profile) {
        (Some(source), None) => {
            let token = resolve_secret(source, &format!("{path}.token"), sources)?;
            Ok(Actor::Static { token, token_type })
        }
        (None, Some(name)) => Ok(Actor::Profile { name, index: usize::MAX, token_type }),
        (Some(_), Some(_)) => Err(ConfigError::new(path, "give token or profile, not both")),
        (None, None) => Err(ConfigError::new(path, "give token or profile")),
    }
}

fn compile_cache(raw: &RawSubjectCache, at: At) -> Result<SubjectCacheBounds, ConfigError> {
    let requested = raw.max_subjects.unwrap_or(DEFAULT_MAX_SUBJECTS);
    if !(1..=MAX_SUBJECTS_LIMIT).contains(&requested) {
        return Err(ConfigError::new(at("token_exchange.cache.max_subjects"), "must be from 1 to 1000000"));
    }
    let sets = (requested as usize).div_ceil(SUBJECT_SET_WAYS);
    let max_bytes = raw.max_bytes.unwrap_or(DEFAULT_SUBJECT_CACHE_BYTES);
    let least = (sets * MIN_SUBJECT_SET_BYTES) as u64;
    if max_bytes < least || max_bytes > MAX_CACHE_BYTES {
        return Err(ConfigError::new(
            at("token_exchange.cache.max_bytes"),
            format!(
                "must be from {least} (each of the {sets} sets of {SUBJECT_SET_WAYS} subjects holds a {MAX_TOKEN_BYTES}-byte token) to {MAX_CACHE_BYTES}"
            ),
        ));
    }
    let set_bytes = usize::try_from(max_bytes / sets as u64).unwrap_or(usize::MAX);
    Ok(SubjectCacheBounds { max_subjects: sets * SUBJECT_SET_WAYS, sets, max_bytes, set_bytes })
}

fn compile_limits(raw: &RawExchangeLimits, at: At) -> Result<ExchangeLimits, ConfigError> {
    let per_second = raw.exchanges_per_second.unwrap_or(DEFAULT_EXCHANGES_PER_SECOND);
    if !(1..=100_000).contains(&per_second) {
        return Err(ConfigError::new(at("token_exchange.limits.exchanges_per_second"), "must be from 1 to 100000"));
    }
    let burst = raw.burst.unwrap_or(per_second.saturating_mul(2));
    if !(1..=1_000_000).contains(&burst) {
        return Err(ConfigError::new(at("token_exchange.limits.burst"), "must be from 1 to 1000000"));
    }
    let max_in_flight = raw.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
    if !(1..=256).contains(&max_in_flight) {
        return Err(ConfigError::new(at("token_exchange.limits.max_in_flight"), "must be from 1 to 256"));
    }
    Ok(ExchangeLimits { per_second, burst, max_in_flight })
}

/// Resolves each exchange's `actor.profile` to the index of a non-exchange profile that is not
/// the profile itself.
#[inline(never)]
pub(super) fn resolve_actors(profiles: &mut [Profile]) -> Result<(), ConfigError> {
    let names: Vec<(String, bool)> = profiles.iter().map(|p| (p.name.clone(), p.exchange.is_some())).collect();
    for profile in profiles.iter_mut() {
        let own = profile.name.clone();
        let Some(TokenExchange { actor: Some(Actor::Profile { name, index, .. }), .. }) = &mut profile.exchange else {
            continue;
        };
        let path = format!("profiles.{own}.token_exchange.actor.profile");
        let found = names.iter().position(|(n, _)| n == name);
        match found {
            None => return Err(ConfigError::new(path, format!("no profile is named {name:?}"))),
            Some(_) if *name == own => return Err(ConfigError::new(path, "a profile cannot be its own actor")),
            Some(i) if names.get(i).is_some_and(|(_, exchange)| *exchange) => {
                return Err(ConfigError::new(path, "must name a profile that is not a token exchange"));
            }
            Some(i) => *index = i,
        }
    }
    Ok(())
}

/// What of the exchange settings the token depends on, for the profile's cache key.
pub(super) fn cache_key_part(exchange: Option<&TokenExchange>) -> String {
    let Some(te) = exchange else { return String::new() };
    let subject = match &te.subject {
        SubjectSource::Header { name, prefix } => format!("h:{name}:{prefix}"),
        SubjectSource::Metadata { namespace, key } => format!("m:{namespace}:{key}"),
    };
    let actor = match &te.actor {
        None => String::new(),
        Some(Actor::Static { token_type, .. }) => format!("static:{token_type}"),
        Some(Actor::Profile { name, token_type, .. }) => format!("profile:{name}:{token_type}"),
    };
    format!(
        "{subject}|{}|{}|{actor}|{}",
        te.subject_token_type,
        te.requested_token_type.as_deref().unwrap_or(""),
        te.cache.sets
    )
}
