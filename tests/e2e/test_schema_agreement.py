"""The JSON Schema and the filter agree on every configuration: each one the repository holds and
each one generated from them, field by field.

Every configuration goes through schema/oauth2-cc.schema.json (jsonschema, draft 2020-12) and
through the filter's own parser (`oauth2-cc validate`, build/oauth2-cc from `make validate`, which
runs the same `config::parse` both hosts run at load). The test fails where one accepts and the
other refuses, unless the filter's reason is one of KNOWN_DIFFERENCES: rules a JSON Schema cannot
state (the environment, key material, a comparison of two fields...), each listed with why.

Sources: the embedded configurations of envoy/, deploy/ and demo/ (YAML or JSON, plain or as a
StringValue), the fuzz corpus (fuzz/corpus/config_parse), docs/idp/*.md's JSON blocks, the cases
of test_config_rejection.py; generated: each leaf of each of those replaced by a set of probe
values or removed (once per field), and every combination of auth method, secret, `jwt`, grant
and method: about 4,000 configurations. No Envoy runs here: one `oauth2-cc validate` process checks
every file; about 6 s of CPU.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from jsonschema import Draft202012Validator

import plugin_config as pc
from envoy import REPO_ROOT
from test_config_rejection import ACCEPTED, CASES, make_config

VALIDATE = Path(os.environ.get("OAUTH2_CC_VALIDATE", REPO_ROOT / "build" / "oauth2-cc"))
SCHEMA = json.loads((REPO_ROOT / "schema" / "oauth2-cc.schema.json").read_text())
KEYS = REPO_ROOT / "tests" / "fixtures" / "keys"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"

# The filter's reasons (after "configuration rejected: <path>: ") that no JSON Schema can match,
# with why. A disagreement whose reason matches none of these fails the test.
KNOWN_DIFFERENCES = [
    (r"environment variable .* is not set",
     "the schema sees the configuration, not the VM's environment"),
    (r'file ".*" cannot be read',
     "the schema sees the configuration, not the dynamic module's filesystem"),
    (r"jwt\.private_key: (?!.*(is required|remove private_key))",
     "whether a PEM text is a key of the algorithm's type (and long enough) is not a JSON property"),
    (r"client_secret: (the HMAC key|HS\d+ needs|.*at least \d+ bytes)",
     "an HMAC secret's least length depends on the algorithm and on the secret's bytes, which may come from the environment"),
    (r"backoff\.max_ms: must be at least backoff\.base_ms",
     "JSON Schema cannot compare two values"),
    (r"routes\[\d+\]\.profile: no profile is named",
     "JSON Schema cannot check that a value names a key of another object"),
    (r"token_exchange\.actor\.profile: (no profile is named|a profile cannot be its own actor|must name a profile that is not)",
     "JSON Schema cannot check what another object of the configuration is"),
    (r"token_exchange\.cache\.max_bytes: must be from",
     "the least max_bytes depends on max_subjects: JSON Schema cannot compare two values"),
    (r"invalid type: floating point `-?\d+(\.0)?`, expected u(32|64|size)",
     "JSON Schema counts 5.0 as an integer; the filter's integer fields take integers written without a fraction"),
]

# Probe values a leaf is replaced with (besides removal): wrong types, empties, bounds, and values
# some field's rule turns on.
PROBES: list[Any] = [
    None, "", " ", "x", "GET", "HS256", "RS256", "none", "private_key_jwt", "client_secret_jwt",
    "https://idp.example/t?x=1", "*.example.com", "a:65535", "a:65536", "[::1]:8443", "*.", "http://", "/p",
    "a b", "a..b", "Host", "x-ok", "bad\nvalue",
    0, 1, -1, 99, 100, 399, 400, 599, 600, 255, 256, 3601, 1048577, 86400001, 1000001, 0.0, 1.5,
    True, [], ["a"], {}, {"env": "OAUTH2_CC_TEST_UNSET"}, {"file": "/nonexistent/oauth2-cc-test"},
]


# --------------------------------------------------------------------------- #
# Configurations the repository holds
# --------------------------------------------------------------------------- #


def embedded_configs(obj: Any) -> Iterator[Any]:
    """Every oauth2-cc configuration inside a parsed YAML/JSON document: an object with
    `profiles`, or a string holding one (an Envoy StringValue)."""
    if isinstance(obj, dict):
        if "profiles" in obj:
            yield obj
            return
        for value in obj.values():
            yield from embedded_configs(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from embedded_configs(value)
    elif isinstance(obj, str) and '"profiles"' in obj:
        try:
            yield from embedded_configs(json.loads(obj))
        except ValueError:
            pass


def repository_configs() -> dict[str, Any]:
    """id -> configuration (parsed JSON, or the raw text when it is not JSON)."""
    out: dict[str, Any] = {}
    for top in ("envoy", "deploy", "demo"):
        for path in sorted((REPO_ROOT / top).rglob("*")):
            if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
                continue
            docs = list(yaml.safe_load_all(path.read_text()))
            for i, config in enumerate(c for d in docs for c in embedded_configs(d)):
                out[f"{path.relative_to(REPO_ROOT)}#{i}"] = config
    for path in sorted((REPO_ROOT / "fuzz" / "corpus" / "config_parse").glob("*")):
        text = path.read_text(errors="replace")
        try:
            out[str(path.relative_to(REPO_ROOT))] = json.loads(text)
        except ValueError:
            out[str(path.relative_to(REPO_ROOT))] = text
    # Every JSON block of a recipe (docs/idp) is a whole configuration; elsewhere, blocks that are.
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]:
        recipe = path.parent.name == "idp"
        for i, block in enumerate(re.findall(r"```json\n(.*?)```", path.read_text(), re.S)):
            try:
                config = json.loads(block)
            except ValueError:
                assert not recipe, f"{path.relative_to(REPO_ROOT)}: JSON block {i} is not JSON"
                continue
            if recipe or (isinstance(config, dict) and "profiles" in config):
                out[f"{path.relative_to(REPO_ROOT)}#{i}"] = config
    for case in CASES:
        out[f"test_config_rejection:{case}"] = make_config(case)
    for case, edit in ACCEPTED.items():
        out[f"test_config_rejection:{case}"] = edit(copy.deepcopy(pc.sample()))
    return out


# --------------------------------------------------------------------------- #
# Generated configurations
# --------------------------------------------------------------------------- #


def leaves(obj: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path of every value below obj (objects and lists included)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield path + (key,)
            yield from leaves(value, path + (key,))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield path + (index,)
            yield from leaves(value, path + (index,))


def replaced(config: Any, path: tuple, value: Any, *, remove: bool = False) -> Any:
    out = copy.deepcopy(config)
    node = out
    for key in path[:-1]:
        node = node[key]
    if remove:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def field_mutations(name: str, config: dict, done: set[tuple]) -> dict[str, Any]:
    """Each leaf removed and replaced by each probe; a field already probed in another base (its
    profile's name aside) is skipped: the auth combinations cover the rules between fields."""
    out = {}
    for path in leaves(config):
        general = tuple("*" if i == 1 and path[0] == "profiles" else p for i, p in enumerate(path))
        if general in done:
            continue
        done.add(general)
        where = ".".join(map(str, path))
        if isinstance(path[-1], str):
            out[f"{name}~{where}:removed"] = replaced(config, path, None, remove=True)
        for i, probe in enumerate(PROBES):
            out[f"{name}~{where}={i}"] = replaced(config, path, probe)
    return out


def auth_combinations() -> dict[str, Any]:
    """Every auth method without a secret, with a long one and a short one; with no `jwt`, an RSA
    one or an HMAC one; with either grant and either method: the rules between a profile's fields."""
    rsa = {"algorithm": "RS256", "private_key": (KEYS / "rsa_pkcs8.pem").read_text()}
    default_alg = {"private_key": (KEYS / "rsa_pkcs8.pem").read_text()}
    hmac = {"algorithm": "HS256"}
    hmac_with_key = {"algorithm": "HS256", "private_key": (KEYS / "rsa_pkcs8.pem").read_text()}
    rsa_without_key = {"algorithm": "RS256"}
    out = {}
    for auth in ("client_secret_basic", "client_secret_post", "client_secret_jwt", "private_key_jwt", "none",
                 "tls_client_auth", None):
        for secret in (None, "k" * 64, "short"):
            for jwt_name, jwt in (("nojwt", None), ("rsa", rsa), ("defaultalg", default_alg), ("hmac", hmac),
                                  ("hmackey", hmac_with_key), ("rsanokey", rsa_without_key), ("null", "null")):
                for grant in (None, JWT_BEARER_GRANT):
                    for method in (None, "GET"):
                        profile = {"cluster": "idp", "token_url": "https://idp.example/token", "client_id": "c"}
                        fields = {"auth_method": auth, "client_secret": secret, "grant_type": grant,
                                  "method": method, "jwt": None if jwt == "null" else jwt}
                        for key, value in fields.items():
                            if value is not None or (key == "jwt" and jwt == "null"):
                                profile[key] = value
                        name = f"auth:{auth}/{secret and len(secret)}/{jwt_name}/{grant and 'jwtb'}/{method}"
                        out[name] = {"profiles": {"p": profile}}
    for endpoint in ({}, {"issuer": "https://idp.example"}, {"token_url": None}, {"issuer": None},
                     {"issuer": "https://idp.example", "token_url": None}):
        profile = {"cluster": "idp", "token_url": "https://idp.example/token", "client_id": "c", "client_secret": "s"}
        profile.update(endpoint)
        out[f"endpoint:{json.dumps(endpoint)}"] = {"profiles": {"p": {k: v for k, v in profile.items()}}}
    return out


def all_configs() -> dict[str, Any]:
    configs = repository_configs()
    # One base per set of field paths: the shipped configurations differ mostly in values.
    shapes: set[frozenset] = set()
    bases = {}
    for name, config in configs.items():
        shape = frozenset(tuple(str(p) for p in path) for path in leaves(config))
        if isinstance(config, dict) and shape not in shapes:
            shapes.add(shape)
            bases[name] = config
    generated: dict[str, Any] = {}
    done: set[tuple] = set()
    for name, config in bases.items():
        generated.update(field_mutations(name, config, done))
    generated.update(auth_combinations())
    seen = {json.dumps(c, sort_keys=True) for c in configs.values()}
    for name, config in generated.items():
        text = json.dumps(config, sort_keys=True)
        if text not in seen:
            seen.add(text)
            configs[name] = config
    return configs


# --------------------------------------------------------------------------- #
# Both verdicts
# --------------------------------------------------------------------------- #


def env_for(configs: dict[str, Any]) -> dict[str, str]:
    """A value for every variable a configuration reads, except OAUTH2_CC_TEST_UNSET: a PEM key
    where a private key is read, a long string elsewhere."""
    env = {k: v for k, v in os.environ.items() if k != "OAUTH2_CC_TEST_UNSET"}
    key = (KEYS / "rsa_pkcs8.pem").read_text()
    for config in configs.values():
        for path in leaves(config):
            node = config
            for part in path:
                node = node[part]
            if isinstance(node, dict) and set(node) == {"env"} and isinstance(node["env"], str) and node["env"]:
                if node["env"] != "OAUTH2_CC_TEST_UNSET" and "\0" not in node["env"] and "=" not in node["env"]:
                    env.setdefault(node["env"], key if path[-1] == "private_key" else "v" * 64)
    return env


def filter_verdicts(configs: dict[str, Any], workdir: Path) -> dict[str, str | None]:
    """name -> None (accepted) or the filter's rejection line."""
    assert VALIDATE.is_file(), f"{VALIDATE} is missing: run `make validate`"
    files = {}
    for i, (name, config) in enumerate(configs.items()):
        path = workdir / f"{i}.json"
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        files[str(path)] = name
    proc = subprocess.run([str(VALIDATE), "validate", *files], capture_output=True, text=True,
                          env=env_for(configs), timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    verdicts: dict[str, str | None] = {}
    for stream in (proc.stdout, proc.stderr):
        last = None
        for line in stream.splitlines():
            file, _, message = line.partition(": ")
            if file not in files:  # a message that quotes a value with a line break in it
                assert last is not None and verdicts[last] is not None, line
                verdicts[last] += "\n" + line
                continue
            last = files[file]
            verdicts[last] = None if message.startswith("configured ") else message
    assert len(verdicts) == len(configs), "the validator did not answer for every file"
    return verdicts


def schema_verdict(validator: Draft202012Validator, config: Any) -> str | None:
    """None when valid; else "not JSON" or "invalid" (schema_error says why, when it is shown)."""
    if isinstance(config, str):
        return "not JSON"
    return None if validator.is_valid(config) else "invalid"


def schema_error(config: Any) -> str:
    if isinstance(config, str):
        return "not JSON"
    error = next(iter(Draft202012Validator(SCHEMA).iter_errors(config)))
    return f"{'.'.join(map(str, error.absolute_path))}: {error.message[:160]}"


def known_difference(rejection: str) -> str | None:
    for pattern, reason in KNOWN_DIFFERENCES:
        if re.search(pattern, rejection):
            return reason
    return None


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> dict[str, tuple[Any, str | None, str | None]]:
    """name -> (configuration, the schema's verdict, the filter's verdict); None means valid."""
    Draft202012Validator.check_schema(SCHEMA)
    validator = Draft202012Validator(SCHEMA)
    configs = all_configs()
    by_filter = filter_verdicts(configs, tmp_path_factory.mktemp("configs"))
    return {name: (config, schema_verdict(validator, config), by_filter[name]) for name, config in configs.items()}


# The tests that read `verdicts` share one xdist worker, so the configurations are checked once per
# run rather than once per worker that draws one of them.
SHARES_VERDICTS = pytest.mark.xdist_group("schema_verdicts")


@SHARES_VERDICTS
def test_schema_and_filter_agree(verdicts):
    disagreements, known = [], {}
    counts = {"accepted by both": 0, "refused by both": 0}
    for name, (config, by_schema, by_filter) in verdicts.items():
        if (by_schema is None) == (by_filter is None):
            counts["accepted by both" if by_schema is None else "refused by both"] += 1
            continue
        reason = known_difference(by_filter) if by_filter else None
        if reason:
            known[reason] = known.get(reason, 0) + 1
            continue
        shown = config if isinstance(config, str) else json.dumps(config)[:400]
        disagreements.append(f"{name}\n  schema: {by_schema and schema_error(config) or 'valid'}\n  filter: {by_filter or 'accepted'}\n  {shown}")
    print(f"{len(verdicts)} configurations: {counts}, known differences {known}")
    assert counts["accepted by both"] > 100 and counts["refused by both"] > 100, counts
    assert not disagreements, f"{len(disagreements)} disagreements:\n" + "\n".join(disagreements[:25])


@SHARES_VERDICTS
@pytest.mark.parametrize("pattern,reason", KNOWN_DIFFERENCES)
def test_each_known_difference_occurs(verdicts, pattern, reason):
    """A listed difference that no configuration shows any more is stale: remove it (or add a
    configuration that shows it)."""
    shown = [n for n, (_, by_schema, by_filter) in verdicts.items()
             if by_filter and by_schema is None and re.search(pattern, by_filter)]
    assert shown, f"no configuration shows {pattern!r} ({reason})"


@pytest.mark.parametrize("case", list(CASES))
def test_validate_says_what_envoy_logs(case):
    """`oauth2-cc validate -` (stdin) refuses each configuration test_config_rejection.py has Envoy
    refuse, with a line matching the same pattern that test finds in Envoy's log, and exit 1."""
    config = make_config(case)
    text = config if isinstance(config, str) else json.dumps(config)
    proc = subprocess.run([str(VALIDATE), "validate", "-"], input=text, capture_output=True, text=True,
                          env={"PATH": os.environ.get("PATH", "")}, timeout=30)
    print(proc.stderr)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("configuration rejected: "), proc.stderr
    assert re.search(CASES[case][1], proc.stderr), (CASES[case][1], proc.stderr)
    assert pc.DEFAULT_CLIENT_SECRET not in proc.stderr
