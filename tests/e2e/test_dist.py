"""Release files: the wasm as an OCI image layout that Istio and Envoy Gateway pull, and the release
workflow. `make dist` runs the same checks on dist/ (tools/dist.py); these run on a layout built from
build/oauth2_cc.wasm into a temporary directory, so `make test` needs no release tools: skopeo and
Distribution's registry are used when they are installed (`make dist-tools` installs them), the
format rules and reproducibility are checked always.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import check_wasm_file
from envoy import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))
import oci_check  # noqa: E402
import wasm_oci_image  # noqa: E402

VERSION = "0.1.0-test"
REGISTRY_CANDIDATES = [REPO_ROOT / "build" / "tools" / "registry"]


def registry_bin() -> str | None:
    for path in REGISTRY_CANDIDATES:
        if path.is_file():
            return str(path)
    return shutil.which("docker-registry") or shutil.which("registry")


needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed (make dist-tools)")


@pytest.fixture(scope="module")
def wasm() -> bytes:
    return Path(check_wasm_file()).read_bytes()


@pytest.fixture
def layout(tmp_path, wasm) -> tuple[Path, str]:
    out = tmp_path / "oauth2-cc-oci"
    return out, wasm_oci_image.build_layout(wasm, out, VERSION, 1700000000, None)


def test_layout_is_the_image_istio_and_envoy_gateway_read(layout, wasm):
    out, digest = layout
    read_digest, plugin = oci_check.read_as_wasm_fetcher(out, VERSION)
    manifest = json.loads((out / "blobs" / "sha256" / digest.split(":")[1]).read_bytes())
    print(f"digest {digest}; layer {manifest['layers'][0]['size']} B for a {len(wasm)} B module")
    assert read_digest == digest
    assert plugin == wasm
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    assert manifest["annotations"]["org.opencontainers.image.version"] == VERSION


def test_layout_is_reproducible(tmp_path, wasm):
    """Same module and version: the same bytes, so the same digest to pin; anything else: another."""
    first = wasm_oci_image.build_layout(wasm, tmp_path / "a", VERSION, 1700000000, None)
    second = wasm_oci_image.build_layout(wasm, tmp_path / "b", VERSION, 1700000000, None)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert first == second
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files), files
    changed = wasm[:-1] + bytes([wasm[-1] ^ 1])
    others = {
        "module": wasm_oci_image.build_layout(changed, tmp_path / "c", VERSION, 1700000000, None),
        "version": wasm_oci_image.build_layout(wasm, tmp_path / "d", "0.1.1", 1700000000, None),
    }
    print(f"digest {first}; other module / version: {others}")
    assert first not in others.values()


def test_reader_refuses_what_the_fetchers_would_not_read(tmp_path, wasm):
    """The check has teeth: a corrupt blob, a second layer, a Docker layer type, another file name."""
    def fresh(name):
        out = tmp_path / name
        digest = wasm_oci_image.build_layout(wasm, out, VERSION, 0, None)
        return out, out / "blobs" / "sha256" / digest.split(":")[1]

    def rewrite_manifest(out, manifest_path, edit):
        manifest = json.loads(manifest_path.read_bytes())
        edit(manifest)
        data = wasm_oci_image.canonical_json(manifest)
        (out / "blobs" / "sha256" / wasm_oci_image.sha256_hex(data)).write_bytes(data)
        index = json.loads((out / "index.json").read_text())
        index["manifests"][0].update(digest="sha256:" + wasm_oci_image.sha256_hex(data), size=len(data))
        (out / "index.json").write_text(json.dumps(index))

    out, manifest_path = fresh("corrupt")
    layer = json.loads(manifest_path.read_bytes())["layers"][0]["digest"].split(":")[1]
    blob = out / "blobs" / "sha256" / layer
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(oci_check.LayoutError, match="does not match its digest"):
        oci_check.read_as_wasm_fetcher(out, VERSION)

    out, manifest_path = fresh("two-layers")
    rewrite_manifest(out, manifest_path, lambda m: m["layers"].append(m["layers"][0]))
    with pytest.raises(oci_check.LayoutError, match="2 layers"):
        oci_check.read_as_wasm_fetcher(out, VERSION)

    out, manifest_path = fresh("docker-layer")
    rewrite_manifest(out, manifest_path, lambda m: m["layers"][0].update(
        mediaType="application/vnd.docker.image.rootfs.diff.tar.gzip"))
    with pytest.raises(oci_check.LayoutError, match="layer media type"):
        oci_check.read_as_wasm_fetcher(out, VERSION)

    out, manifest_path = fresh("renamed")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("filter.wasm")
        info.size = len(wasm)
        tar.addfile(info, io.BytesIO(wasm))
    renamed = gzip.compress(buf.getvalue())
    (out / "blobs" / "sha256" / wasm_oci_image.sha256_hex(renamed)).write_bytes(renamed)
    rewrite_manifest(out, manifest_path, lambda m: m["layers"][0].update(
        digest="sha256:" + wasm_oci_image.sha256_hex(renamed), size=len(renamed)))
    with pytest.raises(oci_check.LayoutError, match="diff_ids|expected only plugin.wasm"):
        oci_check.read_as_wasm_fetcher(out, VERSION)

    with pytest.raises(oci_check.LayoutError, match="manifests tagged"):
        oci_check.read_as_wasm_fetcher(fresh("untagged")[0], "9.9.9")


@needs_skopeo
def test_skopeo_inspects_and_copies_the_layout(layout, wasm, tmp_path):
    out, digest = layout
    inspected = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{out}:{VERSION}"], capture_output=True,
                                          text=True, check=True, timeout=60).stdout)
    print(f"skopeo inspect: {json.dumps({k: inspected[k] for k in ('Digest', 'Architecture', 'Os', 'Layers')})}")
    assert inspected["Digest"] == digest
    assert len(inspected["Layers"]) == 1
    _, copied = oci_check.skopeo_copy_to_dir(f"oci:{out}:{VERSION}", tmp_path / "copied")
    assert oci_check.wasm_from_skopeo_dir(copied) == wasm


@needs_skopeo
@pytest.mark.skipif(registry_bin() is None, reason="Distribution's registry not installed (make dist-tools)")
def test_registry_push_and_pull_keep_the_digest(layout, wasm, tmp_path):
    """What a user does: `skopeo copy oci:... docker://REGISTRY/...`; the digest they pin is the
    one the layout says, and the pulled layer holds the same module."""
    out, digest = layout
    pushed, pulled = oci_check.registry_round_trip(out, VERSION, registry_bin(), tmp_path)
    print(f"pushed {digest}, registry reports {pushed}")
    assert pushed == digest
    assert pulled == wasm


def crate_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO_ROOT / "Cargo.toml").read_text(), re.M).group(1)


def test_manifests_and_docs_name_the_image_make_dist_writes():
    """The shipped manifests pull oauth2-cc:<crate version>, and the docs say how to put the
    layout `make dist` writes there."""
    version = crate_version()
    istio = next(d for d in yaml.safe_load_all((REPO_ROOT / "deploy/istio/wasmplugin.yaml").read_text())
                 if d and d["kind"] == "WasmPlugin")
    assert istio["spec"]["url"].endswith(f"/oauth2-cc:{version}"), istio["spec"]["url"]
    push = f"skopeo copy oci:dist/oauth2-cc-oci:{version} docker://"
    for doc in ("README.md", "docs/deploy.md", "deploy/istio/wasmplugin.yaml"):
        assert push in (REPO_ROOT / doc).read_text(), f"{doc} does not say `{push}...`"


def test_release_workflow_builds_checks_and_attaches_dist():
    path = REPO_ROOT / ".github" / "workflows" / "release.yml"
    wf = yaml.safe_load(path.read_text())
    on = wf.get("on", wf.get(True))  # PyYAML reads the bare key `on` as True
    assert on["push"]["tags"] == ["v*"], on
    (job,) = wf["jobs"].values()
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert "make dist" in runs
    assert "tools/dist.py version" in runs, "the tag must be checked against the crate version"
    assert "find dist -maxdepth 1 -type f" in runs, "every file of dist/ is attached"
    assert job["permissions"]["contents"] == "write"
    checker = REPO_ROOT / ".venv" / "bin" / "check-jsonschema"
    if checker.exists():
        out = subprocess.run([str(checker), "--builtin-schema", "vendor.github-workflows", str(path)],
                             capture_output=True, text=True, timeout=120)
        print(out.stdout.strip())
        assert out.returncode == 0, out.stdout + out.stderr
