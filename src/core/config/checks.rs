//! Field checks shared by the sections: secrets, durations, field paths, header names and values,
//! and the cache-key fingerprint.

use super::ConfigError;
use super::raw::SecretSource;
use super::runtime::{FieldPath, MAX_DURATION_MS};
use crate::secret::Secret;

/// Looks up a secret: inline, or the VM's environment variable; empty is refused.
pub(super) fn resolve_secret(
    source: SecretSource,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    let secret = match source {
        SecretSource::Inline(secret) => secret,
        SecretSource::Env(name) => match env(&name) {
            Some(value) => Secret::new(value),
            None => {
                return Err(ConfigError::new(
                    path,
                    format!("environment variable {name:?} is not set for the VM (vm_config.environment_variables)"),
                ));
            }
        },
    };
    if secret.is_empty() {
        return Err(ConfigError::new(path, "is empty"));
    }
    Ok(secret)
}

/// A duration in milliseconds: `default` when absent, otherwise from 1 ms to a day.
pub(super) fn duration(value: Option<u64>, default: u64, path: &str) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::new(path, "must be greater than 0")),
        Some(ms) if ms > MAX_DURATION_MS => Err(ConfigError::new(path, "must be at most a day")),
        Some(ms) => Ok(ms),
    }
}

pub(super) fn field_path(path: &str, at: &str) -> Result<FieldPath, ConfigError> {
    FieldPath::parse(path).ok_or_else(|| ConfigError::new(at, "a field path is names joined by '.', none empty"))
}

/// An HTTP header name (RFC 9110 token), lower-cased; `None` if it is not one.
pub fn valid_header_name(name: &str) -> Option<String> {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// A header value Envoy will accept as is: no CR, LF, NUL or other control characters but tab.
pub fn valid_header_value(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// The shared-data key of a profile: name plus a fingerprint of what the token depends on, so a
/// configuration change that asks for a different token never serves the old one.
pub(super) fn cache_key(profile: &str, parts: &[&str]) -> String {
    // FNV-1a: stable across builds and platforms, and good enough to tell configurations apart.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("oauth2_cc.v1.token.{profile}.{hash:016x}")
}
