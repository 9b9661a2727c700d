//! The one door to the proxy-wasm host: every call the filter makes into Envoy goes through here,
//! and none of them can panic.
//!
//! Reads return bytes, never `String`: a header value, a property or a callout's answer comes from
//! a client or an IdP and may be any bytes (obs-text, invalid UTF-8). Every status the host returns
//! becomes a `Result` or an `Option`. Callers never see a raw pointer.
//!
//! Audit of the proxy-wasm 0.2.5 SDK (what it would do on a hostile byte or an unexpected status),
//! and why this module declares the host functions itself:
//! - `hostcalls::get_map_value`, `get_map`, `get_grpc_status`, the header-pair decoders: unwrap
//!   `String::from_utf8` — a non-UTF-8 header value kills the VM. Not used: raw
//!   `proxy_get_header_map_value` here, returning bytes.
//! - Every other `hostcalls::*` wrapper: `panic!("unexpected status")` on any status it did not
//!   list. Not used, except `dispatch_http_call` (below): raw declarations here map every status.
//! - `hostcalls::dispatch_http_call`: used, because it registers the callout with the SDK's
//!   dispatcher, which otherwise panics (`expect("invalid token_id")`) when the answer arrives. It
//!   panics only on a status other than Ok, BadArgument and InternalFailure; Envoy's `httpCall`
//!   returns only those (BadArgument: unknown cluster or missing pseudo-headers).
//! - The SDK's logger (`proxy_wasm::set_log_level`) unwraps `hostcalls::log` and installs a panic
//!   hook: not installed; [`log`] writes through raw `proxy_log`.
//! - The SDK's dispatcher panics on context ids Envoy never gave it, and when
//!   `create_http_context` returns `None`: the root context always returns a context (a
//!   pass-through one before a configuration is accepted).
//! - `proxy_on_memory_allocate` (the SDK's export the host uses to hand us buffers) cannot panic;
//!   buffers it made are taken back here with the same layout (`Vec::from_raw_parts`, len = cap).

use std::ptr::null_mut;
use std::time::Duration;

use proxy_wasm::types::{BufferType, MapType, MetricType, Status, StreamType};

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> Status;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> Status;
    fn proxy_set_tick_period_milliseconds(period: u32) -> Status;
    fn proxy_get_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> Status;
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> Status;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> Status;
    fn proxy_register_shared_queue(name_data: *const u8, name_size: usize, return_id: *mut u32) -> Status;
    fn proxy_resolve_shared_queue(
        vm_id_data: *const u8,
        vm_id_size: usize,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> Status;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> Status;
    fn proxy_continue_stream(stream_type: StreamType) -> Status;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
    fn proxy_set_effective_context(context_id: u32) -> Status;
    fn proxy_define_metric(
        metric_type: MetricType,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> Status;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> Status;
    fn proxy_record_metric(metric_id: u32, value: u64) -> Status;
}

fn ok(status: Status) -> Result<(), Status> {
    match status {
        Status::Ok => Ok(()),
        other => Err(other),
    }
}

/// Takes back a buffer the host allocated through `proxy_on_memory_allocate`.
///
/// # Safety
/// `data`/`size` must come from a host call that just returned `Ok` with them.
unsafe fn take_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: the SDK's allocator made this buffer with exactly `size` bytes of capacity.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// Reads a value the host returns through the two out-parameters; `None` for NotFound or any
/// failure.
fn read_out(call: impl FnOnce(*mut *mut u8, *mut usize) -> Status) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    match call(&mut data, &mut size) {
        // SAFETY: Ok means the host filled data/size with a buffer it allocated for us.
        Status::Ok => Some(unsafe { take_buffer(data, size) }),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// Writes one line to Envoy's log (component `wasm`).
pub fn log(level: Level, message: &str) {
    // SAFETY: pointer and length of a live str; the host copies it.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// Milliseconds since the epoch by the proxy's clock; 0 if the host cannot tell.
pub fn now_ms() -> u64 {
    let mut nanos: u64 = 0;
    // SAFETY: a valid out-pointer.
    match unsafe { proxy_get_current_time_nanoseconds(&mut nanos) } {
        Status::Ok => nanos / 1_000_000,
        _ => 0,
    }
}

pub fn set_tick_period(period: Duration) {
    let millis = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    // SAFETY: no pointers.
    let _ = unsafe { proxy_set_tick_period_milliseconds(millis) };
}

/// Up to `max` bytes of a host buffer (plugin configuration, a callout's answer body).
pub fn buffer(kind: BufferType, max: usize) -> Option<Vec<u8>> {
    // SAFETY: valid out-pointers.
    read_out(|data, size| unsafe { proxy_get_buffer_bytes(kind, 0, max, data, size) })
}

/// A header's value as bytes, from a request, a response or a callout's answer.
pub fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    // SAFETY: name is a live str; valid out-pointers.
    read_out(|data, size| unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), data, size) })
}

