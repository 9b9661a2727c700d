//! Tests of the configuration as a whole: defaults, every refusal naming its field, secrets kept
//! out of errors and Debug output, the cache key, and the committed JSON Schema.

use super::*;
use serde_json::json;

use crate::assertion::{AssertionAudience, JWT_BEARER_GRANT_TYPE, JwtAlgorithm};

fn no_env(_: &str) -> Option<String> {
    None
}

fn minimal() -> serde_json::Value {
    json!({
        "profiles": {"billing": {"cluster": "idp", "token_url": "https://idp.example.com/oauth2/token",
                                 "client_id": "svc-a", "client_secret": "s3cret"}},
        "routes": [{"match": {"path_prefix": "/"}, "profile": "billing"}]
    })
}

fn parse_value(value: &serde_json::Value) -> Result<Config, ConfigError> {
    parse(value.to_string().as_bytes(), &no_env)
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let config = parse_value(&minimal()).expect("valid");
    let profile = &config.profiles[0];
    assert_eq!(profile.auth_method, AuthMethod::ClientSecretBasic);
    assert!(matches!(profile.client_auth, ClientAuth::Basic { .. }));
    assert_eq!(profile.grant_type, "client_credentials");
    assert_eq!(profile.method, TokenMethod::Post);
    assert_eq!(profile.timeout_ms, 5_000);
    assert_eq!(profile.max_wait_ms, 6_000);
    assert_eq!(profile.token_field, FieldPath(vec!["access_token".into()]));
    assert_eq!(
        profile.inject,
        Injection { header: "authorization".into(), prefix: "Bearer ".into(), keep_existing: false }
    );
    assert_eq!(profile.lifetime, LifetimePolicy { ahead_ratio: 0.8, default_ttl_s: 300, skew_s: 5 });
    assert_eq!(profile.backoff, BackoffPolicy { base_ms: 1_000, max_ms: 60_000 });
    assert_eq!(config.failure_status, 503);
    assert!(profile.cache_key.starts_with("oauth2_cc.v1.token.billing."));
}

#[test]
fn secret_from_environment() {
    let mut config = minimal();
    config["profiles"]["billing"]["client_secret"] = json!({"env": "BILLING_SECRET"});
    let env = |name: &str| (name == "BILLING_SECRET").then(|| "from-env".to_string());
    let parsed = parse(config.to_string().as_bytes(), &env).expect("valid");
    match &parsed.profiles[0].client_auth {
        ClientAuth::Basic { secret } => assert_eq!(secret.expose(), "from-env"),
        other => panic!("unexpected {other:?}"),
    }
}

/// A file reader over fixed contents, as the dynamic module's would read them.
fn files(path: &str) -> Result<String, String> {
    match path {
        "/run/secrets/billing" => Ok("from-file\r\n".to_string()),
        "/run/secrets/empty" => Ok("\n".to_string()),
        _ => Err("No such file or directory (os error 2)".to_string()),
    }
}

fn parse_with_files(value: &serde_json::Value) -> Result<Config, ConfigError> {
    parse_with(value.to_string().as_bytes(), SecretSources { env: &no_env, file: Some(&files) })
}

