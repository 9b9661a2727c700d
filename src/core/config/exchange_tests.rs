//! Tests of the `token_exchange` settings: defaults, every refusal naming its field, the actor's
//! profile, the cache bounds and the cache key.

use super::*;
use serde_json::{Value, json};

fn no_env(_: &str) -> Option<String> {
    None
}

fn exchange_config(token_exchange: Value) -> Value {
    json!({
        "profiles": {
            "tools": {"cluster": "idp", "token_url": "https://idp.example.com/token", "client_id": "gw",
                      "client_secret": "s3cret", "grant_type": TOKEN_EXCHANGE_GRANT_TYPE,
                      "audience": "mcp-tools", "token_exchange": token_exchange},
            "workload": {"cluster": "idp", "token_url": "https://idp.example.com/token", "client_id": "gw",
                         "client_secret": "s3cret"}
        },
        "routes": [{"match": {"path_prefix": "/"}, "profile": "tools"}]
    })
}

fn parse_value(value: &Value) -> Result<Config, ConfigError> {
    parse(value.to_string().as_bytes(), &no_env)
}

fn exchange_of(config: &Config) -> &TokenExchange {
    let Some(te) = config.profiles.iter().find_map(|p| p.exchange.as_ref()) else { panic!("no exchange profile") };
    te
}

#[test]
fn defaults_read_the_authorization_bearer_and_bound_the_cache() {
    let config = parse_value(&exchange_config(json!({}))).expect("valid");
    let te = exchange_of(&config);
    assert_eq!(te.subject, SubjectSource::Header { name: "authorization".into(), prefix: "Bearer ".into() });
    assert_eq!(te.subject_token_type, ACCESS_TOKEN_TYPE);
    assert_eq!(te.requested_token_type, None);
    assert!(te.actor.is_none());
    assert_eq!(te.missing_subject, MissingSubject::Reject);
    assert_eq!(te.verified_by_jwt_authn, None);
    assert_eq!(te.cache, SubjectCacheBounds { max_subjects: 1024, sets: 128, max_bytes: 8 << 20, set_bytes: 65_536 });
    assert_eq!(te.limits, ExchangeLimits { per_second: 20, burst: 40, max_in_flight: 8 });
    let workload = config.profiles.iter().find(|p| p.name == "workload").map(|p| p.exchange.is_none());
    assert_eq!(workload, Some(true), "a client-credentials profile has no exchange");
}

#[test]
fn every_setting_is_read() {
    let config = parse_value(&exchange_config(json!({
        "subject": {"metadata": {"namespace": "envoy.filters.http.lua", "key": "subject"}},
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "actor": {"profile": "workload"},
        "missing_subject": "pass",
        "verified_by_jwt_authn": "jwt_payload",
        "cache": {"max_subjects": 10, "max_bytes": 1 << 20},
        "limits": {"exchanges_per_second": 5, "max_in_flight": 2}
    })))
    .expect("valid");
    let te = exchange_of(&config);
    assert_eq!(
        te.subject,
        SubjectSource::Metadata { namespace: "envoy.filters.http.lua".into(), key: "subject".into() }
    );
    assert_eq!(te.missing_subject, MissingSubject::Pass);
    assert_eq!(te.verified_by_jwt_authn.as_deref(), Some("jwt_payload"));
    let workload = config.profiles.iter().position(|p| p.name == "workload");
    match &te.actor {
        Some(Actor::Profile { index, token_type, .. }) => {
            assert_eq!(Some(*index), workload);
            assert_eq!(token_type, ACCESS_TOKEN_TYPE);
        }
        other => panic!("unexpected actor {other:?}"),
    }
    assert_eq!((te.cache.max_subjects, te.cache.sets, te.cache.set_bytes), (16, 2, 524_288), "rounded up to 8 ways");
    assert_eq!(te.limits, ExchangeLimits { per_second: 5, burst: 10, max_in_flight: 2 });
    // Another header than authorization has no prefix by default.
    let config = parse_value(&exchange_config(json!({"subject": {"header": "X-User-Token"}}))).expect("valid");
    assert_eq!(
        exchange_of(&config).subject,
        SubjectSource::Header { name: "x-user-token".into(), prefix: String::new() }
    );
}

