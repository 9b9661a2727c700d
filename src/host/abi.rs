//! Panic-free wrappers for the host calls the filter makes on a request it resumes from its root
//! context. The SDK's own wrappers panic on any status they do not expect, and a panic kills the
//! VM with every request on its worker; here every status becomes a `Result`.

use proxy_wasm::types::{MapType, Status, StreamType};

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
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
}

fn result(status: Status) -> Result<(), Status> {
    match status {
        Status::Ok => Ok(()),
        other => Err(other),
    }
}

/// Sets (replacing every existing value) a request header of the effective context.
pub fn set_request_header(name: &str, value: &str) -> Result<(), Status> {
    // SAFETY: pointers and lengths come from live slices; the host copies them before returning.
    result(unsafe {
        proxy_replace_header_map_value(
            MapType::HttpRequestHeaders,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Resumes the effective context's paused request.
pub fn resume_request() -> Result<(), Status> {
    // SAFETY: no pointers are passed.
    result(unsafe { proxy_continue_stream(StreamType::HttpRequest) })
}

/// Answers the effective context's request locally.
pub fn send_local_response(status: u32, details: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<(), Status> {
    let serialized = serialize_headers(headers);
    // SAFETY: pointers and lengths come from live buffers; the host copies them before returning.
    result(unsafe {
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
    // SAFETY: no pointers are passed.
    result(unsafe { proxy_set_effective_context(context_id) })
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
