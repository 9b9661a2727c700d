//! The floor of `make bench`: a proxy-wasm module that writes a fixed `Authorization` header and
//! does nothing else. It exports only the callbacks Envoy needs to run it (no SDK, no per-stream
//! state), so its cost per request is what Envoy's wasm filter and V8 charge any proxy-wasm filter
//! that writes one header: a context-create call, a request-headers call and one host call.
//! oauth2-cc cannot be cheaper than this while it is a proxy-wasm module.
//!
//! Two build-time variants add the reads a token filter needs, done the cheapest way the ABI
//! allows, so that the cost of a read is measured rather than guessed:
//! - `read-authority` (cell (fm0)): reads the request's `:authority` before writing the header;
//! - `read-authority` + `read-status` (cell (fm)): also exports `proxy_on_response_headers` and
//!   reads the response's `:status` there.
//!
//! A read hands the value to the module in memory Envoy asks the module to allocate
//! (`proxy_on_memory_allocate`, a second entry into the VM); the floor frees it again, as any
//! filter must, with the same Rust allocator the filter uses.

const HEADER: &[u8] = b"authorization";
/// Accepted by the bench's native upstream (`^Bearer tok-[0-9]+$`).
const VALUE: &[u8] = b"Bearer tok-0";
const REQUEST_HEADERS: u32 = 0;
const CONTINUE: u32 = 0;

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
    ) -> u32;
}

#[cfg(feature = "read-authority")]
mod read {
    #[link(wasm_import_module = "env")]
    unsafe extern "C" {
        fn proxy_get_header_map_value(
            map: u32,
            key: *const u8,
            key_len: usize,
            return_value: *mut *mut u8,
            return_value_len: *mut usize,
        ) -> u32;
    }

    /// Reads header `key` of header map `map`, looks at its bytes and frees them; the value's
    /// length (0 when absent).
    pub fn header_len(map: u32, key: &[u8]) -> usize {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut len: usize = 0;
        // SAFETY: `key` is a live slice; Envoy writes the two out-parameters before returning.
        let status = unsafe { proxy_get_header_map_value(map, key.as_ptr(), key.len(), &mut data, &mut len) };
        if status != 0 || data.is_null() {
            return 0;
        }
        // SAFETY: Envoy filled `len` bytes of the buffer `proxy_on_memory_allocate` returned for
        // exactly `len` bytes: a Vec of that capacity, taken back (and freed) here.
        let value = unsafe { Vec::from_raw_parts(data, len, len) };
        std::hint::black_box(value.as_slice()).len()
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Envoy hands the module data through memory the module allocates (the configuration, and in
/// the read variants every header value).
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut buffer = Vec::<u8>::with_capacity(size);
    let pointer = buffer.as_mut_ptr();
    std::mem::forget(buffer);
    pointer
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_vm_start(_root_context_id: u32, _vm_configuration_size: usize) -> u32 {
    1
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_configure(_root_context_id: u32, _plugin_configuration_size: usize) -> u32 {
    1
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_context_id: u32) {}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_headers(_context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    #[cfg(feature = "read-authority")]
    read::header_len(REQUEST_HEADERS, b":authority");
    // SAFETY: constant slices; the host copies them before returning.
    unsafe {
        proxy_replace_header_map_value(REQUEST_HEADERS, HEADER.as_ptr(), HEADER.len(), VALUE.as_ptr(), VALUE.len())
    };
    CONTINUE
}

#[cfg(feature = "read-status")]
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_headers(_context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    /// `proxy-wasm` map type `HttpResponseHeaders`.
    const RESPONSE_HEADERS: u32 = 2;
    read::header_len(RESPONSE_HEADERS, b":status");
    CONTINUE
}
