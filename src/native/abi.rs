//! Our declarations of the Envoy dynamic-module ABI (Envoy 1.40, ABI `v0.2.0`, from
//! `source/extensions/dynamic_modules/abi/abi.h`), and safe wrappers for the callbacks we call.
//!
//! No Rust SDK is on the package registry, so the few types and callbacks the filter uses are
//! declared here by hand. The callbacks are not linked by name: `resolve` looks each one up in the
//! Envoy process (`dlsym`) when the module is loaded, so a missing or renamed callback refuses the
//! module at load (with the name in Envoy's log) instead of failing at the first request, and unit
//! tests install a fake Envoy's table instead. After load the table is read-only.

use std::ffi::{CStr, c_char, c_void};
use std::sync::OnceLock;

/// The ABI version this module is written against; `envoy_dynamic_module_on_program_init`
/// returns it and Envoy compares it with its own.
pub const ABI_VERSION: &CStr = c"v0.2.0";

/// `envoy_dynamic_module_type_module_buffer` (and `envoy_buffer`: same layout).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Buffer {
    pub ptr: *const c_char,
    pub len: usize,
}

impl Buffer {
    pub const NULL: Buffer = Buffer { ptr: std::ptr::null(), len: 0 };

    pub fn of(bytes: &[u8]) -> Buffer {
        Buffer { ptr: bytes.as_ptr().cast(), len: bytes.len() }
    }

    /// The bytes of an Envoy-owned buffer, valid for the current hook only.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes for the lifetime `'a`, or be null.
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees `ptr`/`len` describe live bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

/// `envoy_dynamic_module_type_module_http_header` / `envoy_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HttpHeader {
    pub key: *const c_char,
    pub key_len: usize,
    pub value: *const c_char,
    pub value_len: usize,
}

impl HttpHeader {
    pub fn of(key: &[u8], value: &[u8]) -> HttpHeader {
        HttpHeader {
            key: key.as_ptr().cast(),
            key_len: key.len(),
            value: value.as_ptr().cast(),
            value_len: value.len(),
        }
    }
}

/// `envoy_dynamic_module_type_log_level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Level {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

pub const REQUEST_HEADER: u32 = 0;
pub const RESPONSE_HEADER: u32 = 2;
/// `envoy_dynamic_module_type_metadata_source_Dynamic`: the stream's dynamic metadata.
pub const METADATA_DYNAMIC: u32 = 0;
/// `envoy_dynamic_module_type_metadata_source_Route`.
pub const METADATA_ROUTE: u32 = 1;
/// `envoy_dynamic_module_type_attribute_id_XdsRouteName`.
pub const ATTRIBUTE_ROUTE_NAME: u32 = 61;
/// `envoy_dynamic_module_type_http_callout_init_result_Success`.
pub const CALLOUT_INIT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_result_Success`.
pub const CALLOUT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_metrics_result_Success`.
pub const METRICS_SUCCESS: u32 = 0;

pub type Ptr = *mut c_void;

/// The callbacks the filter calls, as function pointers found in the Envoy process.
#[derive(Clone, Copy)]
pub struct Callbacks {
    pub log: unsafe extern "C" fn(u32, Buffer),
    pub log_enabled: unsafe extern "C" fn(u32) -> bool,
    pub is_validation_mode: unsafe extern "C" fn() -> bool,
    pub get_header: unsafe extern "C" fn(Ptr, u32, Buffer, *mut Buffer, usize, *mut usize) -> bool,
    pub set_header: unsafe extern "C" fn(Ptr, u32, Buffer, Buffer) -> bool,
    pub send_response: unsafe extern "C" fn(Ptr, u32, *mut HttpHeader, usize, Buffer, Buffer),
    pub continue_decoding: unsafe extern "C" fn(Ptr),
    pub get_attribute_string: unsafe extern "C" fn(Ptr, u32, *mut Buffer) -> bool,
    pub get_metadata_string: unsafe extern "C" fn(Ptr, u32, Buffer, Buffer, *mut Buffer) -> bool,
    pub get_metadata_bool: unsafe extern "C" fn(Ptr, u32, Buffer, Buffer, *mut bool) -> bool,
    pub get_metadata_keys_count: unsafe extern "C" fn(Ptr, u32, Buffer) -> usize,
    pub get_metadata_keys: unsafe extern "C" fn(Ptr, u32, Buffer, *mut Buffer) -> bool,
    pub filter_scheduler_new: unsafe extern "C" fn(Ptr) -> Ptr,
    pub filter_scheduler_commit: unsafe extern "C" fn(Ptr, u64),
    pub filter_scheduler_delete: unsafe extern "C" fn(Ptr),
    pub config_scheduler_new: unsafe extern "C" fn(Ptr) -> Ptr,
    pub config_scheduler_commit: unsafe extern "C" fn(Ptr, u64),
    pub config_scheduler_delete: unsafe extern "C" fn(Ptr),
    pub config_http_callout: unsafe extern "C" fn(Ptr, *mut u64, Buffer, *mut HttpHeader, usize, Buffer, u64) -> u32,
    pub config_define_counter: unsafe extern "C" fn(Ptr, Buffer, *mut Buffer, usize, *mut usize) -> u32,
    pub config_define_gauge: unsafe extern "C" fn(Ptr, Buffer, *mut Buffer, usize, *mut usize) -> u32,
    pub config_increment_counter: unsafe extern "C" fn(Ptr, usize, *mut Buffer, usize, u64) -> u32,
    pub config_set_gauge: unsafe extern "C" fn(Ptr, usize, *mut Buffer, usize, u64) -> u32,
    pub filter_increment_counter: unsafe extern "C" fn(Ptr, usize, *mut Buffer, usize, u64) -> u32,
}

