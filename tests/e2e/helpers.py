"""Helpers the test files share: the one-profile configuration most tests start from and the
check of the filter's failure reply. (Builders of whole configurations are in plugin_config.py,
the harness in envoy.py and conftest.py.)

A test file that wants other defaults binds them once, e.g.
``one_profile = functools.partial(helpers.one_profile, backoff={"base_ms": 100, "max_ms": 400})``
(a caller's own ``backoff=`` still wins).
"""

from __future__ import annotations

import json
from typing import Any

import plugin_config as pc

PROFILE = "default"


def one_profile(name: str = PROFILE, routes: list[dict] | None = None, top: dict | None = None,
                **fields: Any) -> dict:
    """A plugin configuration with the one profile ``name`` (``fields``: its fields beyond the
    defaults of ``pc.profile``), ``routes`` (default: path prefix "/" to it) and top-level
    fields ``top`` (e.g. ``{"max_paused_requests": 1}``)."""
    return pc.config(profiles={name: pc.profile(**fields)}, routes=routes, **(top or {}))


def failure_body(profile: str = PROFILE) -> bytes:
    """The failure reply's exact body (README "Failure reply")."""
    return json.dumps({"error": "token_unavailable", "profile": profile}, separators=(",", ":")).encode()


def assert_failure_reply(r, status: int = 503, profile: str = PROFILE) -> None:
    """``r`` (an envoy.Response) is the filter's failure reply: ``status``, JSON, exactly the body."""
    got = (r.status, r.headers.get("content-type"), r.body)
    want = (status, "application/json", failure_body(profile))
    assert got == want, f"(status, content-type, body) = {got}, expected {want}"
