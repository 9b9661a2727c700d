//! The native floor of `make bench`: an Envoy dynamic module (ABI `v0.2.0`, Envoy 1.40) that sets a
//! fixed `Authorization` header on every request and does nothing else.
//!
//! It declares the two ABI callbacks it calls itself (no SDK is on the package registry) and
//! exports every HTTP-filter event hook Envoy 1.40 resolves when it loads a module (Envoy refuses
//! a module that lacks one, even a hook this filter never needs). Configuration and per-stream
//! objects are statics: creating a stream allocates nothing, so the per-request cost is Envoy's
//! dynamic-module filter plus one `set_header` call. oauth2-cc's native build cannot be cheaper.
//!
//! The `read-headers` build (cell (fdm)) also reads the request's `:authority` before writing the
//! header and the response's `:status` in the response-headers hook: the reads a token filter
//! with a 401 purge makes, each one `get_header` call whose value Envoy lends without a copy.

#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_char, c_void};

/// The ABI this module is written against; Envoy compares it with its own.
static ABI_VERSION: &[u8] = b"v0.2.0\0";
const HEADER: &[u8] = b"authorization";
/// Accepted by the bench's native upstream (`^Bearer tok-[0-9]+$`).
const VALUE: &[u8] = b"Bearer tok-0";

/// `envoy_dynamic_module_type_module_buffer` / `envoy_buffer`: a pointer and a length.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Buffer {
    ptr: *const c_char,
    len: usize,
}

impl Buffer {
    const fn of(bytes: &'static [u8]) -> Buffer {
        Buffer { ptr: bytes.as_ptr().cast(), len: bytes.len() }
    }
}

/// `envoy_dynamic_module_type_http_header_type_RequestHeader`.
const REQUEST_HEADER: u32 = 0;
/// `envoy_dynamic_module_type_http_header_type_ResponseHeader`.
#[cfg(feature = "read-headers")]
const RESPONSE_HEADER: u32 = 2;
/// Every `*_status_Continue` of the hook status enums.
const CONTINUE: u32 = 0;

unsafe extern "C" {
    fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy: *mut c_void,
        header_type: u32,
        key: Buffer,
        value: Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_log(level: u32, message: Buffer);
    #[cfg(feature = "read-headers")]
    fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy: *mut c_void,
        header_type: u32,
        key: Buffer,
        result: *mut Buffer,
        index: usize,
        total_count: *mut usize,
    ) -> bool;
}

/// Reads the first value of header `key` and looks at its bytes; its length (0 when absent).
#[cfg(feature = "read-headers")]
fn header_len(filter_envoy: *mut c_void, header_type: u32, key: &'static [u8]) -> usize {
    let mut value = Buffer { ptr: std::ptr::null(), len: 0 };
    let mut count = 0usize;
    // SAFETY: `filter_envoy` is Envoy's live stream for the calling hook; the out-parameters are
    // live locals; the value Envoy lends stays valid during the hook.
    let found = unsafe {
        envoy_dynamic_module_callback_http_get_header(
            filter_envoy,
            header_type,
            Buffer::of(key),
            &mut value,
            0,
            &mut count,
        )
    };
    if !found || value.ptr.is_null() {
        return 0;
    }
    // SAFETY: as above: `len` readable bytes at `ptr` for the duration of the hook.
    let bytes = unsafe { std::slice::from_raw_parts(value.ptr.cast::<u8>(), value.len) };
    std::hint::black_box(bytes).len()
}

/// Non-null identity for the configuration and every stream: nothing is allocated per stream.
static STATIC_OBJECT: u8 = 0;

