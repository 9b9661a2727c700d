"""The load driver of the caller-isolation test: many subjects, interleaved, at high concurrency.

``drive_isolation(port, server)`` mints a subject token for each of ``subjects`` distinct subjects
(``ExchangeServer.mint_subject``), sends ``per_subject`` requests for each through Envoy on
``port`` in one seeded random interleaving, from ``concurrency`` client threads that each keep
one connection alive, and judges every answer from the echo upstream (``EchoUpstream``):

* the answer is the echo of this very request (its path names the subject and the request);
* the upstream got ``injected_header`` = ``injected_scheme`` + a token the server issued by
  exchanging *this* subject's token (``ExchangeServer.exchanges()``: token -> subject), never a
  token exchanged for another subject, never the subject token itself;
* the subject token reached the upstream nowhere (the filter replaced it), unless
  ``subject_may_reach_upstream``.

It returns an ``IsolationReport``: the counts by status, every wrong answer described, and the
exchange requests per subject (``ExchangeServer.exchange_counts()`` for the driver's subjects).
``report.assert_isolated()`` fails with the first wrong answers; the test then judges the counts
(for instance at most one exchange per subject with a cache and single flight).

For oauth2-cc's exchange profile, size the profile for the run, or the counts judge the limits
instead of the isolation: ``limits`` well above ``subjects`` exchanges in a burst (the default 20
per second refuses most first requests with 429), and ``cache.max_subjects`` several times
``subjects`` with ``cache.max_bytes`` to match (16 KiB per set of 8): the cache is
set-associative, 8 ways, so at 1,000 subjects in 1,024 slots some sets overflow and evict, and
those subjects are exchanged again. Measured on the native build (1,000 subjects, 3 requests each,
64 clients, about 5 s): ``max_subjects`` 8192 and ``max_bytes`` 64 MiB, one exchange per subject;
the default 1024, 113 subjects exchanged twice and 3 three times; the default limits with 200
subjects, 476 of 600 requests answered 429.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from exchange_server import ExchangeServer


@dataclass
class IsolationReport:
    subjects: list[str]
    requests: int
    elapsed_s: float
    statuses: Counter
    wrong: list[str]  # one line per wrong answer
    exchange_counts: dict[str, int]  # exchange requests per subject (0 for a subject never exchanged)
    tokens_per_subject: dict[str, set[str]] = field(default_factory=dict)  # tokens the upstream saw, by subject

    def summary(self) -> str:
        counts = Counter(self.exchange_counts.values())
        return (f"{self.requests} requests for {len(self.subjects)} subjects in {self.elapsed_s:.1f} s "
                f"({self.requests / max(self.elapsed_s, 1e-9):.0f}/s): statuses {dict(self.statuses)}, "
                f"{len(self.wrong)} wrong; subjects by number of exchanges {dict(sorted(counts.items()))}")

    def assert_isolated(self) -> None:
        assert not self.wrong, f"{len(self.wrong)} wrong answers, first 10:\n" + "\n".join(self.wrong[:10]) + \
            "\n" + self.summary()


@dataclass
class _Sent:
    subject: str
    index: int  # the subject's n-th request
    path: str
    status: int = 0
    echo: Any = None
    error: str | None = None


def schedule(subjects: list[str], per_subject: int, seed: int) -> list[tuple[str, int]]:
    """Every (subject, n) once, in a random order: a subject's requests land anywhere, often
    within one concurrency window of each other (then they race for the same exchange)."""
    order = [(s, n) for s in subjects for n in range(per_subject)]
    random.Random(seed).shuffle(order)
    return order


def drive_isolation(port: int, server: ExchangeServer, *, subjects: int = 1000, per_subject: int = 3,
                    concurrency: int = 64, seed: int = 1, subject_prefix: str = "iso-", exp_in: float = 600,
                    path_prefix: str = "/iso", subject_header: str = "authorization", subject_scheme: str = "Bearer ",
                    injected_header: str = "authorization", injected_scheme: str = "Bearer ",
                    extra_headers: dict[str, str] | None = None, subject_may_reach_upstream: bool = False,
                    timeout: float = 20) -> IsolationReport:
    """Send the interleaved requests and judge them (see the module doc). ``subject_header`` /
    ``subject_scheme``: where the client puts its subject token; ``injected_header`` /
    ``injected_scheme``: where the upstream must find the exchanged one."""
    names = [f"{subject_prefix}{i:04d}" for i in range(subjects)]
    tokens = {name: server.mint_subject(name, exp_in=exp_in) for name in names}
    sent = [_Sent(s, n, f"{path_prefix}/{s}/{n}") for s, n in schedule(names, per_subject, seed)]
    t0 = time.monotonic()
    _send_all(port, sent, tokens, concurrency, subject_header, subject_scheme, extra_headers or {}, timeout)
    elapsed = time.monotonic() - t0

    issued_to = {ex.access_token: ex.subject for ex in server.exchanges() if ex.access_token}
    wrong: list[str] = []
    seen: dict[str, set[str]] = {name: set() for name in names}
    for r in sent:
        problem = _judge(r, tokens, issued_to, injected_header.lower(), injected_scheme, subject_may_reach_upstream, seen)
        if problem:
            wrong.append(f"{r.path}: {problem}")
    calls = server.exchange_counts()
    return IsolationReport(subjects=names, requests=len(sent), elapsed_s=elapsed,
                           statuses=Counter(r.status for r in sent), wrong=wrong,
                           exchange_counts={name: calls.get(name, 0) for name in names}, tokens_per_subject=seen)


def _judge(r: _Sent, tokens: dict[str, str], issued_to: dict[str, str | None], header: str, scheme: str,
           subject_may_reach_upstream: bool, seen: dict[str, set[str]]) -> str | None:
    if r.error is not None:
        return f"no answer ({r.error})"
    if r.status != 200:
        return f"status {r.status}: {str(r.echo)[:200]}"
    if not isinstance(r.echo, dict) or r.echo.get("path") != r.path:
        return f"not the echo of this request: {str(r.echo)[:200]}"
    headers = r.echo.get("headers") or {}
    value = headers.get(header)
    if value is None or not value.startswith(scheme):
        return f"{header} at the upstream is {value!r}, expected {scheme!r} + a token exchanged for {r.subject}"
    token = value[len(scheme):]
    seen[r.subject].add(token)
    if token == tokens[r.subject]:
        return "the upstream got the subject token itself, not an exchanged one"
    owner = issued_to.get(token, "<not issued by the exchange server>")
    if owner != r.subject:
        return f"the upstream got a token exchanged for {owner}, not for {r.subject}"
    if not subject_may_reach_upstream and tokens[r.subject] in json.dumps(r.echo):
        return "the subject token reached the upstream"
    return None


def _send_all(port: int, sent: list[_Sent], tokens: dict[str, str], concurrency: int, subject_header: str,
              subject_scheme: str, extra_headers: dict[str, str], timeout: float) -> None:
    lock = threading.Lock()
    position = iter(range(len(sent)))

    def take() -> _Sent | None:
        with lock:
            i = next(position, None)
        return None if i is None else sent[i]

    def worker():
        conn: http.client.HTTPConnection | None = None
        while (r := take()) is not None:
            headers = {subject_header: subject_scheme + tokens[r.subject], **extra_headers}
            for attempt in (1, 2):  # a kept-alive connection Envoy closed meanwhile: once more on a new one
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                try:
                    conn.request("GET", r.path, headers=headers)
                    resp = conn.getresponse()
                    body = resp.read()
                    r.status = resp.status
                    try:
                        r.echo = json.loads(body)
                    except ValueError:
                        r.echo = body[:200]
                    r.error = None
                    if resp.will_close:
                        conn.close()
                        conn = None
                    break
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conn = None
                    r.error = repr(exc)
                    if attempt == 2 or isinstance(exc, TimeoutError):
                        break
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True, name=f"isolation-{i}") for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
