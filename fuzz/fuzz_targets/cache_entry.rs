//! Any bytes as a shared-data cache entry: both decoders agree, and what decodes re-encodes to
//! something that decodes to the same entry.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oauth2_cc_core::test_support::{Entry, EntryView};

fuzz_target!(|data: &[u8]| {
    let entry = Entry::decode(data);
    let view = EntryView::decode(data);
    assert_eq!(entry.is_some(), view.is_some(), "Entry and EntryView disagree on whether the bytes decode");
    if let (Some(entry), Some(view)) = (entry, view) {
        assert_eq!(
            (view.generation, view.expires_at_ms, view.retry_at_ms, view.token),
            (entry.generation, entry.expires_at_ms, entry.retry_at_ms, entry.token.as_str()),
            "EntryView reads different fields than Entry"
        );
        let encoded = entry.encode();
        assert_eq!(Entry::decode(&encoded), Some(entry), "decode(encode(entry)) != entry");
    }
});
