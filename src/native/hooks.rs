//! The event hooks Envoy calls (`envoy_dynamic_module_on_*`): the only `extern "C"` entry points
//! of the native build. Envoy 1.40 resolves every HTTP-filter hook when it loads the module, the
//! HTTP-stream callout hooks too, so each is exported even where the filter has nothing to do.
//!
//! Pointers cross here: the filter configuration is an `Arc<Plugin>` given to Envoy with
//! `Arc::into_raw` and taken back in `config_destroy`; each stream is a `Box<StreamFilter>` given
//! with `Box::into_raw` and taken back in `filter_destroy`. Envoy calls a stream's hooks on its
//! worker, one at a time, and the configuration's on the main thread.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use crate::abi::{self, Buffer, ConfigHandle, HttpHeader, Level, OnMain, Stream};
use crate::parked::DELIVERED;
use crate::plugin::Plugin;
use crate::stream::{StreamFilter, Verdict};

/// `*_status_Continue` and `StopIteration` of the request-headers status enum.
const HEADERS_CONTINUE: u32 = 0;
const HEADERS_STOP_ITERATION: u32 = 1;
/// `request_body_status_StopIterationAndBuffer`.
const BODY_STOP_AND_BUFFER: u32 = 1;
/// `request_trailers_status_StopIteration`.
const TRAILERS_STOP: u32 = 1;
const CONTINUE: u32 = 0;

/// Loads the module: checks that Envoy offers every callback we call (a different Envoy is
/// refused here, by name, rather than at the first request) and reports our ABI version.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    match abi::resolve() {
        Ok(()) => abi::ABI_VERSION.as_ptr(),
        // No logger without the log callback: stderr is Envoy's log stream too.
        Err(missing) => {
            eprintln!("oauth2_cc: this Envoy lacks the dynamic-module callback {missing}; refusing to load");
            std::ptr::null()
        }
    }
}

/// # Safety
/// `plugin` must be a pointer this module returned from `config_new` and not yet destroyed.
unsafe fn plugin_ref<'a>(plugin: *const c_void) -> Option<&'a Plugin> {
    // SAFETY: per the contract above, the Arc behind it is alive until `config_destroy`.
    unsafe { plugin.cast::<Plugin>().as_ref() }
}

