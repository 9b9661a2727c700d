//! Any bytes as plugin configuration: `parse` returns a config or an error, never panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oauth2_cc_core::config;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = config::parse(data, &|_| None) {
        // The Debug impls (redaction included) run on whatever the parser accepted.
        let _ = format!("{config:?}");
    }
});