static CALLBACKS: OnceLock<Callbacks> = OnceLock::new();

#[cfg(not(test))]
unsafe extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

/// The callback `name` in the Envoy process, as the function-pointer type `F` the caller
/// declares for it.
#[cfg(not(test))]
fn find<F: Copy>(name: &'static CStr) -> Result<F, &'static str> {
    let missing = || name.to_str().unwrap_or("?");
    if std::mem::size_of::<F>() != std::mem::size_of::<*mut c_void>() {
        return Err(missing());
    }
    // SAFETY: RTLD_DEFAULT (null on glibc) searches the process's global symbols, which hold
    // Envoy's exported callbacks; the name is a valid C string.
    let found = unsafe { dlsym(std::ptr::null_mut(), name.as_ptr()) };
    if found.is_null() {
        return Err(missing());
    }
    // SAFETY: `F` is the function-pointer type of the ABI callback of that name (its C signature
    // in abi.h of Envoy 1.40), of pointer size (checked above).
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&found) })
}

/// Looks every callback up in the Envoy process. `Err` names the first one missing.
#[cfg(not(test))]
pub fn resolve() -> Result<(), &'static str> {
    if CALLBACKS.get().is_some() {
        return Ok(());
    }
    let table = Callbacks {
        log: find(c"envoy_dynamic_module_callback_log")?,
        log_enabled: find(c"envoy_dynamic_module_callback_log_enabled")?,
        is_validation_mode: find(c"envoy_dynamic_module_callback_is_validation_mode")?,
        get_header: find(c"envoy_dynamic_module_callback_http_get_header")?,
        set_header: find(c"envoy_dynamic_module_callback_http_set_header")?,
        send_response: find(c"envoy_dynamic_module_callback_http_send_response")?,
        continue_decoding: find(c"envoy_dynamic_module_callback_http_filter_continue_decoding")?,
        get_attribute_string: find(c"envoy_dynamic_module_callback_http_filter_get_attribute_string")?,
        get_metadata_string: find(c"envoy_dynamic_module_callback_http_get_metadata_string")?,
        get_metadata_bool: find(c"envoy_dynamic_module_callback_http_get_metadata_bool")?,
        get_metadata_keys_count: find(c"envoy_dynamic_module_callback_http_get_metadata_keys_count")?,
        get_metadata_keys: find(c"envoy_dynamic_module_callback_http_get_metadata_keys")?,
        filter_scheduler_new: find(c"envoy_dynamic_module_callback_http_filter_scheduler_new")?,
        filter_scheduler_commit: find(c"envoy_dynamic_module_callback_http_filter_scheduler_commit")?,
        filter_scheduler_delete: find(c"envoy_dynamic_module_callback_http_filter_scheduler_delete")?,
        config_scheduler_new: find(c"envoy_dynamic_module_callback_http_filter_config_scheduler_new")?,
        config_scheduler_commit: find(c"envoy_dynamic_module_callback_http_filter_config_scheduler_commit")?,
        config_scheduler_delete: find(c"envoy_dynamic_module_callback_http_filter_config_scheduler_delete")?,
        config_http_callout: find(c"envoy_dynamic_module_callback_http_filter_config_http_callout")?,
        config_define_counter: find(c"envoy_dynamic_module_callback_http_filter_config_define_counter")?,
        config_define_gauge: find(c"envoy_dynamic_module_callback_http_filter_config_define_gauge")?,
        config_increment_counter: find(c"envoy_dynamic_module_callback_http_filter_config_increment_counter")?,
        config_set_gauge: find(c"envoy_dynamic_module_callback_http_filter_config_set_gauge")?,
        filter_increment_counter: find(c"envoy_dynamic_module_callback_http_filter_increment_counter")?,
    };
    let _ = CALLBACKS.set(table);
    Ok(())
}

