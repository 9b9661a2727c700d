//! A fake Envoy for the proxy-wasm host, natively: the proxy-wasm ABI functions the filter and the
//! SDK import (`env.proxy_*`) defined here as plain C symbols, so a test binary links against them
//! instead of a wasm runtime. Each records what it was asked to do and serves a fake request,
//! response, callout answer, shared data and shared queues.
//!
//! State is per thread, like the SDK's dispatcher: every test runs its own Envoy.
//!
//! Every `unsafe` here relies on the ABI's contract: pointers and sizes the filter passes describe
//! live buffers, out-pointers are valid for one write.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

use proxy_wasm::types::{Action, BufferType, MapType, MetricType, Status, StreamType};

/// What the filter asked of Envoy, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Log(u32, String),
    Now,
    SetTick(u32),
    GetBuffer(u32),
    GetHeader(u32, String),
    ReplaceHeader {
        context: u32,
        name: String,
        value: String,
    },
    GetProperty(String),
    GetShared(String),
    SetShared(String),
    RegisterQueue(String),
    ResolveQueue(String),
    Dequeue(u32),
    Enqueue(u32),
    Continue(u32),
    LocalResponse {
        context: u32,
        status: u32,
    },
    SetEffective(u32),
    DefineMetric(String),
    IncrementMetric(u32, i64),
    RecordMetric(u32, u64),
    Callout {
        context: u32,
        cluster: String,
        token: u32,
    },
    /// An ABI function the filter has no reason to call.
    Unexpected(&'static str),
}

#[derive(Default)]
struct Host {
    calls: Vec<Call>,
    effective: u32,
    now_ns: u64,
    plugin_configuration: Vec<u8>,
    /// Request and response headers, by http context.
    request_headers: HashMap<u32, Vec<(String, Vec<u8>)>>,
    response_headers: HashMap<u32, Vec<(String, Vec<u8>)>>,
    /// Properties (dynamic metadata, ...) by http context, by path (parts joined with NUL).
    properties: HashMap<u32, HashMap<String, Vec<u8>>>,
    /// The body of each callout, by token.
    callout_bodies: HashMap<u32, Vec<u8>>,
    /// The answer served to `proxy_on_http_call_response`.
    call_headers: Vec<(String, Vec<u8>)>,
    call_body: Vec<u8>,
    /// Shared data: value and version.
    shared: HashMap<String, (Vec<u8>, u32)>,
    /// Queues by id: name, the root context that registered it, messages.
    queues: Vec<(String, u32, VecDeque<Vec<u8>>)>,
    next_token: u32,
    next_metric: u32,
    next_version: u32,
}

thread_local! {
    static HOST: RefCell<Host> = RefCell::new(Host { now_ns: 1_700_000_000_000_000_000, ..Host::default() });
}

fn with<R>(f: impl FnOnce(&mut Host) -> R) -> R {
    HOST.with(|host| f(&mut host.borrow_mut()))
}

fn record(call: Call) {
    with(|h| h.calls.push(call));
}

/// # Safety
/// `data`/`size` describe a live buffer (or size is 0).
unsafe fn bytes<'a>(data: *const u8, size: usize) -> &'a [u8] {
    if size == 0 { &[] } else { unsafe { std::slice::from_raw_parts(data, size) } }
}

unsafe fn text(data: *const u8, size: usize) -> String {
    String::from_utf8_lossy(unsafe { bytes(data, size) }).into_owned()
}

/// Hands `value` to the filter as a buffer it owns (the adapter takes it back with
/// `Vec::from_raw_parts(ptr, len, len)`: a boxed slice has exactly that layout).
unsafe fn give(value: &[u8], out_data: *mut *mut u8, out_size: *mut usize) {
    let boxed: Box<[u8]> = value.into();
    let size = boxed.len();
    unsafe {
        *out_data = Box::into_raw(boxed).cast::<u8>();
        *out_size = size;
    }
}

fn lookup(headers: Option<&Vec<(String, Vec<u8>)>>, name: &str) -> Option<Vec<u8>> {
    headers?.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
}

// ---- the ABI, as Envoy would serve it ----

