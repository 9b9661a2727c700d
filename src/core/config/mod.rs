//! Plugin configuration: the JSON model, its validation, and the compiled form the filter runs on.
//!
//! `parse` turns the plugin configuration bytes into a [`Config`] or a [`ConfigError`] whose `path`
//! names the offending JSON field (`profiles.billing.token_url`). Unknown fields are errors, so a typo
//! never silently turns a feature off. Secrets given as `{"env": "NAME"}` or `{"file": "/path"}`
//! are resolved here through the lookups the caller passes in ([`SecretSources`]: the host reads the
//! VM's environment, and the dynamic module its filesystem).
//!
//! The parts: `raw` is the JSON as written (serde, and the JSON Schema generated from it);
//! `profile`, `auth` and `routes` compile one section each, with the checks shared in `checks`;
//! `runtime` holds the compiled types, including the lifetime and backoff policies `cache` applies.
//!
//! `parse_with` and every compile step are `#[inline(never)]`: each runs once, from one caller, so the
//! optimiser would fold them all into one large function, and in the proxy-wasm build a large
//! function costs Envoy far more memory to compile than its parts (docs/memory.md, "Function
//! shape").

mod auth;
mod checks;
mod exchange;
#[cfg(test)]
mod exchange_tests;
mod profile;
mod raw;
mod raw_exchange;
mod routes;
pub(crate) mod runtime;
#[cfg(test)]
mod schema;
#[cfg(test)]
mod tests;

use serde_json::error::Category;

pub use checks::SecretSources;
pub(crate) use runtime::*;
pub use runtime::{Config, Profile};

use crate::route::RouteTable;
use raw::RawConfig;

/// A configuration error: the JSON path of the bad field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError { path: path.into(), reason: reason.into() }
    }
}

/// Parses and validates the plugin configuration. `env` looks up the VM's environment variables;
/// a secret file is refused (see [`parse_with`]).
pub fn parse(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    parse_with(bytes, SecretSources { env, file: None })
}

/// [`parse`] on a host that may also read secret files.
#[inline(never)]
pub fn parse_with(bytes: &[u8], sources: SecretSources) -> Result<Config, ConfigError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let raw: RawConfig = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        json_error(path, &err.into_inner())
    })?;
    deserializer.end().map_err(|err| json_error(String::new(), &err))?;
    compile(raw, sources)
}

/// A configuration a host accepted, and the line it logs at info level saying so.
#[derive(Debug)]
pub struct Loaded {
    pub config: std::sync::Arc<Config>,
    pub log_line: String,
}

/// What both hosts do with their plugin configuration bytes: parse them, and say what to log.
/// `Err` is the error-level line naming the bad field (never a secret); the host then refuses the
/// configuration.
pub fn load(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Loaded, String> {
    let config = parse(bytes, env).map_err(|error| rejected_message(&error))?;
    let log_line = configured_message(&config);
    Ok(Loaded { config: std::sync::Arc::new(config), log_line })
}

/// A value of the wrong type or shape is named by its JSON path. Broken JSON text is named by its
/// line and column, with the path of the object it broke in (serde writes the key it could not
/// read as `?`, which is dropped).
fn json_error(mut path: String, err: &serde_json::Error) -> ConfigError {
    let message = strip_position(&err.to_string());
    match err.classify() {
        Category::Syntax | Category::Eof => {
            while let Some(known) = path.strip_suffix('?').map(|p| p.trim_end_matches('.').to_string()) {
                path = known;
            }
            let reason = format!("invalid JSON at line {} column {}: {message}", err.line(), err.column());
            ConfigError::new(path, reason)
        }
        Category::Data | Category::Io => ConfigError::new(if path == "." { String::new() } else { path }, message),
    }
}

/// The line a host logs when it refuses a configuration at load (both hosts, and
/// `oauth2-cc validate`, say exactly this).
pub fn rejected_message(error: &ConfigError) -> String {
    one_line(&format!("configuration rejected: {error}"))
}

/// The line a host logs when a configuration loads: how many profiles, and their names.
pub fn configured_message(config: &Config) -> String {
    let names: Vec<&str> = config.profiles.iter().map(|p| p.name.as_str()).collect();
    one_line(&format!("configured {} profile(s): {}", names.len(), names.join(", ")))
}

/// A log line stays one line whatever a configuration holds: a profile name or a value echoed
/// back with a line break or another control character in it could otherwise forge log lines.
fn one_line(message: &str) -> String {
    if !message.contains(char::is_control) {
        return message.to_string();
    }
    message.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// serde_json appends " at line L column C" to its messages; the caller says where itself.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(index) => message[..index].to_string(),
        None => message.to_string(),
    }
}

#[inline(never)]
fn compile(raw: RawConfig, sources: SecretSources) -> Result<Config, ConfigError> {
    if raw.profiles.is_empty() {
        return Err(ConfigError::new("profiles", "at least one profile is required"));
    }
    let mut profiles = Vec::with_capacity(raw.profiles.len());
    for (name, raw_profile) in raw.profiles {
        profiles.push(profile::compile_profile(name, raw_profile, sources)?);
    }
    exchange::resolve_actors(&mut profiles)?;
    let mut matchers = Vec::with_capacity(raw.routes.len());
    for (index, route) in raw.routes.into_iter().enumerate() {
        matchers.push(routes::compile_route(index, route, &profiles)?);
    }
    let failure_status = raw.on_failure.status.unwrap_or(DEFAULT_FAILURE_STATUS);
    if !(400..=599).contains(&failure_status) {
        return Err(ConfigError::new("on_failure.status", "must be an HTTP error status from 400 to 599"));
    }
    let max_paused_requests = raw.max_paused_requests.map_or(DEFAULT_MAX_PAUSED_REQUESTS, |n| n as usize);
    // Bounded so the same configuration is valid on 64-bit hosts and in the 32-bit filter.
    if !(1..=1_000_000).contains(&max_paused_requests) {
        return Err(ConfigError::new("max_paused_requests", "must be from 1 to 1000000"));
    }
    let mut routes = RouteTable::new(matchers);
    if raw.route_metadata {
        routes = routes.with_route_metadata(profiles.iter().map(|p| p.name.clone()).collect());
    }
    Ok(Config { profiles, routes, failure_status, max_paused_requests })
}
