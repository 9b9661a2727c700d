//! Secrets the configuration reads from files (`{"file": "/path"}`): read at load, watched
//! afterwards, and the configuration compiled again when one changes, so a rotated client secret
//! or signing key is used by the next token request, without a restart and without dropping the
//! cached token (the cache key does not depend on a secret's value).
//!
//! A file is known by what its path resolves to (device, inode, size, modification time), so
//! Kubernetes' update of a mounted Secret, which swaps a `..data` symlink, is seen like an edit in
//! place. Only the main thread polls, at most once a second.

use std::cell::RefCell;
use std::os::unix::fs::MetadataExt;

use oauth2_cc_core::config::{self, Config, ConfigError, SecretSources};

/// How often the files are looked at.
pub const POLL_PERIOD_MS: u64 = 1_000;

/// What a path resolves to; another value means another file or new content.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    device: u64,
    inode: u64,
    len: u64,
    modified_ns: i128,
}

fn stamp(path: &str) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    let modified_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    Some(Stamp { device: meta.dev(), inode: meta.ino(), len: meta.len(), modified_ns })
}

/// Each file the configuration read, with what its path resolved to when it was read.
type Watched = Vec<(String, Option<Stamp>)>;

/// The configuration's bytes and the files it read.
pub struct SecretFiles {
    bytes: Vec<u8>,
    watched: Watched,
    next_poll_ms: u64,
}

/// Compiles `bytes`, reading secret files from disk; the watcher is `None` when no file was read.
pub fn load(bytes: &[u8], now_ms: u64) -> Result<(Config, Option<SecretFiles>), ConfigError> {
    let (config, watched) = compile(bytes)?;
    let files = (!watched.is_empty()).then(|| SecretFiles {
        bytes: bytes.to_vec(),
        watched,
        next_poll_ms: now_ms.saturating_add(POLL_PERIOD_MS),
    });
    Ok((config, files))
}

/// Compiles `bytes`; every file is stamped before it is read, so a change while it is read shows
/// at the next poll.
fn compile(bytes: &[u8]) -> Result<(Config, Watched), ConfigError> {
    let watched = RefCell::new(Vec::new());
    let env = |name: &str| std::env::var(name).ok();
    let read = |path: &str| {
        watched.borrow_mut().push((path.to_string(), stamp(path)));
        std::fs::read_to_string(path).map_err(|error| error.kind().to_string())
    };
    let config = config::parse_with(bytes, SecretSources { env: &env, file: Some(&read) })?;
    Ok((config, watched.into_inner()))
}

/// What a poll found.
pub enum Rotation {
    /// A file changed and the configuration compiled again with its new content.
    Compiled(Config),
    /// A file changed but the configuration is refused with it; the one in use stays.
    Refused(ConfigError),
}

impl SecretFiles {
    /// When [`SecretFiles::poll`] next looks at the files.
    pub fn next_poll_ms(&self) -> u64 {
        self.next_poll_ms
    }

    /// At most once a second: whether a file changed, and the configuration compiled again if so.
    pub fn poll(&mut self, now_ms: u64) -> Option<Rotation> {
        if now_ms < self.next_poll_ms {
            return None;
        }
        self.next_poll_ms = now_ms.saturating_add(POLL_PERIOD_MS);
        if self.watched.iter().all(|(path, seen)| stamp(path) == *seen) {
            return None;
        }
        match compile(&self.bytes) {
            Ok((config, watched)) => {
                self.watched = watched;
                Some(Rotation::Compiled(config))
            }
            Err(error) => {
                // Stamped as they are now: the same refused content is not compiled again every
                // second, and the next change is.
                for (path, seen) in &mut self.watched {
                    *seen = stamp(path);
                }
                Some(Rotation::Refused(error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oauth2_cc_core::test_support::client_secret;

    fn config_reading(path: &std::path::Path) -> Vec<u8> {
        serde_json::json!({
            "profiles": {"billing": {"cluster": "idp", "token_url": "https://idp.example.com/token",
                                     "client_id": "svc-a", "client_secret": {"file": path}}},
            "routes": [{"match": {"path_prefix": "/"}, "profile": "billing"}]
        })
        .to_string()
        .into_bytes()
    }

    fn secret_of(config: &Config) -> String {
        client_secret(&config.profiles[0]).expect("a client secret").to_string()
    }

    /// A directory laid out as Kubernetes mounts a Secret: `name -> ..data/name`, `..data -> ..v1`.
    fn kubernetes_mount(dir: &std::path::Path, version: &str, secret: &str) {
        let data = dir.join(version);
        std::fs::create_dir_all(&data).expect("version dir");
        std::fs::write(data.join("secret"), secret).expect("secret written");
        let link = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(version, &link).expect("symlink");
        std::fs::rename(&link, dir.join("..data")).expect("atomic swap");
        if std::fs::symlink_metadata(dir.join("secret")).is_err() {
            std::os::unix::fs::symlink("..data/secret", dir.join("secret")).expect("symlink");
        }
    }

    #[test]
    fn a_symlink_swap_compiles_the_configuration_again_with_the_new_secret() {
        let dir = std::env::temp_dir().join(format!("oauth2-cc-secret-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        kubernetes_mount(&dir, "..v1", "first\n");
        let bytes = config_reading(&dir.join("secret"));
        let (config, files) = load(&bytes, 0).expect("valid");
        assert_eq!(secret_of(&config), "first");
        let mut files = files.expect("a file was read");

        assert!(files.poll(POLL_PERIOD_MS).is_none(), "nothing changed");
        kubernetes_mount(&dir, "..v2", "second");
        assert!(files.poll(POLL_PERIOD_MS + 1).is_none(), "not before the next poll");
        match files.poll(2 * POLL_PERIOD_MS) {
            Some(Rotation::Compiled(config)) => assert_eq!(secret_of(&config), "second"),
            _ => panic!("the swap was not seen"),
        }
        assert!(files.poll(3 * POLL_PERIOD_MS).is_none(), "seen once");

        kubernetes_mount(&dir, "..v3", "");
        match files.poll(4 * POLL_PERIOD_MS) {
            Some(Rotation::Refused(error)) => {
                assert_eq!(error.path, "profiles.billing.client_secret");
                assert!(error.reason.contains("is empty"), "{error}");
            }
            _ => panic!("an empty secret was not refused"),
        }
        assert!(files.poll(5 * POLL_PERIOD_MS).is_none(), "a refused content is not compiled every second");
        std::fs::remove_dir_all(&dir).expect("cleaned up");
    }

    #[test]
    fn a_configuration_without_secret_files_watches_nothing() {
        let bytes = br#"{"profiles": {"billing": {"cluster": "idp", "token_url": "https://idp.example.com/token",
            "client_id": "svc-a", "client_secret": "inline"}},
            "routes": [{"match": {"path_prefix": "/"}, "profile": "billing"}]}"#;
        let (_, files) = load(bytes, 0).expect("valid");
        assert!(files.is_none());
    }
}