#[unsafe(no_mangle)]
pub extern "C" fn proxy_log(level: u32, data: *const u8, size: usize) -> Status {
    record(Call::Log(level, unsafe { text(data, size) }));
    Status::Ok
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_get_current_time_nanoseconds(out: *mut u64) -> Status {
    let now = with(|h| {
        h.calls.push(Call::Now);
        h.now_ns
    });
    unsafe { *out = now };
    Status::Ok
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_set_tick_period_milliseconds(period: u32) -> Status {
    record(Call::SetTick(period));
    Status::Ok
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_get_buffer_bytes(
    kind: BufferType,
    start: usize,
    max: usize,
    out_data: *mut *mut u8,
    out_size: *mut usize,
) -> Status {
    let value = with(|h| {
        h.calls.push(Call::GetBuffer(kind as u32));
        match kind {
            BufferType::PluginConfiguration => Some(h.plugin_configuration.clone()),
            BufferType::HttpCallResponseBody => Some(h.call_body.clone()),
            _ => None,
        }
    });
    match value {
        Some(v) => {
            let end = start.saturating_add(max).min(v.len());
            unsafe { give(v.get(start..end).unwrap_or_default(), out_data, out_size) };
            Status::Ok
        }
        None => Status::NotFound,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_get_header_map_value(
    map: MapType,
    key: *const u8,
    key_size: usize,
    out_data: *mut *mut u8,
    out_size: *mut usize,
) -> Status {
    let name = unsafe { text(key, key_size) };
    let value = with(|h| {
        h.calls.push(Call::GetHeader(map as u32, name.clone()));
        match map {
            MapType::HttpRequestHeaders => lookup(h.request_headers.get(&h.effective), &name),
            MapType::HttpResponseHeaders => lookup(h.response_headers.get(&h.effective), &name),
            MapType::HttpCallResponseHeaders => lookup(Some(&h.call_headers), &name),
            _ => None,
        }
    });
    match value {
        Some(v) => {
            unsafe { give(&v, out_data, out_size) };
            Status::Ok
        }
        None => Status::NotFound,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_replace_header_map_value(
    map: MapType,
    key: *const u8,
    key_size: usize,
    value: *const u8,
    value_size: usize,
) -> Status {
    let (name, value) = unsafe { (text(key, key_size), bytes(value, value_size).to_vec()) };
    with(|h| {
        let context = h.effective;
        h.calls.push(Call::ReplaceHeader {
            context,
            name: name.clone(),
            value: String::from_utf8_lossy(&value).into(),
        });
        if map == MapType::HttpRequestHeaders {
            let headers = h.request_headers.entry(context).or_default();
            headers.retain(|(n, _)| *n != name);
            headers.push((name, value));
        }
    });
    Status::Ok
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_get_property(
    path: *const u8,
    path_size: usize,
    out_data: *mut *mut u8,
    out_size: *mut usize,
) -> Status {
    let path = unsafe { text(path, path_size) };
    let value = with(|h| {
        h.calls.push(Call::GetProperty(path.clone()));
        h.properties.get(&h.effective).and_then(|p| p.get(&path)).cloned()
    });
    match value {
        Some(v) => {
            unsafe { give(&v, out_data, out_size) };
            Status::Ok
        }
        None => Status::NotFound,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_get_shared_data(
    key: *const u8,
    key_size: usize,
    out_data: *mut *mut u8,
    out_size: *mut usize,
    out_cas: *mut u32,
) -> Status {
    let key = unsafe { text(key, key_size) };
    let entry = with(|h| {
        h.calls.push(Call::GetShared(key.clone()));
        h.shared.get(&key).cloned()
    });
    match entry {
        Some((value, version)) => {
            unsafe {
                give(&value, out_data, out_size);
                *out_cas = version;
            }
            Status::Ok
        }
        None => Status::NotFound,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_set_shared_data(
    key: *const u8,
    key_size: usize,
    value: *const u8,
    value_size: usize,
    cas: u32,
) -> Status {
    let (key, value) = unsafe { (text(key, key_size), bytes(value, value_size).to_vec()) };
    with(|h| {
        h.calls.push(Call::SetShared(key.clone()));
        // Envoy's rule: a missing key is written whatever `cas` says; an existing one only when
        // `cas` is 0 or its current version. Versions come from one counter.
        if let Some((_, version)) = h.shared.get(&key)
            && cas != 0
            && cas != *version
        {
            return Status::CasMismatch;
        }
        h.next_version += 1;
        let version = h.next_version;
        h.shared.insert(key, (value, version));
        Status::Ok
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_register_shared_queue(name: *const u8, name_size: usize, out_id: *mut u32) -> Status {
    let name = unsafe { text(name, name_size) };
    let id = with(|h| {
        h.calls.push(Call::RegisterQueue(name.clone()));
        let root = h.effective;
        h.queues.push((name, root, VecDeque::new()));
        h.queues.len() as u32
    });
    unsafe { *out_id = id };
    Status::Ok
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_resolve_shared_queue(
    _vm_id: *const u8,
    _vm_id_size: usize,
    name: *const u8,
    name_size: usize,
    out_id: *mut u32,
) -> Status {
    let name = unsafe { text(name, name_size) };
    let id = with(|h| {
        h.calls.push(Call::ResolveQueue(name.clone()));
        h.queues.iter().position(|(n, _, _)| *n == name)
    });
    match id {
        Some(index) => {
            unsafe { *out_id = index as u32 + 1 };
            Status::Ok
        }
        None => Status::NotFound,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_dequeue_shared_queue(queue: u32, out_data: *mut *mut u8, out_size: *mut usize) -> Status {
    let message = with(|h| {
        h.calls.push(Call::Dequeue(queue));
        h.queues.get_mut(queue as usize - 1).and_then(|(_, _, messages)| messages.pop_front())
    });
    match message {
        Some(m) => {
            unsafe { give(&m, out_data, out_size) };
            Status::Ok
        }
        None => Status::Empty,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_enqueue_shared_queue(queue: u32, data: *const u8, size: usize) -> Status {
    let message = unsafe { bytes(data, size).to_vec() };
    with(|h| {
        h.calls.push(Call::Enqueue(queue));
        match h.queues.get_mut(queue as usize - 1) {
            Some((_, _, messages)) => {
                messages.push_back(message);
                Status::Ok
            }
            None => Status::NotFound,
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_continue_stream(_stream: StreamType) -> Status {
    with(|h| {
        let context = h.effective;
        h.calls.push(Call::Continue(context));
    });
    Status::Ok
}

#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn proxy_send_local_response(
    status: u32,
    _details: *const u8,
    _details_size: usize,
    _body: *const u8,
    _body_size: usize,
    _headers: *const u8,
    _headers_size: usize,
    _grpc_status: i32,
) -> Status {
    with(|h| {
        let context = h.effective;
        h.calls.push(Call::LocalResponse { context, status });
    });
    Status::Ok
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_set_effective_context(context: u32) -> Status {
    with(|h| {
        h.calls.push(Call::SetEffective(context));
        h.effective = context;
    });
    Status::Ok
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_define_metric(
    _kind: MetricType,
    name: *const u8,
    name_size: usize,
    out_id: *mut u32,
) -> Status {
    let name = unsafe { text(name, name_size) };
    let id = with(|h| {
        h.calls.push(Call::DefineMetric(name));
        h.next_metric += 1;
        h.next_metric
    });
    unsafe { *out_id = id };
    Status::Ok
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_increment_metric(id: u32, offset: i64) -> Status {
    record(Call::IncrementMetric(id, offset));
    Status::Ok
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_record_metric(id: u32, value: u64) -> Status {
    record(Call::RecordMetric(id, value));
    Status::Ok
}

#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn proxy_http_call(
    upstream: *const u8,
    upstream_size: usize,
    _headers: *const u8,
    _headers_size: usize,
    body: *const u8,
    body_size: usize,
    _trailers: *const u8,
    _trailers_size: usize,
    _timeout: u32,
    out_token: *mut u32,
) -> Status {
    let cluster = unsafe { text(upstream, upstream_size) };
    let body = unsafe { bytes(body, body_size) }.to_vec();
    let token = with(|h| {
        h.next_token += 1;
        let (context, token) = (h.effective, h.next_token);
        h.callout_bodies.insert(token, body);
        h.calls.push(Call::Callout { context, cluster, token });
        token
    });
    unsafe { *out_token = token };
    Status::Ok
}

/// ABI functions the SDK declares and the filter never calls: defined so the test binary links,
/// recorded as `Unexpected` if called; their arguments are not read.
macro_rules! never_called {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub extern "C" fn $name() -> Status {
            record(Call::Unexpected(stringify!($name)));
            Status::InternalFailure
        }
    )*};
}

never_called!(
    proxy_add_header_map_value,
    proxy_call_foreign_function,
    proxy_close_stream,
    proxy_done,
    proxy_get_header_map_pairs,
    proxy_get_status,
    proxy_grpc_call,
    proxy_grpc_cancel,
    proxy_grpc_close,
    proxy_grpc_send,
    proxy_grpc_stream,
    proxy_remove_header_map_value,
    proxy_set_buffer_bytes,
    proxy_set_header_map_pairs,
    proxy_set_property
);

// ---- Envoy's side: what the tests drive ----

/// The SDK's exports (`proxy_on_*`), called as Envoy calls them.
mod sdk {
    use proxy_wasm::types::Action;

    unsafe extern "C" {
        pub safe fn proxy_on_context_create(context_id: u32, root_context_id: u32);
        pub safe fn proxy_on_vm_start(context_id: u32, vm_configuration_size: usize) -> bool;
        pub safe fn proxy_on_configure(context_id: u32, plugin_configuration_size: usize) -> bool;
        pub safe fn proxy_on_tick(context_id: u32);
        pub safe fn proxy_on_queue_ready(context_id: u32, queue_id: u32);
        pub safe fn proxy_on_request_headers(context_id: u32, num_headers: usize, end_of_stream: bool) -> Action;
        pub safe fn proxy_on_response_headers(context_id: u32, num_headers: usize, end_of_stream: bool) -> Action;
        pub safe fn proxy_on_http_call_response(
            context_id: u32,
            token_id: u32,
            num_headers: usize,
            body_size: usize,
            num_trailers: usize,
        );
        pub safe fn proxy_on_delete(context_id: u32);
    }
}

/// Every call recorded since the last [`take_calls`].
pub fn take_calls() -> Vec<Call> {
    with(|h| std::mem::take(&mut h.calls))
}

pub fn advance_ms(ms: u64) {
    with(|h| h.now_ns += ms * 1_000_000);
}

/// Envoy makes a context effective before it calls into the VM for it.
fn enter(context: u32) {
    with(|h| h.effective = context);
}

/// A root context with `configuration`, as Envoy starts a VM: create, start, configure.
pub fn start_root(root: u32, configuration: &str) -> bool {
    crate::_initialize();
    with(|h| h.plugin_configuration = configuration.as_bytes().to_vec());
    enter(root);
    sdk::proxy_on_context_create(root, 0);
    sdk::proxy_on_vm_start(root, 0);
    sdk::proxy_on_configure(root, configuration.len())
}

pub fn tick(root: u32) {
    enter(root);
    sdk::proxy_on_tick(root);
}

/// Answers callout `token` of `root` with `status` and `body`.
pub fn answer(root: u32, token: u32, status: &[u8], body: &[u8]) {
    with(|h| {
        h.call_headers = vec![(":status".into(), status.to_vec())];
        h.call_body = body.to_vec();
    });
    enter(root);
    sdk::proxy_on_http_call_response(root, token, 1, body.len(), 0);
}

/// Delivers every queued message, as Envoy calls `proxy_on_queue_ready` on the registering root.
pub fn deliver_queues() {
    let ready: Vec<(u32, u32)> = with(|h| {
        h.queues
            .iter()
            .enumerate()
            .filter(|(_, (_, _, messages))| !messages.is_empty())
            .map(|(index, (_, root, _))| (index as u32 + 1, *root))
            .collect()
    });
    for (queue, root) in ready {
        enter(root);
        sdk::proxy_on_queue_ready(root, queue);
    }
}

/// A new request on `context` (of `root`) with `headers`: its request-headers callback.
pub fn request(root: u32, context: u32, headers: &[(&str, &[u8])]) -> Action {
    with(|h| h.request_headers.insert(context, headers.iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect()));
    enter(context);
    sdk::proxy_on_context_create(context, root);
    enter(context);
    sdk::proxy_on_request_headers(context, headers.len(), false)
}

pub fn response(context: u32, status: &[u8]) -> Action {
    with(|h| h.response_headers.insert(context, vec![(":status".into(), status.to_vec())]));
    enter(context);
    sdk::proxy_on_response_headers(context, 1, false)
}

/// Sets a property `context`'s request will read (`path`: its parts, as the filter names them).
pub fn set_property(context: u32, path: &[&str], value: &[u8]) {
    with(|h| h.properties.entry(context).or_default().insert(path.join("\0"), value.to_vec()));
}

/// The body callout `token` was sent with.
pub fn callout_body(token: u32) -> Vec<u8> {
    with(|h| h.callout_bodies.get(&token).cloned().unwrap_or_default())
}

pub fn request_header(context: u32, name: &str) -> Option<Vec<u8>> {
    with(|h| lookup(h.request_headers.get(&context), name))
}

pub fn delete(context: u32) {
    enter(context);
    sdk::proxy_on_delete(context);
}
