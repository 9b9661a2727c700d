"""Builders for the oauth2-cc plugin configuration used by the e2e tests.

    {"profiles": {"default": {"cluster": "idp", "token_url": "http://idp.test/oauth2/token",
                              "client_id": "svc-a", "client_secret": "s3cret"}},
     "routes": [{"match": {"path_prefix": "/"}, "profile": "default"}]}

``client_secret`` may also be ``{"env": "NAME"}`` (read from
``vm_config.environment_variables``; pass ``env={"NAME": ...}`` to the factory).
The token_url authority need not resolve: the callout goes to ``cluster``.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Mapping

DEFAULT_CLUSTER = "idp"
DEFAULT_TOKEN_URL = "http://idp.test/oauth2/token"
DEFAULT_CLIENT_ID = "svc-a"
DEFAULT_CLIENT_SECRET = "s3cret"

SAMPLE: dict[str, Any] = {
    "profiles": {
        "default": {
            "cluster": DEFAULT_CLUSTER,
            "token_url": DEFAULT_TOKEN_URL,
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
        }
    },
    "routes": [{"match": {"path_prefix": "/"}, "profile": "default"}],
}


def sample() -> dict[str, Any]:
    """A fresh copy of the sample configuration above."""
    return copy.deepcopy(SAMPLE)


def profile(
    cluster: str = DEFAULT_CLUSTER,
    token_url: str = DEFAULT_TOKEN_URL,
    client_id: str = DEFAULT_CLIENT_ID,
    client_secret: Any = DEFAULT_CLIENT_SECRET,
    **extra: Any,
) -> dict[str, Any]:
    """One profile; ``extra`` adds any other field (scopes, auth_method, refresh, ...).
    A value of None removes the field (e.g. ``client_secret=None``)."""
    p: dict[str, Any] = {
        "cluster": cluster,
        "token_url": token_url,
        "client_id": client_id,
        "client_secret": client_secret,
        **extra,
    }
    return {k: v for k, v in p.items() if v is not None}


def env_secret(name: str) -> dict[str, str]:
    """``{"env": name}``: a secret read from vm_config.environment_variables."""
    return {"env": name}


def match_route(profile_name: str = "default", **match: Any) -> dict[str, Any]:
    """``{"match": {...}, "profile": name}``; default match is path_prefix "/"."""
    return {"match": match or {"path_prefix": "/"}, "profile": profile_name}


def config(
    profiles: Mapping[str, Mapping[str, Any]] | None = None,
    routes: list[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A whole plugin configuration: ``profiles`` default to {"default": profile()},
    ``routes`` to one path_prefix "/" route to the first profile. ``extra`` adds
    top-level fields (e.g. on_failure)."""
    if profiles is None:
        profiles = {"default": profile()}
    if routes is None:
        routes = [match_route(next(iter(profiles)))] if profiles else []
    return {"profiles": dict(profiles), "routes": list(routes), **extra}


def clusters_of(plugin_config: Mapping[str, Any] | str | None) -> list[str]:
    """The distinct ``cluster`` names the profiles refer to (in order)."""
    if plugin_config is None:
        return []
    if isinstance(plugin_config, str):
        try:
            plugin_config = json.loads(plugin_config)
        except ValueError:
            return []
    out: list[str] = []
    profiles = plugin_config.get("profiles") if isinstance(plugin_config, Mapping) else None
    if isinstance(profiles, Mapping):
        for p in profiles.values():
            c = p.get("cluster") if isinstance(p, Mapping) else None
            if isinstance(c, str) and c not in out:
                out.append(c)
    return out
