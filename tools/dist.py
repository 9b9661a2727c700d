#!/usr/bin/env python3
"""Release files: `make dist` runs `dist.py build`, `make dist-check` runs `dist.py check`.

    python3 tools/dist.py version                 # the crate version (every workspace package's)
    python3 tools/dist.py build  --out dist --wasm build/oauth2_cc.wasm --native build/liboauth2_cc.so \
                                 [--wasm-lib oauth2_cc] [--native-lib oauth2_cc]
    python3 tools/dist.py check  --out dist [--registry PATH] [--workflow-schema-check PATH]

`build` writes, into a fresh `--out`: both modules; a CycloneDX SBOM per module (`cargo cyclonedx`
for the module's target); THIRD-PARTY-LICENSES.md (`cargo about`, tools/about.toml); the wasm as
an OCI image layout (tools/wasm_oci_image.py) and the same layout as an oci-archive tar; LICENSE;
SHA256SUMS. Then it runs `check`, which reads everything back: the sums with `sha256sum -c`, the
layout the way Istio's and Envoy Gateway's fetchers read it, skopeo on the layout and the archive,
a push and pull through Distribution's registry when `--registry` names its binary, the SBOMs'
targets and licenses, and the release workflow against the GitHub workflow schema when
`--workflow-schema-check` names check-jsonschema. Every tool is run by its name on PATH, and the
Makefile installs what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oci_check  # noqa: E402
import wasm_oci_image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OCI_NAME = "oauth2-cc-oci"
LICENSE_ID = "Apache-2.0"
WORKFLOW = REPO / ".github" / "workflows" / "release.yml"
# (module file in dist/, the Rust target it is built for, a crate only that build links)
MODULES = [
    ("oauth2_cc.wasm", "wasm32-wasip1", "proxy-wasm"),
    ("liboauth2_cc.so", "x86_64-unknown-linux-gnu", None),
]


class DistError(Exception):
    pass


def run(argv: list[str], cwd: Path = REPO, env: dict | None = None, timeout: float = 1800) -> str:
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise DistError(f"{' '.join(argv)}: exit {out.returncode}\n{out.stdout[-4000:]}{out.stderr[-4000:]}")
    return out.stdout


def version() -> str:
    """The version every workspace package carries; packages that disagree are an error."""
    meta = json.loads(run(["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"]))
    versions = {p["name"]: p["version"] for p in meta["packages"]}
    if len(set(versions.values())) != 1:
        raise DistError(f"workspace packages carry different versions: {versions}")
    return next(iter(versions.values()))


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH, else the time of the commit checked out (reproducible for a commit)."""
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        return int(run(["git", "log", "-1", "--format=%ct"]).strip())
    except (DistError, ValueError, OSError):
        return 0


def package_dir(lib: str) -> Path:
    """The directory (relative to the workspace) of the package whose cdylib target is `lib`."""
    meta = json.loads(run(["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"]))
    dirs = [Path(p["manifest_path"]).parent.relative_to(REPO) for p in meta["packages"]
            for t in p["targets"] if t["name"] == lib and "cdylib" in t["kind"]]
    if len(dirs) != 1:
        raise DistError(f"{len(dirs)} workspace packages build the cdylib {lib!r}, expected 1")
    return dirs[0]