#[test]
fn secret_from_file_loses_its_line_ending() {
    let mut config = minimal();
    config["profiles"]["billing"]["client_secret"] = json!({"file": "/run/secrets/billing"});
    match &parse_with_files(&config).expect("valid").profiles[0].client_auth {
        ClientAuth::Basic { secret } => assert_eq!(secret.expose(), "from-file"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn secret_files_are_refused_naming_the_field() {
    let with_file = |path: &str| {
        let mut config = minimal();
        config["profiles"]["billing"]["client_secret"] = json!({"file": path});
        config
    };
    let cases = [
        (parse_with_files(&with_file("/run/secrets/missing")), "cannot be read: No such file"),
        (parse_with_files(&with_file("/run/secrets/empty")), "is empty"),
        (parse_with_files(&with_file("secrets/billing")), "must be an absolute path"),
        // A host without a filesystem (the wasm VM) says so instead of failing to read.
        (parse_value(&with_file("/run/secrets/billing")), "read by the dynamic module only"),
    ];
    for (result, reason) in cases {
        let error = result.expect_err(reason);
        assert_eq!(error.path, "profiles.billing.client_secret", "{error}");
        assert!(error.reason.contains(reason), "{error}");
    }
    let mut both = minimal();
    both["profiles"]["billing"]["client_secret"] = json!({"env": "A", "file": "/run/secrets/billing"});
    let error = parse_with_files(&both).expect_err("env and file together");
    assert_eq!(error.path, "profiles.billing.client_secret", "{error}");
}

#[test]
fn cache_key_changes_with_what_the_token_depends_on() {
    let base = parse_value(&minimal()).expect("valid").profiles[0].cache_key.clone();
    let mut scoped = minimal();
    scoped["profiles"]["billing"]["scopes"] = json!(["read"]);
    let other = parse_value(&scoped).expect("valid").profiles[0].cache_key.clone();
    assert_ne!(base, other);
    let grant = |subject: &str| {
        let mut c = jwt_profile("none", json!({"private_key": RSA_KEY, "subject": subject}));
        c["profiles"]["billing"]["grant_type"] = json!(JWT_BEARER_GRANT_TYPE);
        c["profiles"]["billing"].as_object_mut().map(|p| p.remove("client_secret"));
        parse_value(&c).expect("valid").profiles[0].cache_key.clone()
    };
    assert_ne!(grant("user-42"), grant("user-43"), "the grant's subject decides whose token it is");
    let mut injected = minimal();
    injected["profiles"]["billing"]["inject"] = json!({"header": "x-token"});
    assert_eq!(base, parse_value(&injected).expect("valid").profiles[0].cache_key);
}

#[test]
fn debug_output_redacts_secrets() {
    let config = parse_value(&minimal()).expect("valid");
    let debug = format!("{config:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    assert!(debug.contains("[redacted]"));
}

/// Each bad configuration is refused with the JSON path of the field at fault.
#[test]
fn bad_configs_name_the_field() {
    for (what, edit, path) in bad_config_cases() {
        let mut config = minimal();
        edit(&mut config);
        let err = parse_value(&config).expect_err(what);
        assert_eq!(err.path, path, "{what}: {err}");
        assert!(!err.to_string().contains("s3cret"), "{what}: {err}");
    }
}

type Edit = fn(&mut serde_json::Value);

/// (what, the edit of `minimal()`, the JSON path the refusal must name)
fn bad_config_cases() -> Vec<(&'static str, Edit, &'static str)> {
    vec![
        (
            "unknown auth method",
            |c| c["profiles"]["billing"]["auth_method"] = json!("magic"),
            "profiles.billing.auth_method",
        ),
        (
            "missing token_url",
            |c| {
                c["profiles"]["billing"].as_object_mut().map(|p| p.remove("token_url"));
            },
            "profiles.billing.token_url",
        ),
        ("route names unknown profile", |c| c["routes"][0]["profile"] = json!("nope"), "routes[0].profile"),
        ("bad URL", |c| c["profiles"]["billing"]["token_url"] = json!("idp/token"), "profiles.billing.token_url"),
        (
            "negative TTL",
            |c| c["profiles"]["billing"]["refresh"] = json!({"default_ttl_s": -5}),
            "profiles.billing.refresh.default_ttl_s",
        ),
        ("unknown field", |c| c["profiles"]["billing"]["tokne_url"] = json!("x"), "profiles.billing.tokne_url"),
        ("unknown top-level field", |c| c["rotues"] = json!([]), "rotues"),
        (
            "missing secret",
            |c| {
                c["profiles"]["billing"].as_object_mut().map(|p| p.remove("client_secret"));
            },
            "profiles.billing.client_secret",
        ),
        (
            "env secret not set",
            |c| c["profiles"]["billing"]["client_secret"] = json!({"env": "NOPE"}),
            "profiles.billing.client_secret",
        ),
        (
            "ahead ratio out of range",
            |c| c["profiles"]["billing"]["refresh"] = json!({"ahead_ratio": 1.5}),
            "profiles.billing.refresh.ahead_ratio",
        ),
        ("zero timeout", |c| c["profiles"]["billing"]["timeout_ms"] = json!(0), "profiles.billing.timeout_ms"),
        ("bad method", |c| c["profiles"]["billing"]["method"] = json!("PUT"), "profiles.billing.method"),
        (
            "bad inject header",
            |c| c["profiles"]["billing"]["inject"] = json!({"header": "bad header"}),
            "profiles.billing.inject.header",
        ),
        ("scope with space", |c| c["profiles"]["billing"]["scopes"] = json!(["a b"]), "profiles.billing.scopes[0]"),
        ("failure status not an error", |c| c["on_failure"] = json!({"status": 200}), "on_failure.status"),
        ("no profiles", |c| c["profiles"] = json!({}), "profiles"),
        (
            "path prefix without slash",
            |c| c["routes"][0]["match"]["path_prefix"] = json!("v1"),
            "routes[0].match.path_prefix",
        ),
        (
            "header value with newline",
            |c| c["profiles"]["billing"]["token_request_headers"] = json!({"x-api-key": "a\nb"}),
            "profiles.billing.token_request_headers.x-api-key",
        ),
        (
            "empty field path",
            |c| c["profiles"]["billing"]["token_field"] = json!("data..token"),
            "profiles.billing.token_field",
        ),
        ("wrong type", |c| c["profiles"]["billing"]["scopes"] = json!("read"), "profiles.billing.scopes"),
        (
            "secret with none",
            |c| c["profiles"]["billing"]["auth_method"] = json!("none"),
            "profiles.billing.client_secret",
        ),
    ]
}

fn jwt_profile(auth_method: &str, jwt: serde_json::Value) -> serde_json::Value {
    let mut config = minimal();
    config["profiles"]["billing"]["auth_method"] = json!(auth_method);
    if auth_method == "private_key_jwt" {
        config["profiles"]["billing"].as_object_mut().map(|p| p.remove("client_secret"));
    }
    config["profiles"]["billing"]["jwt"] = jwt;
    config
}

const RSA_KEY: &str = include_str!("../../../tests/fixtures/keys/rsa_pkcs8.pem");
const EC_KEY: &str = include_str!("../../../tests/fixtures/keys/ec_p256_pkcs8.pem");

#[test]
fn jwt_client_auth_compiles() {
    let config =
        parse_value(&jwt_profile("private_key_jwt", json!({"algorithm": "ES256", "private_key": EC_KEY, "kid": "k1"})))
            .expect("valid");
    match &config.profiles[0].client_auth {
        ClientAuth::Jwt { assertion, send_client_id } => {
            assert_eq!(assertion.signer.algorithm(), JwtAlgorithm::ES256);
            assert_eq!(
                assertion.template.audience,
                AssertionAudience::One("https://idp.example.com/oauth2/token".into())
            );
            assert_eq!(assertion.template.issuer, "svc-a");
            assert_eq!(assertion.template.lifetime_s, 60);
            assert_eq!(assertion.template.extra_header.get("kid"), Some(&json!("k1")));
            assert!(*send_client_id);
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut hs = minimal();
    hs["profiles"]["billing"]["auth_method"] = json!("client_secret_jwt");
    hs["profiles"]["billing"]["client_secret"] = json!("x".repeat(32));
    let config = parse_value(&hs).expect("valid");
    assert!(
        matches!(&config.profiles[0].client_auth, ClientAuth::Jwt { assertion, .. } if assertion.signer.algorithm() == JwtAlgorithm::HS256)
    );
    let grant = jwt_profile("none", json!({"private_key": RSA_KEY, "subject": "user-1"}));
    let mut grant = grant;
    grant["profiles"]["billing"]["grant_type"] = json!(JWT_BEARER_GRANT_TYPE);
    grant["profiles"]["billing"].as_object_mut().map(|p| p.remove("client_secret"));
    let config = parse_value(&grant).expect("valid");
    let profile = &config.profiles[0];
    assert_eq!(profile.grant_assertion.as_ref().map(|a| a.template.subject.as_str()), Some("user-1"));
    assert!(matches!(profile.client_auth, ClientAuth::ClientIdOnly));
    assert!(!format!("{config:?}").contains("PRIVATE KEY"));
}

#[test]
fn bad_jwt_settings_name_the_field() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "malformed key",
            jwt_profile(
                "private_key_jwt",
                json!({"private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----"}),
            ),
            "profiles.billing.jwt.private_key",
        ),
        (
            "RSA key with ES256",
            jwt_profile("private_key_jwt", json!({"algorithm": "ES256", "private_key": RSA_KEY})),
            "profiles.billing.jwt.private_key",
        ),
        (
            "unknown algorithm",
            jwt_profile("private_key_jwt", json!({"algorithm": "RS999", "private_key": RSA_KEY})),
            "profiles.billing.jwt.algorithm",
        ),
        (
            "missing key",
            jwt_profile("private_key_jwt", json!({"algorithm": "RS256"})),
            "profiles.billing.jwt.private_key",
        ),
        (
            "no jwt block",
            {
                let mut c = jwt_profile("private_key_jwt", json!(null));
                c["profiles"]["billing"].as_object_mut().map(|p| p.remove("jwt"));
                c
            },
            "profiles.billing.jwt",
        ),
        (
            "reserved claim",
            jwt_profile("private_key_jwt", json!({"private_key": RSA_KEY, "claims": {"exp": 1}})),
            "profiles.billing.jwt",
        ),
        (
            "jwt without jwt auth",
            jwt_profile("client_secret_basic", json!({"private_key": RSA_KEY})),
            "profiles.billing.jwt",
        ),
        (
            "short HS secret",
            {
                let mut c = minimal();
                c["profiles"]["billing"]["auth_method"] = json!("client_secret_jwt");
                c
            },
            "profiles.billing.client_secret",
        ),
        (
            "asymmetric alg for client_secret_jwt",
            {
                let mut c = minimal();
                c["profiles"]["billing"]["auth_method"] = json!("client_secret_jwt");
                c["profiles"]["billing"]["jwt"] = json!({"algorithm": "RS256"});
                c
            },
            "profiles.billing.jwt.algorithm",
        ),
    ];
    for (what, config, path) in cases {
        let err = parse_value(&config).expect_err(what);
        assert_eq!(err.path, path, "{what}: {err}");
        assert!(!err.to_string().contains("PRIVATE KEY"), "{what}: {err}");
    }
}

/// The committed JSON Schema matches the Rust types; `make schema` rewrites it.
#[test]
fn json_schema_is_up_to_date() {
    let mut schema =
        schemars::generate::SchemaSettings::draft2020_12().into_generator().into_root_schema_for::<RawConfig>();
    schema.insert("$id".into(), json!(super::schema::SCHEMA_ID));
    schema.as_object_mut().into_iter().flat_map(|map| map.values_mut()).for_each(drop_null_defaults);
    schema.insert("title".into(), json!("oauth2-cc plugin configuration"));
    let text = serde_json::to_string_pretty(&schema).expect("serializable") + "\n";
    // The workspace root, without `..` (a WASI preopen does not reach through it).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("src/core in a workspace");
    let path = root.join("schema/oauth2-cc.schema.json");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &text).expect("schema written");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(committed == text, "schema/oauth2-cc.schema.json is stale: run `make schema`");
}

/// serde's `default` on an optional field reads as `"default": null`; where the default is not a
/// constant (max_wait_ms follows timeout_ms) the description says it, and no null is claimed.
fn drop_null_defaults(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if map.get("default") == Some(&serde_json::Value::Null) {
                map.remove("default");
            }
            map.values_mut().for_each(drop_null_defaults);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_null_defaults),
        _ => {}
    }
}

