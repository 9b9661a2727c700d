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


def token_schedule(lifetime: float, ahead_ratio: float = 0.8, skew_s: float = 5.0) -> tuple[float, float]:
    """(refresh after, usable for), in seconds from when the token request was sent, as the filter
    decides them (src/core/cache.rs ``token_times``, ``expiry_margin_ms``): the margin is skew_s
    shrunk to a tenth of the lifetime but at least 1 s (unless that leaves nothing); the refresh
    comes at ``ahead_ratio`` of the lifetime, but at least min(1 s, the rest of the usable time
    ahead_ratio leaves) before the usable end. A 3 s token: (1.6, 2.0); 10 s: (8.0, 9.0)."""
    margin = min(skew_s, lifetime / 10)
    if lifetime > 1.0:
        margin = max(margin, 1.0)
    usable = lifetime - margin
    lead = min(1.0, usable * (1 - ahead_ratio))
    return min(ahead_ratio * lifetime, usable - lead), usable


def failure_body(profile: str = PROFILE) -> bytes:
    """The failure reply's exact body (README "Failure reply")."""
    return json.dumps({"error": "token_unavailable", "profile": profile}, separators=(",", ":")).encode()


def assert_failure_reply(r, status: int = 503, profile: str = PROFILE) -> None:
    """``r`` (an envoy.Response) is the filter's failure reply: ``status``, JSON, exactly the body."""
    got = (r.status, r.headers.get("content-type"), r.body)
    want = (status, "application/json", failure_body(profile))
    assert got == want, f"(status, content-type, body) = {got}, expected {want}"
