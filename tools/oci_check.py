"""Checks of the wasm OCI image layout that tools/wasm_oci_image.py writes, shared by `make dist`
(tools/dist.py) and tests/e2e/test_dist.py.

* `read_as_wasm_fetcher`: the layout read the way Istio's and Envoy Gateway's image fetchers read a
  pulled image (pkg/wasm/imagefetcher.go, internal/wasm/imagefetcher.go): an OCI manifest whose last
  layer is application/vnd.oci.image.layer.v1.tar+gzip, a gzip tar in which the entry whose base
  name is plugin.wasm is the module. Every blob is checked against its digest and size first.
* `skopeo_inspect_digest`, `skopeo_copy_to_dir`: the same layout through skopeo, a real OCI tool.
* `Registry`: Distribution's registry on a free loopback port, for a push and pull round trip.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
PLUGIN_FILE = "plugin.wasm"
REF_NAME = "org.opencontainers.image.ref.name"


class LayoutError(Exception):
    """The layout breaks the OCI layout rules or the Wasm image format the fetchers read."""


def _blob(layout: Path, desc: dict) -> bytes:
    algo, _, hexdigest = desc["digest"].partition(":")
    if algo != "sha256":
        raise LayoutError(f"digest algorithm {algo!r}, expected sha256")
    data = (layout / "blobs" / "sha256" / hexdigest).read_bytes()
    if hashlib.sha256(data).hexdigest() != hexdigest:
        raise LayoutError(f"blob {hexdigest} does not match its digest")
    if len(data) != desc["size"]:
        raise LayoutError(f"blob {hexdigest}: {len(data)} bytes, descriptor says {desc['size']}")
    return data


def manifest_descriptor(layout: Path, version: str) -> dict:
    """index.json's entry tagged `version` (the one `oci:<layout>:<version>` names)."""
    if json.loads((layout / "oci-layout").read_text()).get("imageLayoutVersion") != "1.0.0":
        raise LayoutError("oci-layout: imageLayoutVersion is not 1.0.0")
    index = json.loads((layout / "index.json").read_text())
    tagged = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) == version]
    if len(tagged) != 1:
        raise LayoutError(f"index.json: {len(tagged)} manifests tagged {version!r}, expected 1")
    return tagged[0]


def read_as_wasm_fetcher(layout: Path, version: str) -> tuple[str, bytes]:
    """(manifest digest, plugin.wasm bytes) as Istio and Envoy Gateway would get them."""
    desc = manifest_descriptor(layout, version)
    if desc.get("mediaType") != MANIFEST_TYPE:
        raise LayoutError(f"manifest media type {desc.get('mediaType')!r}, expected {MANIFEST_TYPE}")
    manifest = json.loads(_blob(layout, desc))
    if manifest.get("annotations", {}).get("module.wasm.image/variant") != "compat":
        raise LayoutError("manifest lacks the annotation module.wasm.image/variant=compat")
    layers = manifest.get("layers", [])
    if len(layers) != 1:
        raise LayoutError(f"{len(layers)} layers; the compat variant has exactly one")
    config = json.loads(_blob(layout, manifest["config"]))
    if layers[-1].get("mediaType") != LAYER_TYPE:
        raise LayoutError(f"layer media type {layers[-1].get('mediaType')!r}, expected {LAYER_TYPE}")
    tar_bytes = gzip.decompress(_blob(layout, layers[-1]))
    if config.get("rootfs", {}).get("diff_ids") != ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]:
        raise LayoutError("config rootfs.diff_ids is not the digest of the uncompressed layer")
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        if names != [PLUGIN_FILE]:
            raise LayoutError(f"layer entries {names}, expected only {PLUGIN_FILE}")
        extracted = tar.extractfile(members[0])
        if extracted is None:
            raise LayoutError(f"{PLUGIN_FILE} is not a regular file")
        wasm = extracted.read()
    return desc["digest"], wasm


def _run(argv: list[str], timeout: float = 120) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise LayoutError(f"{' '.join(argv)}: exit {out.returncode}\n{out.stdout}{out.stderr}")
    return out.stdout


def skopeo_inspect_digest(ref: str, *extra: str) -> str:
    """`skopeo inspect` of any transport reference; returns the manifest digest skopeo reports."""
    return json.loads(_run(["skopeo", "inspect", *extra, ref]))["Digest"]


def skopeo_copy_to_dir(src: str, dest: Path, *extra: str) -> tuple[dict, Path]:
    """`skopeo copy SRC dir:DEST`; returns the copied manifest and the directory of its blobs."""
    if dest.exists():
        shutil.rmtree(dest)
    _run(["skopeo", "copy", "--quiet", *extra, src, f"dir:{dest}"])
    return json.loads((dest / "manifest.json").read_text()), dest


def wasm_from_skopeo_dir(directory: Path) -> bytes:
    """plugin.wasm from the layer of a `skopeo copy ... dir:` copy (skopeo names blobs by hex digest)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    layer = manifest["layers"][-1]
    if layer["mediaType"] != LAYER_TYPE:
        raise LayoutError(f"copied layer media type {layer['mediaType']!r}")
    data = (directory / layer["digest"].split(":", 1)[1]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        member = tar.extractfile(PLUGIN_FILE)
        if member is None:
            raise LayoutError(f"no {PLUGIN_FILE} in the copied layer")
        return member.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """Distribution's registry (`registry serve`) on a free 127.0.0.1 port, storage in `root`.

    Use as a context manager; it is stopped by its own PID. `host` is `127.0.0.1:<port>` (plain
    HTTP: pass --dest-tls-verify=false / --src-tls-verify=false / --tls-verify=false to skopeo).
    """

    def __init__(self, binary: str, root: Path):
        self.binary = binary
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "registry.log"

    def __enter__(self) -> "Registry":
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\nlog: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.root / 'data'}}}}}\n"
            f"http: {{addr: '{self.host}', secret: oauth2-cc-dist-check}}\n"
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([self.binary, "serve", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LayoutError(f"registry exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise LayoutError(f"registry not ready on {self.host} within 20 s:\n{self.log.read_text()}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def registry_round_trip(layout: Path, version: str, registry_bin: str, work: Path) -> tuple[str, bytes]:
    """Push `oci:<layout>:<version>` to a fresh local registry with skopeo and pull it back.

    Returns (the digest the registry reports, plugin.wasm from the pulled layer).
    """
    with Registry(registry_bin, work / "registry") as reg:
        ref = f"docker://{reg.host}/oauth2-cc:{version}"
        _run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{version}", ref])
        digest = skopeo_inspect_digest(ref, "--tls-verify=false")
        _, pulled = skopeo_copy_to_dir(ref, work / "pulled", "--src-tls-verify=false")
        return digest, wasm_from_skopeo_dir(pulled)
