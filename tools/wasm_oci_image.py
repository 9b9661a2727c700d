#!/usr/bin/env python3
"""Package a proxy-wasm module as an OCI image layout that Istio's WasmPlugin and Envoy Gateway pull.

    python3 tools/wasm_oci_image.py build/oauth2_cc.wasm dist/oauth2-cc-oci --version 0.1.0

The image is the "compat" variant of the Wasm image specification, the format both fetchers try
first: an ordinary OCI image whose one layer (application/vnd.oci.image.layer.v1.tar+gzip) is a tar
holding a single file, plugin.wasm, and whose manifest carries the annotation
module.wasm.image/variant=compat. Istio (pkg/wasm/imagefetcher.go) and Envoy Gateway
(internal/wasm/imagefetcher.go) take the last layer of that media type and read the tar entry whose
base name is plugin.wasm. Both compare a WasmPlugin's `sha256` / an EnvoyExtensionPolicy's
`image.sha256` with the digest of the image manifest, which this script prints and writes to
`<layout>.digest`.

No Docker engine is involved: the script writes the layout itself (oci-layout, index.json,
blobs/sha256/...). The output is reproducible: the tar entry and the gzip header carry a fixed time
(SOURCE_DATE_EPOCH, else 0), owner 0:0 and mode 0644, and every JSON document is written with sorted
keys, so the same wasm and version always give the same manifest digest. index.json names the
manifest with org.opencontainers.image.ref.name=<version>, so `oci:<layout>:<version>` finds it.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
PLUGIN_FILE = "plugin.wasm"
WASM_MAGIC = b"\0asm"


def canonical_json(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def layer_tar(wasm: bytes, mtime: int) -> bytes:
    """An uncompressed tar with one regular file, plugin.wasm, owned by 0:0, mode 0644."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(PLUGIN_FILE)
        info.size = len(wasm)
        info.mtime = mtime
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    return buf.getvalue()


def gzip_fixed(data: bytes) -> bytes:
    """gzip with no file name and a zero time in its header, so equal input gives equal bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def descriptor(media_type: str, data: bytes, annotations: dict | None = None) -> dict:
    d = {"mediaType": media_type, "digest": "sha256:" + sha256_hex(data), "size": len(data)}
    if annotations:
        d["annotations"] = annotations
    return d


def build_layout(wasm: bytes, out: Path, version: str, epoch: int, source: str | None) -> str:
    """Write the layout to `out` (replacing it) and return the manifest digest (sha256:<hex>)."""
    if not wasm.startswith(WASM_MAGIC):
        raise ValueError("not a WebAssembly module (no \\0asm magic)")
    tar = layer_tar(wasm, epoch)
    layer = gzip_fixed(tar)
    created = rfc3339(epoch)
    labels = {
        "org.opencontainers.image.title": "oauth2-cc",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.description":
            "Envoy proxy-wasm filter: OAuth 2.0 client-credentials tokens for upstream calls",
    }
    if source:
        labels["org.opencontainers.image.source"] = source
    # A wasm module runs on any CPU: the platform is the one the module was built for
    # (wasm32-wasip1), as the Wasm OCI artifact guidance writes it.
    config = canonical_json({
        "architecture": "wasm",
        "os": "wasip1",
        "created": created,
        "config": {"Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256_hex(tar)]},
        "history": [{"created": created, "created_by": "tools/wasm_oci_image.py: " + PLUGIN_FILE}],
    })
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": descriptor(CONFIG_TYPE, config),
        "layers": [descriptor(LAYER_TYPE, layer, {"org.opencontainers.image.title": PLUGIN_FILE})],
        "annotations": {"module.wasm.image/variant": "compat", "org.opencontainers.image.created": created,
                        **labels},
    })
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [descriptor(MANIFEST_TYPE, manifest, {"org.opencontainers.image.ref.name": version})],
    })

    if out.exists():
        shutil.rmtree(out)
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in (layer, config, manifest):
        (blobs / sha256_hex(blob)).write_bytes(blob)
    (out / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    (out / "index.json").write_bytes(index)
    return "sha256:" + sha256_hex(manifest)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wasm", type=Path, help="the module (becomes plugin.wasm in the layer)")
    ap.add_argument("out", type=Path, help="the OCI image layout directory to write (replaced)")
    ap.add_argument("--version", required=True, help="the tag: index.json's ref name and the version label")
    ap.add_argument("--source", help="org.opencontainers.image.source (the repository URL), if known")
    args = ap.parse_args(argv)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    try:
        digest = build_layout(args.wasm.read_bytes(), args.out, args.version, epoch, args.source)
    except (OSError, ValueError) as e:
        print(f"wasm_oci_image: {e}", file=sys.stderr)
        return 1
    Path(str(args.out) + ".digest").write_text(digest + "\n")
    print(f"{args.out}: {digest} (tag {args.version})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