/// Installs a fake Envoy's callbacks (unit tests; the first call wins for the process).
#[cfg(test)]
pub fn install(table: Callbacks) {
    let _ = CALLBACKS.set(table);
}

/// Unit tests have no Envoy to search: the fake's table is installed instead.
#[cfg(test)]
pub fn resolve() -> Result<(), &'static str> {
    callbacks().map(|_| ()).ok_or("no fake Envoy installed")
}

/// The callback table; `None` before a successful `resolve` (then every wrapper does nothing).
pub fn callbacks() -> Option<&'static Callbacks> {
    CALLBACKS.get()
}

pub fn log(level: Level, message: &str) {
    if let Some(c) = callbacks() {
        // SAFETY: a live buffer; Envoy copies it before returning.
        unsafe { (c.log)(level as u32, Buffer::of(message.as_bytes())) }
    }
}

/// Logs `oauth2_cc: <message>` at `level` (formatted only when Envoy logs that level).
pub fn log_line(level: Level, message: std::fmt::Arguments<'_>) {
    if log_enabled(level) {
        log(level, &format!("oauth2_cc: {message}"));
    }
}

pub fn log_enabled(level: Level) -> bool {
    // SAFETY: no pointers.
    callbacks().is_some_and(|c| unsafe { (c.log_enabled)(level as u32) })
}

/// Whether Envoy runs `--mode validate` (no traffic: no tick thread, no callouts).
pub fn is_validation_mode() -> bool {
    // SAFETY: no pointers.
    callbacks().is_some_and(|c| unsafe { (c.is_validation_mode)() })
}

/// A stream of Envoy's (`envoy_dynamic_module_type_http_filter_envoy_ptr`), valid during a hook
/// of that stream or in `on_http_filter_scheduled` for it.
#[derive(Clone, Copy)]
pub struct Stream(pub Ptr);

impl Stream {
    /// The first value of a header: Envoy's bytes, valid until this hook returns or a header of
    /// the same map is set, so they are lent for as long as this `Stream` value is borrowed
    /// (hooks make a `Stream` per call and drop it when they return).
    pub fn header(&self, kind: u32, name: &str) -> Option<&[u8]> {
        let c = callbacks()?;
        let mut out = Buffer::NULL;
        // SAFETY: `self.0` is the live stream; `out` is written by Envoy; size pointer may be null.
        let found =
            unsafe { (c.get_header)(self.0, kind, Buffer::of(name.as_bytes()), &mut out, 0, std::ptr::null_mut()) };
        // SAFETY: Envoy owns the bytes until the end of the hook (see abi.h, get_header).
        (found && !out.ptr.is_null()).then(|| unsafe { out.as_bytes() })
    }

    /// Sets a request header (replacing every value). False when Envoy refused it.
    pub fn set_request_header(self, name: &str, value: &[u8]) -> bool {
        // SAFETY: live buffers, copied by Envoy before it returns.
        callbacks().is_some_and(|c| unsafe {
            (c.set_header)(self.0, REQUEST_HEADER, Buffer::of(name.as_bytes()), Buffer::of(value))
        })
    }

    pub fn send_response(self, status: u32, headers: &[(&str, &str)], body: &[u8], details: &str) {
        let Some(c) = callbacks() else { return };
        let mut list: Vec<HttpHeader> =
            headers.iter().map(|(k, v)| HttpHeader::of(k.as_bytes(), v.as_bytes())).collect();
        // SAFETY: every pointer refers to a live buffer; Envoy copies them before returning.
        unsafe {
            (c.send_response)(
                self.0,
                status,
                list.as_mut_ptr(),
                list.len(),
                Buffer::of(body),
                Buffer::of(details.as_bytes()),
            )
        }
    }

    pub fn continue_decoding(self) {
        if let Some(c) = callbacks() {
            // SAFETY: the live stream.
            unsafe { (c.continue_decoding)(self.0) }
        }
    }

