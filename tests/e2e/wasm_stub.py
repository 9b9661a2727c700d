"""A tiny proxy-wasm module, assembled in Python, for the harness self-tests.

It lets ``test_harness.py`` exercise the Wasm filter block of the bootstrap
(field names, vm_config, failure_policy, the critical-log check, a refused
configuration) without depending on the real oauth2-cc build.

``stub_wasm(...)`` returns the bytes of a module that exports the proxy-wasm
ABI 0.2.1 entry points and imports only ``env.proxy_log``:

* ``configure_ok``    - what ``proxy_on_configure`` returns (False: Envoy refuses it);
* ``request_log``     - ``(level, message)`` logged on every request's headers
                        (proxy-wasm levels: 0 trace .. 4 error, 5 critical);
* ``trap_on_request`` - execute ``unreachable`` in ``proxy_on_request_headers``
                        (what a Rust panic ends in).
"""

from __future__ import annotations

I32 = 0x7F

LOG_TRACE, LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_CRITICAL = range(6)


def _uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _sleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        done = (n == 0 and not b & 0x40) or (n == -1 and b & 0x40)
        out.append(b if done else b | 0x80)
        if done:
            return bytes(out)


def _vec(items: list[bytes]) -> bytes:
    return _uleb(len(items)) + b"".join(items)


def _name(s: str) -> bytes:
    b = s.encode()
    return _uleb(len(b)) + b


def _section(sid: int, payload: bytes) -> bytes:
    return bytes([sid]) + _uleb(len(payload)) + payload


def _functype(params: int, results: int) -> bytes:
    return b"\x60" + _vec([bytes([I32])] * params) + _vec([bytes([I32])] * results)


def _i32_const(v: int) -> bytes:
    return b"\x41" + _sleb(v)


def stub_wasm(
    *,
    configure_ok: bool = True,
    request_log: tuple[int, str] | None = None,
    trap_on_request: bool = False,
) -> bytes:
    # types
    types = [
        _functype(0, 0),  # 0: () -> ()
        _functype(1, 1),  # 1: (i32) -> i32
        _functype(2, 0),  # 2: (i32, i32) -> ()
        _functype(2, 1),  # 3: (i32, i32) -> i32
        _functype(3, 1),  # 4: (i32, i32, i32) -> i32
    ]
    imports = [_name("env") + _name("proxy_log") + b"\x00" + _uleb(4)]  # func 0
    n_imports = 1

    msg_off = 1024
    msg = (request_log[1] if request_log else "").encode()

    def body(code: bytes) -> bytes:
        b = _vec([]) + code + b"\x0b"  # no locals
        return _uleb(len(b)) + b

    on_request = b""
    if request_log:
        on_request += (
            _i32_const(request_log[0]) + _i32_const(msg_off) + _i32_const(len(msg)) + b"\x10" + _uleb(0) + b"\x1a"
        )
    on_request += b"\x00" if trap_on_request else _i32_const(0)  # unreachable | Continue

    funcs = [  # (name, type index, code)
        ("proxy_abi_version_0_2_1", 0, b""),
        ("proxy_on_memory_allocate", 1, _i32_const(4096)),
        ("proxy_on_context_create", 2, b""),
        ("proxy_on_vm_start", 3, _i32_const(1)),
        ("proxy_on_configure", 3, _i32_const(1 if configure_ok else 0)),
        ("proxy_on_request_headers", 4, on_request),
        ("proxy_on_done", 1, _i32_const(1)),
    ]
    exports = [_name("memory") + b"\x02" + _uleb(0)]
    for i, (name, _, _) in enumerate(funcs):
        exports.append(_name(name) + b"\x00" + _uleb(n_imports + i))

    module = b"\x00asm\x01\x00\x00\x00"
    module += _section(1, _vec(types))
    module += _section(2, _vec(imports))
    module += _section(3, _vec([_uleb(t) for _, t, _ in funcs]))
    module += _section(5, _vec([b"\x00" + _uleb(1)]))  # memory 0: min 1 page
    module += _section(7, _vec(exports))
    module += _section(10, _vec([body(c) for _, _, c in funcs]))
    if msg:
        seg = b"\x00" + _i32_const(msg_off) + b"\x0b" + _uleb(len(msg)) + msg
        module += _section(11, _vec([seg]))
    return module


def write_stub(path, **kw) -> str:
    with open(path, "wb") as f:
        f.write(stub_wasm(**kw))
    return str(path)
