#!/usr/bin/env python3
"""Drop named exports from a wasm module (standard library only).

    python3 tools/strip_exports.py IN.wasm OUT.wasm proxy_on_log proxy_on_done ...

Why: Envoy (proxy-wasm-cpp-host) calls a stream callback only when the module exports it, and
each call is a crossing into V8 that costs about as much as a header write (docs/architecture.md, decisions).
The proxy-wasm Rust SDK exports every callback of the ABI; the filter needs few of them. Run
wasm-opt afterwards: it removes the functions no export reaches any more.

Fails (exit 1) when a named export is missing, so an SDK upgrade that renames one is noticed.
"""

from __future__ import annotations

import sys

EXPORT_SECTION = 7


def read_leb_u32(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated LEB128")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise ValueError("LEB128 too long for u32")


def write_leb_u32(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def export_names(module: bytes) -> list[str]:
    """The names a module exports, in order."""
    names: list[str] = []
    pos = 8
    while pos < len(module):
        size, body_start = read_leb_u32(module, pos + 1)
        if module[pos] == EXPORT_SECTION:
            body = module[body_start:body_start + size]
            count, p = read_leb_u32(body, 0)
            for _ in range(count):
                name_len, p = read_leb_u32(body, p)
                names.append(body[p:p + name_len].decode("utf-8"))
                _, p = read_leb_u32(body, p + name_len + 1)
        pos = body_start + size
    return names


def strip_exports(module: bytes, names: set[str]) -> tuple[bytes, set[str]]:
    """The module without the exports in ``names``, and the names that were removed."""
    if module[:4] != b"\0asm":
        raise ValueError("not a wasm module")
    out = bytearray(module[:8])
    pos, removed = 8, set()
    while pos < len(module):
        section_id = module[pos]
        size, body_start = read_leb_u32(module, pos + 1)
        body_end = body_start + size
        body = module[body_start:body_end]
        if section_id == EXPORT_SECTION:
            count, p = read_leb_u32(body, 0)
            kept: list[bytes] = []
            for _ in range(count):
                start = p
                name_len, p = read_leb_u32(body, p)
                name = body[p:p + name_len].decode("utf-8")
                p += name_len + 1  # the kind byte
                _, p = read_leb_u32(body, p)  # the index
                if name in names:
                    removed.add(name)
                else:
                    kept.append(body[start:p])
            body = write_leb_u32(len(kept)) + b"".join(kept)
        out.append(section_id)
        out += write_leb_u32(len(body))
        out += body
        pos = body_end
    return bytes(out), removed


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst, names = argv[0], argv[1], set(argv[2:])
    with open(src, "rb") as f:
        module = f.read()
    stripped, removed = strip_exports(module, names)
    missing = names - removed
    if missing:
        print(f"strip_exports: {src} does not export {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    with open(dst, "wb") as f:
        f.write(stripped)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