    /// The route's name (lent like [`Stream::header`]'s bytes).
    pub fn route_name(&self) -> Option<&[u8]> {
        let c = callbacks()?;
        let mut out = Buffer::NULL;
        // SAFETY: the live stream; `out` is written by Envoy.
        let found = unsafe { (c.get_attribute_string)(self.0, ATTRIBUTE_ROUTE_NAME, &mut out) };
        // SAFETY: Envoy owns the bytes until the end of the hook.
        found.then(|| unsafe { out.as_bytes() })
    }

    /// A string in the route's metadata (lent like [`Stream::header`]'s bytes).
    pub fn route_metadata_string(&self, namespace: &str, key: &str) -> Option<&[u8]> {
        self.metadata_string(METADATA_ROUTE, namespace, key)
    }

    /// A string in the stream's dynamic metadata (lent like [`Stream::header`]'s bytes).
    pub fn dynamic_metadata_string(&self, namespace: &str, key: &str) -> Option<&[u8]> {
        self.metadata_string(METADATA_DYNAMIC, namespace, key)
    }

    /// Whether the stream's dynamic metadata has `key` in `namespace`, whatever its value (a
    /// struct, such as the payload jwt_authn writes, has no getter of its own).
    pub fn dynamic_metadata_has_key(&self, namespace: &str, key: &str) -> bool {
        let Some(c) = callbacks() else { return false };
        // SAFETY: the live stream and a live namespace buffer.
        let count = unsafe { (c.get_metadata_keys_count)(self.0, METADATA_DYNAMIC, Buffer::of(namespace.as_bytes())) };
        // A namespace with more keys than this is not one we look into.
        if count == 0 || count > 1024 {
            return false;
        }
        let mut keys = vec![Buffer::NULL; count];
        // SAFETY: `keys` has room for the `count` buffers Envoy writes.
        let found = unsafe {
            (c.get_metadata_keys)(self.0, METADATA_DYNAMIC, Buffer::of(namespace.as_bytes()), keys.as_mut_ptr())
        };
        // SAFETY: Envoy owns the key bytes until the end of the hook.
        found && keys.iter().any(|k| !k.ptr.is_null() && unsafe { k.as_bytes() } == key.as_bytes())
    }

    fn metadata_string(&self, source: u32, namespace: &str, key: &str) -> Option<&[u8]> {
        let c = callbacks()?;
        let mut out = Buffer::NULL;
        // SAFETY: the live stream, live key buffers; `out` is written by Envoy.
        let found = unsafe {
            (c.get_metadata_string)(
                self.0,
                source,
                Buffer::of(namespace.as_bytes()),
                Buffer::of(key.as_bytes()),
                &mut out,
            )
        };
        // SAFETY: Envoy owns the bytes until the end of the hook.
        found.then(|| unsafe { out.as_bytes() })
    }

    pub fn route_metadata_bool(self, namespace: &str, key: &str) -> Option<bool> {
        let c = callbacks()?;
        let mut out = false;
        // SAFETY: the live stream, live key buffers; `out` is written by Envoy.
        let found = unsafe {
            (c.get_metadata_bool)(
                self.0,
                METADATA_ROUTE,
                Buffer::of(namespace.as_bytes()),
                Buffer::of(key.as_bytes()),
                &mut out,
            )
        };
        found.then_some(out)
    }

    /// Adds to a counter the stream's configuration defined (on the stream's worker).
    pub fn increment_counter(self, id: usize, by: u64) {
        if let Some(c) = callbacks() {
            // SAFETY: the live stream; no labels.
            unsafe { (c.filter_increment_counter)(self.0, id, std::ptr::null_mut(), 0, by) };
        }
    }

