//! The capacity model (`tools/capacity.py`, docs/capacity.md) uses the filter's refresh rule:
//! this runs the core's `token_times` on every case the script wrote to
//! `tools/capacity_cases.json` and fails when the script's copy of the rule has drifted.

use crate::cache::token_times;
use crate::config::LifetimePolicy;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    sent_at_ms: u64,
    lifetime_s: u64,
    refresh_in_s: Option<u64>,
    ahead_ratio: f64,
    skew_s: u64,
    refresh_at_ms: u64,
    expires_at_ms: u64,
}

#[test]
fn capacity_script_uses_the_cores_refresh_rule() {
    // The workspace root without `..`, which WASI's preopened directories refuse (`make unit-wasm`).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("src/core in a workspace");
    let file = root.join("tools/capacity_cases.json");
    let path = file.display();
    let text =
        std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{path}: {e} (python3 tools/capacity.py --cases)"));
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(cases.len() >= 10, "too few cases in {path}");
    for c in cases {
        let policy = LifetimePolicy { ahead_ratio: c.ahead_ratio, default_ttl_s: 300, skew_s: c.skew_s };
        let got = token_times(c.sent_at_ms, c.lifetime_s, c.refresh_in_s, None, &policy);
        assert_eq!(
            got,
            (c.refresh_at_ms, c.expires_at_ms),
            "lifetime {} s, refresh_in {:?}, ahead_ratio {}, skew {} s: the core says (refresh_at, expires_at) = {got:?}, \
             tools/capacity.py says ({}, {}); update token_times in tools/capacity.py, run it with --cases, and \
             paste its tables into docs/capacity.md",
            c.lifetime_s,
            c.refresh_in_s,
            c.ahead_ratio,
            c.skew_s,
            c.refresh_at_ms,
            c.expires_at_ms
        );
    }
}