#[test]
fn not_json_is_refused_with_line_and_column() {
    let cases: [(&[u8], &str, &str); 4] = [
        (b"{not json", "", "invalid JSON at line 1 column 2: key must be a string"),
        (
            b"{\"profiles\": {\"demo\": {\n  \"cluster\": \"idp\",\n}}}",
            "profiles.demo",
            "invalid JSON at line 3 column 1: trailing comma",
        ),
        (b"{\"profiles\": {}} x", "", "invalid JSON at line 1 column 18: trailing characters"),
        (b"{\"profiles\": {", "profiles", "invalid JSON at line 1 column 14: EOF while parsing an object"),
    ];
    for (text, path, reason) in cases {
        let err = parse(text, &no_env).expect_err(reason);
        assert_eq!((err.path.as_str(), err.reason.as_str()), (path, reason), "{}", String::from_utf8_lossy(text));
    }
    // A wrong type is not a syntax error: it keeps its JSON path and gets no position.
    let err = parse(br#"{"profiles": 5}"#, &no_env).expect_err("wrong type");
    assert_eq!(err.path, "profiles", "{err}");
    assert!(!err.reason.contains("line"), "{err}");
}

/// RFC 6749 §2.3.1: GET is refused where credentials or an assertion would go into the query.
#[test]
fn get_is_refused_where_credentials_would_go_into_the_query() {
    let hs_secret = "x".repeat(32);
    // (auth_method, grant is JWT-bearer, GET allowed)
    let cases = [
        ("client_secret_basic", false, true),
        ("tls_client_auth", false, true),
        ("none", false, true),
        ("client_secret_post", false, false),
        ("client_secret_jwt", false, false),
        ("private_key_jwt", false, false),
        ("none", true, false),
        ("client_secret_basic", true, false),
    ];
    for (auth_method, jwt_bearer, allowed) in cases {
        let mut config = minimal();
        let profile = &mut config["profiles"]["billing"];
        profile["auth_method"] = json!(auth_method);
        match auth_method {
            "none" | "tls_client_auth" | "private_key_jwt" => {
                profile.as_object_mut().map(|p| p.remove("client_secret"));
            }
            "client_secret_jwt" => profile["client_secret"] = json!(hs_secret),
            _ => {}
        }
        if auth_method == "private_key_jwt" || jwt_bearer {
            profile["jwt"] = json!({"private_key": RSA_KEY});
        }
        if jwt_bearer {
            profile["grant_type"] = json!(JWT_BEARER_GRANT_TYPE);
        }
        let what = format!("{auth_method} (JWT-bearer grant: {jwt_bearer})");
        assert!(parse_value(&config).is_ok(), "{what} with POST must be valid");
        for method in ["GET", "get"] {
            config["profiles"]["billing"]["method"] = json!(method);
            match parse_value(&config) {
                Ok(parsed) => {
                    assert!(allowed, "{what}: {method} accepted");
                    assert_eq!(parsed.profiles[0].method, TokenMethod::Get);
                }
                Err(err) => {
                    assert!(!allowed, "{what}: {method} refused: {err}");
                    assert_eq!(err.path, "profiles.billing.method", "{what}: {err}");
                    assert!(err.reason.contains("RFC 6749"), "{what}: {err}");
                }
            }
        }
    }
}

#[test]
fn log_lines_stay_one_line_whatever_the_configuration_holds() {
    // A name or a field a configuration gets wrong is echoed in the line that refuses it: a line
    // break in it must not start a forged line in Envoy's log.
    let forged = "a\nforged: line\r\u{1b}[2J";
    let mut bad_name = minimal();
    let profile = bad_name["profiles"]["billing"].take();
    bad_name["profiles"] = json!({ forged: profile });
    bad_name["routes"][0]["profile"] = json!(forged);
    let mut unknown_field = minimal();
    unknown_field["profiles"]["billing"][forged] = json!(1);
    for config in [bad_name, unknown_field] {
        let rejected = super::load(config.to_string().as_bytes(), &no_env).expect_err("refused");
        assert!(!rejected.contains(char::is_control), "{rejected:?}");
        assert!(rejected.contains("a\\nforged: line\\r\\u{1b}[2J"), "{rejected}");
    }
}
