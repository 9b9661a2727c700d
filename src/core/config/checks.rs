//! Field checks shared by the sections: secrets, durations, field paths, header names and values,
//! and the cache-key fingerprint.

use super::ConfigError;
use super::raw::SecretSource;
use super::runtime::{FieldPath, MAX_DURATION_MS};
use crate::secret::Secret;

/// Reads a secret file whole; `Err` says why not, never with any of its content.
pub(crate) type ReadFile<'a> = &'a dyn Fn(&str) -> Result<String, String>;

/// Where secrets given by reference are read: the VM's environment (`{"env": NAME}`) and, on a
/// host with a filesystem, files (`{"file": PATH}`).
#[derive(Clone, Copy)]
pub struct SecretSources<'a> {
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// `None`: this host reads no files (a proxy-wasm VM has no filesystem).
    pub file: Option<ReadFile<'a>>,
}

/// Looks up a secret: inline, the VM's environment variable, or a file; empty is refused.
pub(super) fn resolve_secret(source: SecretSource, path: &str, sources: SecretSources) -> Result<Secret, ConfigError> {
    let secret = match source {
        SecretSource::Inline(secret) => secret,
        SecretSource::File(file) => read_secret_file(&file, path, sources)?,
        SecretSource::Env(name) => match (sources.env)(&name) {
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

/// A secret file's content, less its line ending: files written with `echo` or an editor end in
/// one, and no client secret or PEM key needs it.
fn read_secret_file(file: &str, path: &str, sources: SecretSources) -> Result<Secret, ConfigError> {
    let Some(read) = sources.file else {
        return Err(ConfigError::new(
            path,
            r#"secret files are read by the dynamic module only (a wasm VM has no filesystem): use {"env": "NAME"} or an inline value"#,
        ));
    };
    if !file.starts_with('/') {
        return Err(ConfigError::new(path, format!("file {file:?} must be an absolute path")));
    }
    match read(file) {
        Ok(text) => Ok(Secret::new(text.trim_end_matches(['\n', '\r']))),
        Err(reason) => Err(ConfigError::new(path, format!("file {file:?} cannot be read: {reason}"))),
    }
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
pub(crate) fn valid_header_name(name: &str) -> Option<String> {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// A header value Envoy will accept as is: no CR, LF, NUL or other control characters but tab.
pub(crate) fn valid_header_value(value: &str) -> bool {
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
