"""Validate Kubernetes objects against a CustomResourceDefinition without a cluster: what the API
server does on create, as far as it can be done offline.

1. Structural defaulting: every absent field with a schema ``default`` gets it (the API server
   defaults before it validates, and CEL rules see the defaulted object).
2. The version's ``openAPIV3Schema`` as a JSON Schema (jsonschema): ``nullable``,
   ``x-kubernetes-int-or-string`` and ``x-kubernetes-preserve-unknown-fields`` translated, and an
   object with ``properties`` closed to other fields, as strict field validation (``kubectl
   apply``'s default) refuses unknown fields. ``format`` is not checked.
3. Every ``x-kubernetes-validations`` rule on the path of a present value, evaluated with
   cel-python (celpy) with ``self`` bound to that value. Transition rules (``oldSelf``) do not run
   on create and are skipped. A rule celpy cannot compile, or that calls a function celpy lacks
   (Kubernetes' own CEL libraries: ``isURL``, ``quantity``, ``ip``, ...; the string functions the
   vendored CRDs call are supplied below), is reported as not evaluated, with the reason; any other
   evaluation error fails the object, as on a real server.
"""

from __future__ import annotations

import copy
import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import celpy
import yaml
from jsonschema import Draft202012Validator

# The error texts by which celpy says it does not know a function (or an overload of one).
UNSUPPORTED = ("unknown function", "no such overload", "no matching overload", "undeclared reference",
               "not supported", "unsupported")


@dataclass
class Report:
    """What one object's check found."""

    schema_errors: list[str] = field(default_factory=list)
    rule_failures: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    not_evaluated: list[tuple[str, str]] = field(default_factory=list)  # (rule, why)

    @property
    def errors(self) -> list[str]:
        return self.schema_errors + self.rule_failures


@dataclass
class Crd:
    group: str
    kind: str
    schemas: dict[str, dict]  # served version name -> openAPIV3Schema

    @classmethod
    def load(cls, path: Path) -> "Crd":
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        doc = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # C parser: 1 MB CRDs
        assert doc["kind"] == "CustomResourceDefinition", path
        spec = doc["spec"]
        schemas = {v["name"]: v["schema"]["openAPIV3Schema"] for v in spec["versions"] if v.get("served")}
        return cls(spec["group"], spec["names"]["kind"], schemas)

    def schema_for(self, api_version: str) -> dict:
        group, _, version = api_version.rpartition("/")
        assert group == self.group, f"{api_version} is not in group {self.group}"
        if version not in self.schemas:
            raise KeyError(f"{self.kind} {api_version}: not served (served: {sorted(self.schemas)})")
        return self.schemas[version]

    def check(self, obj: dict) -> Report:
        schema = self.schema_for(obj["apiVersion"])
        report = Report()
        body = {k: v for k, v in copy.deepcopy(obj).items() if k != "metadata"}
        apply_defaults(schema, body)
        top = copy.deepcopy(schema)
        top.get("properties", {}).pop("metadata", None)
        validator = Draft202012Validator(to_json_schema(top))
        for e in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
            report.schema_errors.append(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
        for path, rule, value in rules_on(schema, body, "self"):
            check_rule(rule, value, path, report)
        return report


def apply_defaults(schema: dict, value: Any) -> None:
    """Kubernetes structural defaulting, in place: absent object fields get their ``default``."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in set(value) - set(schema.get("properties", {})):
                apply_defaults(extra, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)


def to_json_schema(s: Any) -> Any:
    """An OpenAPI v3 structural schema as a JSON Schema (draft 2020-12)."""
    if not isinstance(s, dict):
        return s
    out = {k: to_json_schema(v) if k in ("items", "not") else v for k, v in s.items()
           if not k.startswith("x-kubernetes-") and k not in ("nullable", "format", "default")}
    if "properties" in s:
        out["properties"] = {k: to_json_schema(v) for k, v in s["properties"].items()}
    if isinstance(s.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(s["additionalProperties"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            out[key] = [to_json_schema(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [*out.get("anyOf", []), {"type": "integer"}, {"type": "string"}]
    if s.get("type") == "object" and "properties" in s and "additionalProperties" not in s \
            and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def rules_on(schema: dict, value: Any, path: str) -> Iterator[tuple[str, dict, Any]]:
    """(path, rule, value) for every x-kubernetes-validations rule whose node has a value."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule, value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name, sub in props.items():
            if name in value:
                yield from rules_on(sub, value[name], f"{path}.{name}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in set(value) - set(props):
                yield from rules_on(extra, value[name], f"{path}[{name!r}]")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from rules_on(schema["items"], item, f"{path}[{i}]")


_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}

# The functions of Kubernetes' CEL string library (cel-go ext.Strings) that the vendored CRDs
# call and celpy lacks, written out as that library defines them.
K8S_STRING_FUNCTIONS = {
    "split": lambda s, sep: celpy.celtypes.ListType(celpy.celtypes.StringType(x) for x in str(s).split(str(sep))),
    "upperAscii": lambda s: celpy.celtypes.StringType(
        "".join(c.upper() if c.isascii() else c for c in str(s))),
    "lowerAscii": lambda s: celpy.celtypes.StringType(
        "".join(c.lower() if c.isascii() else c for c in str(s))),
}


def check_rule(rule: dict, value: Any, path: str, report: Report) -> None:
    text = rule["rule"]
    where = f"{path}: {text}"
    if "oldSelf" in text:
        report.not_evaluated.append((where, "a transition rule (oldSelf): not run on create"))
        return
    try:
        if text not in _PROGRAMS:
            _PROGRAMS[text] = _ENV.program(_ENV.compile(text), functions=K8S_STRING_FUNCTIONS)
        result = _PROGRAMS[text].evaluate({"self": celpy.json_to_cel(value)})
    except Exception as e:  # celpy raises its own CELParseError / CELEvalError / TypeError
        reason = f"{type(e).__name__}: {str(e)[:160]}"
        if isinstance(e, celpy.CELParseError) or any(u in str(e).lower() for u in UNSUPPORTED):
            report.not_evaluated.append((where, reason))
        else:
            report.rule_failures.append(f"{where} -> error {reason}")
        return
    if isinstance(result, celpy.celtypes.BoolType) or isinstance(result, bool):
        report.evaluated.append(where)
        if not bool(result):
            report.rule_failures.append(f"{where} -> false: {rule.get('message', '')}")
        return
    reason = f"{type(result).__name__}: {str(result)[:160]}"
    if any(u in reason.lower() for u in UNSUPPORTED):
        report.not_evaluated.append((where, reason))
    else:
        report.rule_failures.append(f"{where} -> not a bool: {reason}")
