//! The shared queues between VMs: each VM registers one, lists it in the wake registry (shared
//! data), and reads two kinds of message from it — a wake (some VM changed a token: re-check) and
//! a kick (one of this VM's own requests asks its root context to fetch a profile now).

use crate::adapter;
use crate::store::SharedData;
use oauth2_cc_core::lifecycle::store;
use oauth2_cc_core::wake_registry;

const REGISTRY_KEY: &str = "oauth2_cc.v1.wake_queues";
const WAKE: u8 = b'w';
const KICK: u8 = b'k';

/// What a VM found on its queue.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Messages {
    pub woken: bool,
    /// Profiles a request of this VM asked to fetch.
    pub kicked: Vec<usize>,
}

/// Registers this VM's queue under `name` and lists it; `None` when the host refuses a queue
/// (paused requests then wait for the next tick).
// Out of line: one caller must not absorb it into a large wasm function (docs/memory.md, "Function shape").
#[inline(never)]
pub fn register(name: &str, now_ms: u64) -> Option<u32> {
    let queue = adapter::register_queue(name);
    heartbeat(name, now_ms);
    queue
}

/// Lists `name` in the wake registry as alive now (and drops stale names).
pub fn heartbeat(name: &str, now_ms: u64) {
    let listed = store::update_bytes(&mut SharedData, REGISTRY_KEY, |bytes| {
        Some(wake_registry::refresh(bytes.unwrap_or_default(), name, now_ms))
    });
    if listed.is_err() {
        adapter::log(adapter::Level::Warn, "cannot list this VM's wake queue; its paused requests wait for ticks");
    }
}

/// Enqueues a wake on every registered queue (this VM's included).
pub fn broadcast_wake(vm_id: &str) {
    let Some(bytes) = adapter::shared_get(REGISTRY_KEY).0 else { return };
    for name in wake_registry::names(&bytes) {
        if let Some(queue) = adapter::resolve_queue(vm_id, name) {
            adapter::enqueue(queue, &[WAKE]);
        }
    }
}

/// Asks this VM's root context to fetch `profile` now.
pub fn kick(own_queue: u32, profile: usize) {
    let index = u32::try_from(profile).unwrap_or(u32::MAX).to_le_bytes();
    adapter::enqueue(own_queue, &[KICK, index[0], index[1], index[2], index[3]]);
}

/// Drains this VM's queue.
pub fn drain(queue: u32) -> Messages {
    let mut messages = Messages::default();
    while let Some(message) = adapter::dequeue(queue) {
        match message.as_slice() {
            [KICK, index @ ..] => {
                if let Ok(bytes) = <[u8; 4]>::try_from(index) {
                    messages.kicked.push(u32::from_le_bytes(bytes) as usize);
                }
            }
            _ => messages.woken = true,
        }
    }
    messages
}