    /// A scheduler that posts `on_http_filter_scheduled` to this stream on its own worker.
    pub fn scheduler(self) -> Option<Scheduler> {
        let c = callbacks()?;
        // SAFETY: the live stream.
        let raw = unsafe { (c.filter_scheduler_new)(self.0) };
        (!raw.is_null()).then_some(Scheduler { raw, kind: SchedulerKind::Stream })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SchedulerKind {
    Stream,
    Config,
}

/// An Envoy scheduler, owned by the module: posts an event to a stream's worker or to the main
/// thread from any thread, and is deleted when dropped.
pub struct Scheduler {
    raw: Ptr,
    kind: SchedulerKind,
}

// SAFETY: Envoy's schedulers exist to be committed from any thread (abi.h: "dispatch ... from any
// thread including the ones managed by the module").
unsafe impl Send for Scheduler {}
// SAFETY: as above; commit takes the pointer by value and Envoy synchronises internally.
unsafe impl Sync for Scheduler {}

impl Scheduler {
    pub fn commit(&self, event_id: u64) {
        let Some(c) = callbacks() else { return };
        // SAFETY: `raw` came from the matching `*_scheduler_new` and is not deleted yet.
        unsafe {
            match self.kind {
                SchedulerKind::Stream => (c.filter_scheduler_commit)(self.raw, event_id),
                SchedulerKind::Config => (c.config_scheduler_commit)(self.raw, event_id),
            }
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let Some(c) = callbacks() else { return };
        // SAFETY: deleted once, here.
        unsafe {
            match self.kind {
                SchedulerKind::Stream => (c.filter_scheduler_delete)(self.raw),
                SchedulerKind::Config => (c.config_scheduler_delete)(self.raw),
            }
        }
    }
}

/// Proof that the code holding it runs on Envoy's main thread: made only in the hooks Envoy calls
/// there, and neither `Send` nor `Sync`, so it cannot be carried to another thread. Every
/// [`ConfigHandle`] call that Envoy allows on the main thread only asks for one.
#[derive(Clone, Copy)]
pub struct OnMain(std::marker::PhantomData<*const ()>);

impl OnMain {
    /// # Safety
    /// Call only on Envoy's main thread (a filter-configuration hook), or in a test that plays it.
    pub unsafe fn assume() -> OnMain {
        OnMain(std::marker::PhantomData)
    }
}

/// Envoy's filter configuration object (`http_filter_config_envoy_ptr`): main-thread callouts,
/// the main-thread scheduler and metric definitions.
#[derive(Clone, Copy)]
pub struct ConfigHandle(pub Ptr);

// SAFETY: the module only carries the pointer between threads; every call that makes Envoy
// dereference it takes an `OnMain`, which exists only on the main thread.
unsafe impl Send for ConfigHandle {}
// SAFETY: as above.
unsafe impl Sync for ConfigHandle {}

impl ConfigHandle {
    pub fn scheduler(self, _main: OnMain) -> Option<Scheduler> {
        let c = callbacks()?;
        // SAFETY: the live filter configuration.
        let raw = unsafe { (c.config_scheduler_new)(self.0) };
        (!raw.is_null()).then_some(Scheduler { raw, kind: SchedulerKind::Config })
    }

    /// Sends an HTTP request on the main thread; the answer comes to
    /// `on_http_filter_config_http_callout_done` with the returned id.
    pub fn http_callout(
        self,
        _main: OnMain,
        cluster: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, u32> {
        let c = callbacks().ok_or(u32::MAX)?;
        let mut list: Vec<HttpHeader> = headers.iter().map(|(k, v)| HttpHeader::of(k.as_bytes(), v)).collect();
        let mut id = 0u64;
        // SAFETY: live buffers, copied by Envoy before it returns; `id` is written by Envoy.
        let result = unsafe {
            (c.config_http_callout)(
                self.0,
                &mut id,
                Buffer::of(cluster.as_bytes()),
                list.as_mut_ptr(),
                list.len(),
                Buffer::of(body),
                timeout_ms,
            )
        };
        if result == CALLOUT_INIT_SUCCESS { Ok(id) } else { Err(result) }
    }

    pub fn define_counter(self, _main: OnMain, name: &str) -> Option<usize> {
        let c = callbacks()?;
        let mut id = 0usize;
        // SAFETY: a live name buffer; no labels; `id` is written by Envoy.
        let result =
            unsafe { (c.config_define_counter)(self.0, Buffer::of(name.as_bytes()), std::ptr::null_mut(), 0, &mut id) };
        (result == METRICS_SUCCESS).then_some(id)
    }

    pub fn define_gauge(self, _main: OnMain, name: &str) -> Option<usize> {
        let c = callbacks()?;
        let mut id = 0usize;
        // SAFETY: as for counters.
        let result =
            unsafe { (c.config_define_gauge)(self.0, Buffer::of(name.as_bytes()), std::ptr::null_mut(), 0, &mut id) };
        (result == METRICS_SUCCESS).then_some(id)
    }

    pub fn increment_counter(self, _main: OnMain, id: usize, by: u64) {
        if let Some(c) = callbacks() {
            // SAFETY: the live configuration; no labels.
            unsafe { (c.config_increment_counter)(self.0, id, std::ptr::null_mut(), 0, by) };
        }
    }

    pub fn set_gauge(self, _main: OnMain, id: usize, value: u64) {
        if let Some(c) = callbacks() {
            // SAFETY: the live configuration; no labels.
            unsafe { (c.config_set_gauge)(self.0, id, std::ptr::null_mut(), 0, value) };
        }
    }
}