#[test]
fn bad_settings_are_refused_naming_the_field() {
    let at = "profiles.tools.";
    let cases: Vec<(Value, String, &str)> = vec![
        (json!({"subject": {}}), format!("{at}token_exchange.subject"), "give header or metadata"),
        (
            json!({"subject": {"header": "a", "metadata": {"namespace": "n", "key": "k"}}}),
            format!("{at}token_exchange.subject"),
            "not both",
        ),
        (json!({"subject": {"header": ":path"}}), format!("{at}token_exchange.subject.header"), "not a request header"),
        (json!({"subject": {"header": "a b"}}), format!("{at}token_exchange.subject.header"), "not a request header"),
        (json!({"subject": {"header": "a", "prefix": "x\n"}}), format!("{at}token_exchange.subject.prefix"), "control"),
        (
            json!({"subject": {"metadata": {"namespace": "n", "key": "k"}, "prefix": "B "}}),
            format!("{at}token_exchange.subject.prefix"),
            "only used with header",
        ),
        (
            json!({"subject": {"metadata": {"namespace": "", "key": "k"}}}),
            format!("{at}token_exchange.subject.metadata.namespace"),
            "empty",
        ),
        (json!({"subject_token_type": ""}), format!("{at}token_exchange.subject_token_type"), "non-empty URI"),
        (json!({"requested_token_type": "a b"}), format!("{at}token_exchange.requested_token_type"), "non-empty URI"),
        (json!({"actor": {}}), format!("{at}token_exchange.actor"), "give token or profile"),
        (json!({"actor": {"token": "t", "profile": "workload"}}), format!("{at}token_exchange.actor"), "not both"),
        (json!({"actor": {"profile": "nope"}}), format!("{at}token_exchange.actor.profile"), "no profile is named"),
        (json!({"actor": {"profile": "tools"}}), format!("{at}token_exchange.actor.profile"), "its own actor"),
        (json!({"actor": {"token": ""}}), format!("{at}token_exchange.actor.token"), "is empty"),
        (
            json!({"verified_by_jwt_authn": ""}),
            format!("{at}token_exchange.verified_by_jwt_authn"),
            "payload_in_metadata",
        ),
        (json!({"missing_subject": "ignore"}), format!("{at}token_exchange.missing_subject"), "unknown variant"),
        (json!({"cache": {"max_subjects": 0}}), format!("{at}token_exchange.cache.max_subjects"), "from 1"),
        (
            json!({"cache": {"max_subjects": 1024, "max_bytes": 1_000_000}}),
            format!("{at}token_exchange.cache.max_bytes"),
            "128 sets",
        ),
        (
            json!({"limits": {"exchanges_per_second": 0}}),
            format!("{at}token_exchange.limits.exchanges_per_second"),
            "from 1",
        ),
        (json!({"limits": {"burst": 0}}), format!("{at}token_exchange.limits.burst"), "from 1"),
        (json!({"limits": {"max_in_flight": 257}}), format!("{at}token_exchange.limits.max_in_flight"), "1 to 256"),
        (json!({"limts": {}}), format!("{at}token_exchange.limts"), "unknown field"),
    ];
    for (settings, path, reason) in cases {
        let error = parse_value(&exchange_config(settings.clone())).expect_err(&settings.to_string());
        assert_eq!(error.path, path, "{settings}: {error}");
        assert!(error.reason.contains(reason), "{settings}: {error}");
    }
}