/// Sets (replacing every existing value) a request header of the effective context.
pub fn set_request_header(name: &str, value: &str) -> Result<(), Status> {
    // SAFETY: pointers and lengths come from live strs; the host copies them before returning.
    ok(unsafe {
        proxy_replace_header_map_value(
            MapType::HttpRequestHeaders,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// A property (`xds.route_name`, ...) as bytes.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let serialized = path.join("\0");
    // SAFETY: a live buffer; valid out-pointers.
    read_out(|data, size| unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), data, size) })
}

/// A shared-data key's bytes and version; `(None, None)` when missing or unreadable.
pub fn shared_get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: key is a live str; valid out-pointers.
    match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) } {
        // SAFETY: Ok means the host filled data/size.
        Status::Ok => (Some(unsafe { take_buffer(data, size) }), Some(cas)),
        _ => (None, None),
    }
}

/// Writes a shared-data key if its version is still `cas` (0: unconditionally).
pub fn shared_set(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: live buffers; the host copies them.
    ok(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) })
}

pub fn register_queue(name: &str) -> Option<u32> {
    let mut id: u32 = 0;
    // SAFETY: live str; valid out-pointer.
    ok(unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) }).ok().map(|()| id)
}

pub fn resolve_queue(vm_id: &str, name: &str) -> Option<u32> {
    let mut id: u32 = 0;
    // SAFETY: live strs; valid out-pointer.
    ok(unsafe { proxy_resolve_shared_queue(vm_id.as_ptr(), vm_id.len(), name.as_ptr(), name.len(), &mut id) })
        .ok()
        .map(|()| id)
}

/// The next message of a queue this VM registered; `None` when empty.
pub fn dequeue(queue: u32) -> Option<Vec<u8>> {
    // SAFETY: valid out-pointers.
    read_out(|data, size| unsafe { proxy_dequeue_shared_queue(queue, data, size) })
}

pub fn enqueue(queue: u32, message: &[u8]) {
    // SAFETY: a live buffer; the host copies it.
    let _ = unsafe { proxy_enqueue_shared_queue(queue, message.as_ptr(), message.len()) };
}

/// Resumes the effective context's paused request.
pub fn resume_request() -> Result<(), Status> {
    // SAFETY: no pointers.
    ok(unsafe { proxy_continue_stream(StreamType::HttpRequest) })
}

/// Answers the effective context's request locally.
pub fn send_local_response(status: u32, details: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<(), Status> {
    let serialized = serialize_headers(headers);
    // SAFETY: pointers and lengths come from live buffers; the host copies them before returning.
    ok(unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            serialized.as_ptr(),
            serialized.len(),
            -1,
        )
    })
}

/// Makes `context_id` the context later host calls act on.
pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    ok(unsafe { proxy_set_effective_context(context_id) })
}

/// Sends an HTTP request to `cluster` from the current (root) context; the answer comes to its
/// `on_http_call_response` with the returned token. See the module doc for why the SDK does this.
pub fn dispatch(
    cluster: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<u32, Status> {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    proxy_wasm::hostcalls::dispatch_http_call(cluster, headers, body, vec![], timeout)
}

pub fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    let mut id: u32 = 0;
    // SAFETY: live str; valid out-pointer.
    ok(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) }).ok().map(|()| id)
}

pub fn increment_metric(id: u32, by: u64) {
    // SAFETY: no pointers.
    let _ = unsafe { proxy_increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX)) };
}

pub fn record_metric(id: u32, value: u64) {
    // SAFETY: no pointers.
    let _ = unsafe { proxy_record_metric(id, value) };
}

/// The proxy-wasm header map encoding: count, (name length, value length) pairs, then each name
/// and value followed by a NUL.
fn serialize_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + headers.iter().map(|(n, v)| 8 + n.len() + v.len() + 2).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (name, value) in headers {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// A random 64-bit number (WASI randomness; the clock when the host has none).
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        return now_ms().rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
    }
    u64::from_le_bytes(bytes)
}
