//! The `token_exchange` object of a profile as written (RFC 8693 token exchange), from which the JSON
//! Schema is generated; `exchange` compiles it. See docs/token-exchange.md.

use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, Error as _};

use super::raw::SecretSource;

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokenExchange {
    /// Where the subject token is (default: the `authorization` header after "Bearer ").
    #[serde(default, deserialize_with = "object")]
    pub(super) subject: Option<RawSubject>,
    /// RFC 8693 `subject_token_type` (default urn:ietf:params:oauth:token-type:access_token).
    #[cfg_attr(test, schemars(extend("pattern" = r"^\S+$")))]
    pub(super) subject_token_type: Option<String>,
    /// RFC 8693 `requested_token_type`, sent when given.
    #[cfg_attr(test, schemars(extend("pattern" = r"^\S+$")))]
    pub(super) requested_token_type: Option<String>,
    /// The `actor_token`: a static token, or the current token of another (non-exchange) profile.
    #[serde(default, deserialize_with = "object")]
    pub(super) actor: Option<RawActor>,
    /// A request with no subject token: `reject` (401) or `pass` (sent on without a token). Default reject.
    #[serde(default)]
    #[cfg_attr(test, schemars(extend("default" = "reject")))]
    pub(super) missing_subject: RawMissingSubject,
    /// Exchange only when Envoy's jwt_authn verified a token: its `payload_in_metadata` key, looked up in
    /// namespace envoy.filters.http.jwt_authn; without it, 401. Recommended.
    #[cfg_attr(test, schemars(extend("minLength" = 1)))]
    pub(super) verified_by_jwt_authn: Option<String>,
    /// Bounds of the per-subject cache of this profile.
    #[serde(default)]
    pub(super) cache: RawSubjectCache,
    /// Limits on token requests of this profile, per Envoy process.
    #[serde(default)]
    pub(super) limits: RawExchangeLimits,
}

/// Where the subject token is read: `header` (with `prefix`) or `metadata`.
#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(test, schemars(extend("oneOf" = super::schema::subject_sources())))]
pub(super) struct RawSubject {
    /// A request header: the value after `prefix` (compared without regard to case).
    #[cfg_attr(test, schemars(extend("pattern" = super::schema::HEADER_NAME)))]
    pub(super) header: Option<String>,
    /// Default "Bearer " for authorization, "" for any other header.
    #[cfg_attr(test, schemars(extend("pattern" = super::schema::HEADER_VALUE)))]
    pub(super) prefix: Option<String>,
    /// A string another filter wrote in the request's dynamic metadata.
    pub(super) metadata: Option<RawMetadataKey>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetadataKey {
    #[cfg_attr(test, schemars(extend("minLength" = 1)))]
    pub(super) namespace: String,
    #[cfg_attr(test, schemars(extend("minLength" = 1)))]
    pub(super) key: String,
}

/// The actor token (RFC 8693 §2.1 `actor_token`): `token` or `profile`.
#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(test, schemars(extend("oneOf" = super::schema::actor_sources())))]
pub(super) struct RawActor {
    /// A static actor token (inline, env or file).
    #[serde(default)]
    pub(super) token: Option<SecretSource>,
    /// Instead of token: the name of another profile whose current token is the actor token.
    #[serde(default)]
    pub(super) profile: Option<String>,
    /// `actor_token_type` (default urn:ietf:params:oauth:token-type:access_token).
    #[serde(default)]
    #[cfg_attr(test, schemars(extend("pattern" = r"^\S+$")))]
    pub(super) token_type: Option<String>,
}

#[derive(Deserialize, Default, Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub(super) enum RawMissingSubject {
    #[default]
    Reject,
    Pass,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubjectCache {
    /// Subjects cached (default 1024), rounded up to a multiple of 8.
    #[cfg_attr(test, schemars(extend("default" = 1024, "minimum" = 1, "maximum" = 1_000_000)))]
    pub(super) max_subjects: Option<u32>,
    /// Bytes of cached tokens (default 8 MiB); each set of 8 subjects must be able to hold a 16 KiB token.
    #[cfg_attr(test, schemars(extend("default" = 8_388_608, "maximum" = 1_073_741_824u64)))]
    pub(super) max_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub(super) struct RawExchangeLimits {
    /// Token requests started per second (default 20).
    #[cfg_attr(test, schemars(extend("default" = 20, "minimum" = 1, "maximum" = 100_000)))]
    pub(super) exchanges_per_second: Option<u32>,
    /// Token requests that may start at once after a quiet spell (default twice the rate).
    #[cfg_attr(test, schemars(extend("minimum" = 1, "maximum" = 1_000_000)))]
    pub(super) burst: Option<u32>,
    /// Token requests awaiting their answer at once (default 8).
    #[cfg_attr(test, schemars(extend("default" = 8, "minimum" = 1, "maximum" = 256)))]
    pub(super) max_in_flight: Option<u32>,
}

/// A JSON object only: serde would also read a struct from an array of its fields in order, which
/// the schema (and a reader) would not take for this object.
fn object<'de, D: Deserializer<'de>, T: DeserializeOwned>(deserializer: D) -> Result<Option<T>, D::Error> {
    let Some(map) = Option::<serde_json::Map<String, serde_json::Value>>::deserialize(deserializer)? else {
        return Ok(None);
    };
    serde_json::from_value(serde_json::Value::Object(map)).map(Some).map_err(D::Error::custom)
}