/// # Safety
/// `filter` must be a pointer this module returned from `filter_new` and not yet destroyed.
unsafe fn filter_mut<'a>(filter: *const c_void) -> Option<&'a mut StreamFilter> {
    // SAFETY: per the contract; Envoy calls one hook of a stream at a time, on its worker.
    unsafe { filter.cast::<StreamFilter>().cast_mut().as_mut() }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: *mut c_void,
    _name: Buffer,
    config: Buffer,
) -> *const c_void {
    // SAFETY: Envoy's configuration bytes, valid during this hook.
    let bytes = unsafe { config.as_bytes() };
    // SAFETY: Envoy makes filter configurations on its main thread.
    let main = unsafe { OnMain::assume() };
    match Plugin::load(main, ConfigHandle(config_envoy), bytes) {
        Ok(plugin) => Arc::into_raw(plugin).cast(),
        Err(line) => {
            abi::log(Level::Error, &line);
            std::ptr::null()
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(plugin: *const c_void) {
    if plugin.is_null() {
        return;
    }
    // SAFETY: the pointer `config_new` made with `Arc::into_raw`, given back once, here.
    let plugin = unsafe { Arc::from_raw(plugin.cast::<Plugin>()) };
    // SAFETY: Envoy destroys filter configurations on its main thread.
    plugin.shut_down(unsafe { OnMain::assume() });
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _config_envoy: *mut c_void,
    plugin: *const c_void,
    event: u64,
) {
    // SAFETY: Envoy passes the live configuration this module made.
    if let Some(plugin) = unsafe { plugin_ref(plugin) } {
        // SAFETY: a configuration's scheduled events run on Envoy's main thread.
        plugin.on_main_event(unsafe { OnMain::assume() }, event);
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy: *mut c_void,
    plugin: *const c_void,
    callout: u64,
    result: u32,
    headers: *const HttpHeader,
    headers_len: usize,
    chunks: *const Buffer,
    chunks_len: usize,
) {
    // SAFETY: Envoy passes the live configuration this module made.
    let Some(plugin) = (unsafe { plugin_ref(plugin) }) else { return };
    // SAFETY: Envoy's arrays and the buffers they point to are valid during this hook (or null).
    let headers: Vec<(&[u8], &[u8])> = unsafe { slice(headers, headers_len) }
        .iter()
        // SAFETY: as above.
        .map(|h| unsafe {
            (Buffer { ptr: h.key, len: h.key_len }.as_bytes(), Buffer { ptr: h.value, len: h.value_len }.as_bytes())
        })
        .collect();
    // SAFETY: as above.
    let chunks: Vec<&[u8]> = unsafe { slice(chunks, chunks_len) }.iter().map(|b| unsafe { b.as_bytes() }).collect();
    // SAFETY: a configuration's callouts are answered on Envoy's main thread.
    let main = unsafe { OnMain::assume() };
    plugin.on_callout_done(main, callout, result == abi::CALLOUT_SUCCESS, &headers, &chunks);
}

/// # Safety
/// `ptr` must point to `len` values, or be null.
unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if ptr.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    plugin: *const c_void,
    _filter_envoy: *mut c_void,
) -> *const c_void {
    if plugin.is_null() {
        return std::ptr::null();
    }
    // SAFETY: the live configuration; a new strong count for the stream, released in destroy.
    let plugin = unsafe {
        Arc::increment_strong_count(plugin.cast::<Plugin>());
        Arc::from_raw(plugin.cast::<Plugin>())
    };
    Box::into_raw(Box::new(StreamFilter::new(plugin))).cast_const().cast()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: *const c_void) {
    if !filter.is_null() {
        // SAFETY: the pointer `filter_new` made with `Box::into_raw`, given back once, here.
        drop(unsafe { Box::from_raw(filter.cast::<StreamFilter>().cast_mut()) });
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: *mut c_void,
    filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: the live stream object of this hook.
    match unsafe { filter_mut(filter) }.map(|f| f.on_request_headers(Stream(filter_envoy))) {
        Some(Verdict::Stop) => HEADERS_STOP_ITERATION,
        _ => HEADERS_CONTINUE,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _filter_envoy: *mut c_void,
    filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    // Continuing body data would release the paused headers, without a token.
    // SAFETY: the live stream object of this hook.
    if unsafe { filter_mut(filter) }.is_some_and(|f| f.waiting()) { BODY_STOP_AND_BUFFER } else { CONTINUE }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter_envoy: *mut c_void,
    filter: *const c_void,
) -> u32 {
    // SAFETY: the live stream object of this hook.
    if unsafe { filter_mut(filter) }.is_some_and(|f| f.waiting()) { TRAILERS_STOP } else { CONTINUE }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy: *mut c_void,
    filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: the live stream object of this hook.
    if let Some(f) = unsafe { filter_mut(filter) } {
        f.on_response_headers(Stream(filter_envoy));
    }
    CONTINUE
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    filter_envoy: *mut c_void,
    filter: *const c_void,
    event: u64,
) {
    // SAFETY: the live stream object of this hook.
    if event == DELIVERED
        && let Some(f) = unsafe { filter_mut(filter) }
    {
        f.on_delivered(Stream(filter_envoy));
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy: *mut c_void,
    filter: *const c_void,
) {
    // SAFETY: the live stream object of this hook.
    if let Some(f) = unsafe { filter_mut(filter) } {
        f.on_complete();
    }
}

/// Hooks the filter has nothing to do in; exported because Envoy resolves them at load.
macro_rules! idle_hooks {
    ($ret:ty = $value:expr; $($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[unsafe(no_mangle)]
        pub extern "C" fn $name(_envoy: *mut c_void, _module: *const c_void $(, $arg: $ty)*) -> $ret {
            let _ = ($($arg,)*);
            $value
        }
    )*};
}

idle_hooks! { u32 = CONTINUE;
    envoy_dynamic_module_on_http_filter_response_body(end_of_stream: bool);
    envoy_dynamic_module_on_http_filter_response_trailers();
    envoy_dynamic_module_on_http_filter_local_reply(code: u32, details: Buffer, reset_imminent: bool);
}

idle_hooks! { () = ();
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark();
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark();
    envoy_dynamic_module_on_http_filter_http_callout_done(
        id: u64, result: u32, headers: *const c_void, headers_len: usize, body: *const c_void, body_len: usize);
    envoy_dynamic_module_on_http_filter_http_stream_headers(
        id: u64, headers: *const c_void, headers_len: usize, end_stream: bool);
    envoy_dynamic_module_on_http_filter_http_stream_data(id: u64, data: *const c_void, data_len: usize, end_stream: bool);
    envoy_dynamic_module_on_http_filter_http_stream_trailers(id: u64, trailers: *const c_void, trailers_len: usize);
    envoy_dynamic_module_on_http_filter_http_stream_complete(id: u64);
    envoy_dynamic_module_on_http_filter_http_stream_reset(id: u64, reason: u32);
    envoy_dynamic_module_on_http_filter_config_http_stream_headers(
        id: u64, headers: *const c_void, headers_len: usize, end_stream: bool);
    envoy_dynamic_module_on_http_filter_config_http_stream_data(
        id: u64, data: *const c_void, data_len: usize, end_stream: bool);
    envoy_dynamic_module_on_http_filter_config_http_stream_trailers(id: u64, trailers: *const c_void, trailers_len: usize);
    envoy_dynamic_module_on_http_filter_config_http_stream_complete(id: u64);
    envoy_dynamic_module_on_http_filter_config_http_stream_reset(id: u64, reason: u32);
}

/// Per-route configurations are not used (routes pick profiles through metadata; disabling is
/// Envoy's own `FilterConfig`); accepted and ignored so such a route does not fail to load.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: Buffer,
    _config: Buffer,
) -> *const c_void {
    static PER_ROUTE: u8 = 0;
    (&raw const PER_ROUTE).cast()
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_config: *const c_void) {}