#[test]
fn the_grant_and_the_settings_come_together() {
    let mut config = exchange_config(json!({}));
    config["profiles"]["tools"].as_object_mut().map(|p| p.remove("token_exchange"));
    let error = parse_value(&config).expect_err("grant without settings");
    assert_eq!(error.path, "profiles.tools.token_exchange");
    let mut config = exchange_config(json!({}));
    config["profiles"]["workload"]["token_exchange"] = json!({});
    let error = parse_value(&config).expect_err("settings without grant");
    assert_eq!((error.path.as_str(), error.reason.contains("only used")), ("profiles.workload.token_exchange", true));
    // An actor profile that is itself an exchange.
    let mut config = exchange_config(json!({"actor": {"profile": "other"}}));
    config["profiles"]["other"] = config["profiles"]["tools"].clone();
    config["profiles"]["other"]["token_exchange"] = json!({});
    let error = parse_value(&config).expect_err("exchange actor");
    assert_eq!(error.path, "profiles.tools.token_exchange.actor.profile");
    // GET, keep_existing, and the filter's own parameters.
    let mut config = exchange_config(json!({}));
    config["profiles"]["tools"]["method"] = json!("GET");
    assert_eq!(parse_value(&config).map(|_| ()).map_err(|e| e.path), Err("profiles.tools.method".to_string()));
    let mut config = exchange_config(json!({}));
    config["profiles"]["tools"]["inject"] = json!({"keep_existing": true});
    assert_eq!(
        parse_value(&config).map(|_| ()).map_err(|e| e.path),
        Err("profiles.tools.inject.keep_existing".to_string())
    );
    let mut config = exchange_config(json!({}));
    config["profiles"]["tools"]["max_fetches_per_hour"] = json!(10);
    assert_eq!(
        parse_value(&config).map(|_| ()).map_err(|e| e.path),
        Err("profiles.tools.max_fetches_per_hour".to_string())
    );
    let mut config = exchange_config(json!({}));
    config["profiles"]["tools"].as_object_mut().map(|p| p.remove("token_url"));
    config["profiles"]["tools"]["issuer"] = json!("https://idp.example.com");
    assert_eq!(parse_value(&config).map(|_| ()).map_err(|e| e.path), Err("profiles.tools.issuer".to_string()));
    let mut config = exchange_config(json!({}));
    config["profiles"]["tools"]["max_fetches_per_hour"] = json!(10);
    assert_eq!(
        parse_value(&config).map(|_| ()).map_err(|e| e.path),
        Err("profiles.tools.max_fetches_per_hour".to_string())
    );
    let mut config = exchange_config(json!({}));
    config["profiles"]["tools"]["params"] = json!({"subject_token": "x"});
    assert_eq!(
        parse_value(&config).map(|_| ()).map_err(|e| e.path),
        Err("profiles.tools.params.subject_token".to_string())
    );
}

#[test]
fn the_cache_key_follows_the_exchange_settings_and_keeps_other_profiles_keys() {
    let key = |settings: Value| {
        let config = parse_value(&exchange_config(settings)).expect("valid");
        let keys: Vec<String> = config.profiles.iter().map(|p| p.cache_key.clone()).collect();
        keys
    };
    let base = key(json!({}));
    for changed in [
        json!({"subject": {"header": "x-user"}}),
        json!({"subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}),
        json!({"requested_token_type": "urn:x"}),
        json!({"actor": {"profile": "workload"}}),
        json!({"cache": {"max_subjects": 2048, "max_bytes": 1 << 25}}),
    ] {
        let other = key(changed.clone());
        assert_ne!(other[0], base[0], "{changed}");
        assert_eq!(other[1], base[1], "the client-credentials profile keeps its key ({changed})");
    }
    assert_eq!(
        key(json!({"limits": {"max_in_flight": 3}, "missing_subject": "pass"})),
        base,
        "limits do not change tokens"
    );
    // A client-credentials profile's key is what it was before exchanges existed.
    let plain = json!({"profiles": {"workload": {"cluster": "idp", "token_url": "https://idp.example.com/token",
        "client_id": "gw", "client_secret": "s3cret"}}});
    assert_eq!(parse_value(&plain).map(|c| c.profiles[0].cache_key.clone()).ok(), Some(base[1].clone()));
}

#[test]
fn a_static_actor_token_stays_out_of_debug_output() {
    let config = parse_value(&exchange_config(json!({"actor": {"token": "actor-secret-value"}}))).expect("valid");
    assert!(!format!("{config:?}").contains("actor-secret-value"));
}