fn static_ptr() -> *const c_void {
    (&raw const STATIC_OBJECT).cast()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr().cast()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: *mut c_void,
    _name: Buffer,
    _config: Buffer,
) -> *const c_void {
    // SAFETY: a constant buffer; Envoy copies the message before returning.
    unsafe { envoy_dynamic_module_callback_log(2, Buffer::of(b"floor_native: loaded")) };
    static_ptr()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(_config: *const c_void) {}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: Buffer,
    _config: Buffer,
) -> *const c_void {
    static_ptr()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_config: *const c_void) {}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    _config: *const c_void,
    _filter_envoy: *mut c_void,
) -> *const c_void {
    static_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: *mut c_void,
    _filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    #[cfg(feature = "read-headers")]
    header_len(filter_envoy, REQUEST_HEADER, b":authority");
    // SAFETY: `filter_envoy` is Envoy's live stream for this hook; constant buffers are copied.
    unsafe {
        envoy_dynamic_module_callback_http_set_header(
            filter_envoy,
            REQUEST_HEADER,
            Buffer::of(HEADER),
            Buffer::of(VALUE),
        )
    };
    CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy: *mut c_void,
    _filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    #[cfg(feature = "read-headers")]
    header_len(filter_envoy, RESPONSE_HEADER, b":status");
    let _ = filter_envoy;
    CONTINUE
}

/// The hooks this filter has nothing to do in: each continues or returns.
macro_rules! continue_hooks {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[unsafe(no_mangle)]
        pub extern "C" fn $name(_filter_envoy: *mut c_void, _filter: *const c_void $(, $arg: $ty)*) -> u32 {
            let _ = ($($arg,)*);
            CONTINUE
        }
    )*};
}

macro_rules! void_hooks {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[unsafe(no_mangle)]
        pub extern "C" fn $name(_envoy: *mut c_void, _module: *const c_void $(, $arg: $ty)*) {
            let _ = ($($arg,)*);
        }
    )*};
}

continue_hooks! {
    envoy_dynamic_module_on_http_filter_request_body(end_of_stream: bool);
    envoy_dynamic_module_on_http_filter_request_trailers();
    envoy_dynamic_module_on_http_filter_response_body(end_of_stream: bool);
    envoy_dynamic_module_on_http_filter_response_trailers();
    envoy_dynamic_module_on_http_filter_local_reply(code: u32, details: Buffer, reset_imminent: bool);
}

void_hooks! {
    envoy_dynamic_module_on_http_filter_stream_complete();
    envoy_dynamic_module_on_http_filter_scheduled(event_id: u64);
    envoy_dynamic_module_on_http_filter_config_scheduled(event_id: u64);
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark();
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark();
    envoy_dynamic_module_on_http_filter_http_callout_done(
        id: u64, result: u32, headers: *const c_void, headers_len: usize, body: *const c_void, body_len: usize);
    envoy_dynamic_module_on_http_filter_config_http_callout_done(
        id: u64, result: u32, headers: *const c_void, headers_len: usize, body: *const c_void, body_len: usize);
    envoy_dynamic_module_on_http_filter_http_stream_headers(
        id: u64, headers: *const c_void, headers_len: usize, end_stream: bool);
    envoy_dynamic_module_on_http_filter_http_stream_data(
        id: u64, data: *const c_void, data_len: usize, end_stream: bool);
    envoy_dynamic_module_on_http_filter_http_stream_trailers(id: u64, trailers: *const c_void, trailers_len: usize);
    envoy_dynamic_module_on_http_filter_http_stream_complete(id: u64);
    envoy_dynamic_module_on_http_filter_http_stream_reset(id: u64, reason: u32);
    envoy_dynamic_module_on_http_filter_config_http_stream_headers(
        id: u64, headers: *const c_void, headers_len: usize, end_stream: bool);
    envoy_dynamic_module_on_http_filter_config_http_stream_data(
        id: u64, data: *const c_void, data_len: usize, end_stream: bool);
    envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
        id: u64, trailers: *const c_void, trailers_len: usize);
    envoy_dynamic_module_on_http_filter_config_http_stream_complete(id: u64);
    envoy_dynamic_module_on_http_filter_config_http_stream_reset(id: u64, reason: u32);
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_filter: *const c_void) {}