def sbom(module: str, lib: str, target: str, out: Path, epoch: int) -> Path:
    """`cargo cyclonedx` for the module's target, the SBOM of the package that builds it, written
    to out/<module>.cdx.json."""
    name = f"{module}.cdx"
    with tempfile.TemporaryDirectory() as tmp:
        # cargo-cyclonedx writes next to each package's Cargo.toml: run it on a copy of the
        # manifests and sources so the checkout stays clean.
        work = Path(tmp) / "src"
        shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(
            "target", ".venv", "build", "dist", ".git", "fuzz", "bench", "node_modules", "__pycache__"))
        run(["cargo", "cyclonedx", "--format", "json", "--spec-version", "1.5", "--target", target,
             "--no-build-deps", "--override-filename", name, "--quiet"],
            cwd=work, env={"SOURCE_DATE_EPOCH": str(epoch)})
        written = work / package_dir(lib) / f"{name}.json"
        if not written.is_file():
            raise DistError(f"cargo cyclonedx wrote no {written.relative_to(work)}")
        # The tool names our own packages by their absolute path (here a temporary directory):
        # write it as the workspace root, `.`, as the purls already do, so the SBOM is the same
        # on every machine.
        text = written.read_text().replace(f"file://{work}", "file://.")
        dest = out / f"{name}.json"
        dest.write_text(json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n")
        return dest


def third_party_licenses(out: Path) -> Path:
    dest = out / "THIRD-PARTY-LICENSES.md"
    # --frozen: Cargo.lock as committed, and only the license files the crates ship (no network).
    run(["cargo", "about", "generate", "--workspace", "--fail", "--frozen", "--config", "tools/about.toml", "--output-file",
         str(dest), "tools/about.hbs"])
    return dest


def oci_archive(layout: Path, dest: Path, epoch: int) -> None:
    """The layout as one tar (skopeo's oci-archive: transport): entries sorted, fixed owner and time."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in layout.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(layout)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = epoch
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def sha256sums(out: Path) -> Path:
    lines = []
    for path in sorted(p for p in out.iterdir() if p.is_file() and p.name != "SHA256SUMS"):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    dest = out / "SHA256SUMS"
    dest.write_text("".join(lines))
    return dest


def build(args: argparse.Namespace) -> None:
    out: Path = args.out
    ver = version()
    epoch = source_date_epoch()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(args.wasm, out / "oauth2_cc.wasm")
    shutil.copyfile(args.native, out / "liboauth2_cc.so")
    shutil.copyfile(REPO / "LICENSE", out / "LICENSE")
    for (module, target, _), lib in zip(MODULES, (args.wasm_lib, args.native_lib)):
        sbom(module, lib, target, out, epoch)
    third_party_licenses(out)
    layout = out / OCI_NAME
    digest = wasm_oci_image.build_layout((out / "oauth2_cc.wasm").read_bytes(), layout, ver, epoch, args.source)
    (out / f"{OCI_NAME}.digest").write_text(digest + "\n")
    oci_archive(layout, out / f"{OCI_NAME}.tar", epoch)
    sha256sums(out)
    check(args)


def check_sboms(out: Path, ver: str) -> list[str]:
    notes = []
    linked_by_one = {only for _, _, only in MODULES if only}
    for module, target, only in MODULES:
        bom = json.loads((out / f"{module}.cdx.json").read_text())
        if bom.get("bomFormat") != "CycloneDX":
            raise DistError(f"{module}.cdx.json is not a CycloneDX document")
        props = {p["name"]: p["value"] for p in bom["metadata"].get("properties", [])}
        if props.get("cdx:rustc:sbom:target:triple") != target:
            raise DistError(f"{module}.cdx.json is for {props.get('cdx:rustc:sbom:target:triple')}, not {target}")
        root = bom["metadata"]["component"]
        if root.get("version") != ver:
            raise DistError(f"{module}.cdx.json describes version {root.get('version')}, not {ver}")
        licenses = [lic.get("expression") or lic.get("license", {}).get("id") for lic in root.get("licenses", [])]
        if licenses != [LICENSE_ID]:
            raise DistError(f"{module}.cdx.json: the package's license is {licenses or 'missing'}, expected "
                            f"[{LICENSE_ID!r}]: Cargo.toml needs license = \"{LICENSE_ID}\"")
        names = {c["name"] for c in bom.get("components", [])}
        unlicensed = sorted(c["name"] for c in bom.get("components", []) if not c.get("licenses"))
        if unlicensed:
            raise DistError(f"{module}.cdx.json: components without a license: {unlicensed}")
        for crate in linked_by_one:
            if (crate in names) != (crate == only):
                raise DistError(f"{module}.cdx.json {'lacks' if crate == only else 'lists'} {crate}: wrong target?")
        notes.append(f"{module}.cdx.json: {len(names)} crates for {target}")
    return notes


def check(args: argparse.Namespace) -> None:
    out: Path = args.out
    ver = version()
    layout = out / OCI_NAME
    wasm = (out / "oauth2_cc.wasm").read_bytes()
    notes = []

    run(["sha256sum", "--check", "--quiet", "--strict", "SHA256SUMS"], cwd=out)
    listed = {line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()}
    unlisted = sorted(p.name for p in out.iterdir() if p.is_file() and p.name not in listed | {"SHA256SUMS"})
    if unlisted:
        raise DistError(f"files not in SHA256SUMS: {unlisted}")
    notes.append(f"SHA256SUMS: {len(listed)} files verified")

    digest = (out / f"{OCI_NAME}.digest").read_text().strip()
    read_digest, plugin = oci_check.read_as_wasm_fetcher(layout, ver)
    if read_digest != digest or plugin != wasm:
        raise DistError(f"layout: digest {read_digest} (file says {digest}), plugin.wasm equal: {plugin == wasm}")
    notes.append(f"layout read as Istio/Envoy Gateway do: {digest}, plugin.wasm = oauth2_cc.wasm")

    for ref in (f"oci:{layout}:{ver}", f"oci-archive:{out / (OCI_NAME + '.tar')}:{ver}"):
        got = oci_check.skopeo_inspect_digest(ref)
        if got != digest:
            raise DistError(f"skopeo inspect {ref}: {got}, expected {digest}")
        notes.append(f"skopeo inspect {ref.split(':')[0]}: {got}")
    with tempfile.TemporaryDirectory() as tmp:
        _, copied = oci_check.skopeo_copy_to_dir(f"oci:{layout}:{ver}", Path(tmp) / "dir")
        if oci_check.wasm_from_skopeo_dir(copied) != wasm:
            raise DistError("skopeo copy oci: -> dir: gives another plugin.wasm")
        notes.append("skopeo copy oci: -> dir:: plugin.wasm = oauth2_cc.wasm")
        if args.registry:
            pushed, pulled = oci_check.registry_round_trip(layout, ver, args.registry, Path(tmp))
            if pushed != digest or pulled != wasm:
                raise DistError(f"registry round trip: digest {pushed} (expected {digest}), "
                                f"plugin.wasm equal: {pulled == wasm}")
            notes.append(f"registry push and pull (skopeo, Distribution): {pushed}, plugin.wasm unchanged")

    notes += check_sboms(out, ver)
    licenses = (out / "THIRD-PARTY-LICENSES.md").read_text()
    for crate in ("serde_json", "rsa", "proxy-wasm"):
        if f"- {crate} " not in licenses:
            raise DistError(f"THIRD-PARTY-LICENSES.md does not list {crate}")
    if args.workflow_schema_check:
        run([args.workflow_schema_check, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)])
        notes.append(f"{WORKFLOW.relative_to(REPO)}: valid against the GitHub workflow schema")

    for note in notes:
        print(f"  ok  {note}")
    for path in sorted(p for p in out.iterdir() if p.is_file()):
        print(f"  {path.stat().st_size:>10,} B  {out.name}/{path.name}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version")
    for name in ("build", "check"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=REPO / "dist")
        p.add_argument("--registry", help="Distribution's registry binary, for a push and pull round trip")
        p.add_argument("--workflow-schema-check", help="check-jsonschema, to check the release workflow")
        if name == "build":
            p.add_argument("--wasm", type=Path, required=True)
            p.add_argument("--native", type=Path, required=True)
            p.add_argument("--wasm-lib", default="oauth2_cc", help="the cdylib target that builds the wasm")
            p.add_argument("--native-lib", default="oauth2_cc", help="the cdylib target that builds the .so")
            p.add_argument("--source", help="the repository URL, for the image's org.opencontainers.image.source")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "version":
            print(version())
        elif args.cmd == "build":
            build(args)
        else:
            check(args)
    except (DistError, oci_check.LayoutError, OSError, subprocess.TimeoutExpired) as e:
        print(f"dist: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
