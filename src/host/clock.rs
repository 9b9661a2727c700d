//! Time and randomness from the host: wall-clock milliseconds and random numbers (WASI).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;

/// Milliseconds since the epoch by the proxy's clock; 0 if the host cannot tell.
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// A random 64-bit number.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No entropy from the host: fall back to the clock, still distinct per VM in practice.
        return now_ms().rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
    }
    u64::from_le_bytes(bytes)
}

/// 128 random bits (for assertion `jti`s). Without host entropy, the clock and a counter keep them
/// unique per VM, which is what a `jti` needs.
pub fn random_128() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    if getrandom::getrandom(&mut bytes).is_err() {
        let high = random_u64().to_le_bytes();
        let low = COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes();
        bytes[..8].copy_from_slice(&high);
        bytes[8..].copy_from_slice(&low);
    }
    bytes
}

static COUNTER: AtomicU64 = AtomicU64::new(1);

/// A random number in [0, 1).
pub fn random_unit() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}
