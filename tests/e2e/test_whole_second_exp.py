"""Whole-second ``exp`` never lets an expired token through.

A real IdP stamps ``iat``/``exp`` in whole seconds (``exp = floor(now) + lifetime``), so its token
lives up to 1 s less than ``expires_in`` says. With 3-5 s lifetimes and steady traffic for ~20 s,
the upstream records when each request arrived and which token it carried; no request may arrive at
or after its token's ``exp``:

* JWS-shaped tokens: ``exp`` is in the payload (decoded here from what the upstream received); the
  filter may read it (no signature check) and use the earlier of it and ``expires_in``.
* opaque tokens: only ``expires_in`` (whole seconds) is visible, so only a margin of at least 1 s
  keeps the filter safe.

``servers.WholeSecondIssuer`` picks the lifetimes (all within 3-5 s) so that the dangerous case (a
token issued late in a second, whose real life is shorter than 80 % of ``expires_in``) happens on
most fetches rather than by chance; the fetch log is printed.
"""

from __future__ import annotations

import threading
import time

import pytest

import plugin_config as pc
from envoy import request
from servers import WholeSecondIssuer, jws_payload

TRAFFIC_S = 20.0


def steady_traffic(port: int, seconds: float, pause: float = 0.01) -> list[tuple[float, int, bytes]]:
    """One client sending requests back to back (plus ``pause``) for ``seconds``:
    [(sent at, status, body head)]."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.time()
        try:
            r = request(port, "/steady", timeout=5)
            out.append((t, r.status, r.body[:100]))
        except OSError as exc:
            out.append((t, 0, repr(exc).encode()))
        time.sleep(pause)
    return out


@pytest.mark.parametrize("kind", ["jws", "opaque"])
def test_no_request_reaches_the_upstream_at_or_after_exp(envoy_factory, token_server, upstream, kind):
    issuer = WholeSecondIssuer(token_server, jws=(kind == "jws"))
    token_server.set_handler(issuer)
    arrivals: list[tuple[float, str | None]] = []
    lock = threading.Lock()

    def upstream_handler(rec):
        with lock:
            arrivals.append((time.time(), rec.header("authorization")))
        return 200, [("Content-Type", "text/plain")], b"ok"

    upstream.set_handler(upstream_handler)
    e = envoy_factory.start(pc.config(profiles={"default": pc.profile()}))
    sent = steady_traffic(e.port, TRAFFIC_S)

    late: list[str] = []
    margins: list[float] = []
    unknown: list[str] = []
    for at, auth in arrivals:
        token = (auth or "").removeprefix("Bearer ")
        if kind == "jws":
            payload = jws_payload(token)
            exp = payload.get("exp") if payload else None
        else:
            exp = issuer.expiry.get(token)
        if not isinstance(exp, int):
            unknown.append(f"{auth!r}")
            continue
        margins.append(exp - at)
        if at >= exp:
            late.append(f"{token[-24:]} arrived {at - exp:.3f} s after its exp {exp}")
    fetches = "\n".join(
        f"  issued {t:.3f} (fraction {t % 1:.2f}) lifetime {life} s, exp {exp} = {exp - t:.2f} s later"
        for t, life, exp, _ in issuer.log)
    closest = min(margins) if margins else float("nan")
    failed = [s for s in sent if s[1] != 200]
    print(f"\n{kind}: {len(sent)} requests, {len(arrivals)} reached the upstream, {len(issuer.log)} tokens; "
          f"closest margin to exp {closest:.3f} s; {len(late)} at or after exp\n{fetches}")
    assert not unknown, f"the upstream got tokens this IdP never issued: {unknown[:5]}"
    assert not late, (
        f"{len(late)} of {len(arrivals)} requests reached the upstream at or after their token's exp "
        f"(closest margin {closest:.3f} s):\n  " + "\n  ".join(late[:10]) + f"\ntoken fetches:\n{fetches}")
    assert not failed, f"{len(failed)} of {len(sent)} requests failed, first: {failed[:3]}"
    assert len(issuer.log) >= 4, f"only {len(issuer.log)} tokens in {TRAFFIC_S} s:\n{fetches}"
