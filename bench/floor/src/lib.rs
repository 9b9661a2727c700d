//! The floor of `make bench`: a proxy-wasm module that writes a fixed `Authorization` header and
//! does nothing else. It exports only the callbacks Envoy needs to run it (no SDK, no allocator
//! use, no per-stream state), so its cost per request is what Envoy's wasm filter and V8 charge
//! any proxy-wasm filter that writes one header: a context-create call, a request-headers call
//! and one host call. oauth2-cc cannot be cheaper than this while it is a proxy-wasm module.

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

#[unsafe(no_mangle)]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Envoy hands the module data through memory the module allocates; this one never asks for any
/// (it reads no configuration, header or property), yet the ABI requires the export.
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
    // SAFETY: constant slices; the host copies them before returning.
    unsafe {
        proxy_replace_header_map_value(REQUEST_HEADERS, HEADER.as_ptr(), HEADER.len(), VALUE.as_ptr(), VALUE.len())
    };
    CONTINUE
}
