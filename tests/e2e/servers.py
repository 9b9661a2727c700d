"""Controllable loopback HTTP servers for the end-to-end tests.

* ``TokenServer``  - a fake OAuth 2.0 token endpoint (RFC 6749 section 4.4 / 5.1).
* ``EchoUpstream`` - the protected upstream; echoes what it received as JSON.

Both bind 127.0.0.1 on a free port chosen by the kernel (port 0, so there is
no race), answer HTTP/1.1 with keep-alive and an exact Content-Length, record
every request thread-safely, and are tuned so that they, not Envoy, are never
the bottleneck: ``request_queue_size`` raised, Nagle off, daemon threads, the
whole response written with a single ``sendall``.

Only the standard library is used.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

__all__ = [
    "Recorded",
    "TokenServer",
    "EchoUpstream",
    "json_body",
]

# --------------------------------------------------------------------------- #
# Recorded requests
# --------------------------------------------------------------------------- #


@dataclass
class Recorded:
    """One request as the server saw it."""

    method: str
    target: str  # raw request-target, e.g. "/oauth2/token?x=1"
    path: str  # target without the query string
    query: dict[str, str]  # parsed query, last value wins
    query_multi: dict[str, list[str]]  # parsed query, every value
    headers: dict[str, str]  # lower-cased names; repeated headers joined by ", "
    header_list: list[tuple[str, str]]  # (name as sent, value), in order
    body: bytes
    form: dict[str, str]  # parsed x-www-form-urlencoded body, last value wins
    form_multi: dict[str, list[str]]
    time: float  # time.monotonic() when the request head was read
    client: tuple[str, int] = ("", 0)
    index: int = 0  # 0-based arrival order on this server

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        name = name.lower()
        return [v for k, v in self.header_list if k.lower() == name]

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def basic_auth(self, *, form_decode: bool = True) -> tuple[str, str] | None:
        """Decode ``Authorization: Basic``.

        RFC 6749 section 2.3.1 says client_id and client_secret are
        form-urlencoded before base64; ``form_decode`` undoes that.
        Returns None when there is no Basic header.
        """
        value = self.headers.get("authorization", "")
        scheme, _, b64 = value.partition(" ")
        if scheme.lower() != "basic":
            return None
        raw = base64.b64decode(b64.strip()).decode("utf-8")
        user, _, password = raw.partition(":")
        if form_decode:
            user = urllib.parse.unquote_plus(user)
            password = urllib.parse.unquote_plus(password)
        return user, password

    def json(self) -> Any:
        return json.loads(self.body)

    def summary(self) -> str:
        """One line for failure reports."""
        body = self.body[:200].decode("utf-8", "replace")
        return f"#{self.index} t={self.time:.3f} {self.method} {self.target} body={body!r}"


def _parse_qs(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    multi = urllib.parse.parse_qs(text, keep_blank_values=True)
    return {k: v[-1] for k, v in multi.items()}, multi


def json_body(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def token_by_scope(token_server) -> None:
    """Make ``token_server`` issue tokens named after the scope they were issued for:
    ``tok-<scope>-<n>``, n counting per scope (an hour's lifetime)."""
    lock = threading.Lock()
    counts: dict[str, int] = {}

    def handler(rec):
        scope = rec.form.get("scope", "?")
        with lock:
            counts[scope] = counts.get(scope, 0) + 1
            tok = f"tok-{scope}-{counts[scope]}"
        return 200, [("Content-Type", "application/json")], json_body(
            {"access_token": tok, "token_type": "Bearer", "expires_in": 3600})

    token_server.set_handler(handler)


# --------------------------------------------------------------------------- #
# Server plumbing shared by both servers
# --------------------------------------------------------------------------- #


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler_cls, owner: "_RecordingServer"):
        self.owner = owner
        super().__init__(addr, handler_cls)

    def get_request(self):
        sock, addr = super().get_request()
        # TLS: the handshake runs in the handler thread (see _Handler.setup),
        # not here in the accept loop, so one slow client cannot stall accept().
        if self.owner.ssl_context is not None:
            sock = self.owner.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # TCP_NODELAY on accepted sockets
    server_version = "oauth2-cc-e2e"
    sys_version = ""
    server: _HTTPServer

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)

    def log_message(self, format, *args):  # silence per-request logging
        pass

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until an empty line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after the chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self):
        now = time.monotonic()
        body = self._read_body()
        header_list = list(self.headers.items())
        headers: dict[str, str] = {}
        for k, v in header_list:
            k = k.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        path, _, qs = self.path.partition("?")
        query, query_multi = _parse_qs(qs)
        ctype = headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
            form, form_multi = _parse_qs(body.decode("utf-8", "replace"))
        else:
            form, form_multi = {}, {}
        rec = Recorded(
            method=self.command,
            target=self.path,
            path=path,
            query=query,
            query_multi=query_multi,
            headers=headers,
            header_list=header_list,
            body=body,
            form=form,
            form_multi=form_multi,
            time=now,
            client=self.client_address,
        )
        try:
            status, resp_headers, resp_body = self.server.owner._dispatch(rec)
        except Exception:  # a test's handler raised: answer 500, keep the traceback
            tb = traceback.format_exc()
            self.server.owner._error(tb)
            status, resp_headers, resp_body = 500, [("Content-Type", "text/plain")], tb.encode()
        self._send(status, resp_headers, resp_body)

    def _send(self, status: int, headers: Iterable[tuple[str, str]] | dict, body: bytes):
        if isinstance(headers, dict):
            headers = list(headers.items())
        try:
            reason = self.responses[status][0]
        except KeyError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}"]
        names = set()
        for k, v in headers:
            names.add(k.lower())
            lines.append(f"{k}: {v}")
        if "content-length" not in names and status >= 200 and status not in (204, 304):
            lines.append(f"Content-Length: {len(body)}")
        if "date" not in names:
            lines.append(f"Date: {self.date_time_string()}")
        conn_hdr = next((v for k, v in headers if k.lower() == "connection"), None)
        if conn_hdr is None and self.close_connection:
            lines.append("Connection: close")
        elif conn_hdr is not None and conn_hdr.lower() == "close":
            self.close_connection = True
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.command == "HEAD":
            body = b""
        self.wfile.write(head + body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

    def __getattr__(self, name: str):
        # Any other method (PURGE, an extension method) is recorded and answered too, not 501.
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)


# http.server reads request heads with http.client's limit of 100 header fields (and answers 431
# beyond it); the hostile-client tests send 100 repeats of one header plus the usual ones.
# Envoy joins repeated inline headers (Authorization) into one line, beyond http.client's 64 KiB.
http.client._MAXHEADERS = max(getattr(http.client, "_MAXHEADERS", 100), 1000)
http.client._MAXLINE = max(getattr(http.client, "_MAXLINE", 65536), 4 << 20)

Handler = Callable[[Recorded], tuple[int, Any, Any]]


class _RecordingServer:
    """Base: a ThreadingHTTPServer in a background thread that records requests.

    ``ssl_context``: pass a server-side ``ssl.SSLContext`` to serve HTTPS
    (for the mTLS / TLS token-cluster tests); None serves plain HTTP.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None):
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._requests: list[Recorded] = []
        self._conns: set[socket.socket] = set()
        self.errors: list[str] = []  # tracebacks of handlers that raised (answered 500)
        self._stopping = threading.Event()
        self._delay = 0.0
        self._httpd = _HTTPServer((host, port), _Handler, self)
        self.host, self.port = self._httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"{type(self).__name__}:{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self):
        self._stopping.set()  # wakes handlers sleeping in set_delay
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # unblock keep-alive handler threads
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def _track(self, conn, add: bool):
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # -- recording ---------------------------------------------------------
    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    def last(self) -> Recorded:
        with self._lock:
            return self._requests[-1]

    def clear(self):
        """Forget recorded requests (behaviour unchanged)."""
        with self._lock:
            self._requests.clear()

    def wait_for_count(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` requests were recorded; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def set_delay(self, seconds: float):
        """Sleep this long before answering each request (0 = no delay)."""
        with self._lock:
            self._delay = float(seconds)

    def _error(self, tb: str):
        with self._lock:
            self.errors.append(tb)

    def _record(self, rec: Recorded):
        with self._cond:
            rec.index = len(self._requests)
            self._requests.append(rec)
            self._cond.notify_all()

    def _dispatch(self, rec: Recorded) -> tuple[int, Any, bytes]:
        self._record(rec)
        with self._lock:
            delay = self._delay
        if delay > 0:
            self._stopping.wait(delay)
        status, headers, body = self._respond(rec)
        return _normalise(status, headers, body)

    def _respond(self, rec: Recorded) -> tuple[int, Any, Any]:  # pragma: no cover
        raise NotImplementedError


def _normalise(status: int, headers: Any, body: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    hdrs: list[tuple[str, str]] = []
    if isinstance(headers, dict):
        hdrs = [(str(k), str(v)) for k, v in headers.items()]
    elif headers:
        hdrs = [(str(k), str(v)) for k, v in headers]
    if body is None:
        body = b""
    elif isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, (bytes, bytearray)):
        body = json_body(body)
        if not any(k.lower() == "content-type" for k, _ in hdrs):
            hdrs.append(("Content-Type", "application/json"))
    return int(status), hdrs, bytes(body)


# --------------------------------------------------------------------------- #
# Token server
# --------------------------------------------------------------------------- #

_OMIT = object()


class TokenServer(_RecordingServer):
    """Fake token endpoint.

    Default answer: ``200 {"access_token": "tok-<n>", "token_type": "Bearer",
    "expires_in": <expires_in>}`` with n = 1, 2, ... per issued token.

    Precedence for each request: a queued one-shot reply (``queue_response`` /
    ``fail_next``) > ``set_handler`` > ``set_response`` > the default token.
    The path is not checked: any path answers (assert on ``requests``).
    """

    def __init__(self, *args, expires_in: Any = 3600, **kw):
        super().__init__(*args, **kw)
        self._initial_expires_in = expires_in
        self._reset_behaviour()

    def _reset_behaviour(self):
        self._expires_in: Any = self._initial_expires_in
        self._fixed: tuple[int, Any, Any] | None = None
        self._handler: Handler | None = None
        self._queue: list[tuple[int, Any, Any]] = []
        self._issued: list[str] = []
        self._token_type = "Bearer"
        self._extra: dict[str, Any] = {}
        self._delay = 0.0

    # -- controls ----------------------------------------------------------
    def reset(self):
        """Back to the default behaviour; forget requests and issued tokens."""
        with self._lock:
            self._reset_behaviour()
            self._requests.clear()

    def set_expires_in(self, value: Any):
        """``expires_in`` of default replies: any JSON value; None omits the field."""
        with self._lock:
            self._expires_in = _OMIT if value is None else value

    def set_token_fields(self, token_type: str | None = "Bearer", **extra: Any):
        """Change ``token_type`` (None omits it) and add fields to default replies."""
        with self._lock:
            self._token_type = token_type
            self._extra = dict(extra)

    def set_response(self, status: int, body: Any, headers: Any = None):
        """Answer every request with this fixed reply. body: bytes, str or a JSON-able object."""
        with self._lock:
            self._fixed = (status, headers, body)

    def clear_response(self):
        with self._lock:
            self._fixed = None

    def set_handler(self, handler: Handler | None):
        """``handler(recorded) -> (status, headers, body)``; None removes it.

        Runs on the server's handler thread. Call ``next_token()`` from it to
        mint a default-style token that is counted in ``issued_tokens()``.
        """
        with self._lock:
            self._handler = handler

    def queue_response(self, status: int, body: Any, headers: Any = None, times: int = 1):
        """One-shot replies used before anything else, in FIFO order."""
        with self._lock:
            self._queue.extend([(status, headers, body)] * times)

    def fail_next(self, n: int = 1, status: int = 503, body: Any = None, headers: Any = None):
        """The next ``n`` requests get ``status`` (default body: an RFC 6749 error)."""
        if body is None:
            body = {"error": "temporarily_unavailable"} if status >= 500 else {"error": "invalid_client"}
        self.queue_response(status, body, headers, times=n)

    # -- inspection --------------------------------------------------------
    def issued_tokens(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    def last_token(self) -> str | None:
        with self._lock:
            return self._issued[-1] if self._issued else None

    def next_token(self) -> str:
        """Mint and record the next ``tok-<n>``."""
        with self._lock:
            tok = f"tok-{len(self._issued) + 1}"
            self._issued.append(tok)
            return tok

    def token_body(self, token: str | None = None) -> dict[str, Any]:
        """The default success body (mints a token when none is given)."""
        if token is None:
            token = self.next_token()
        with self._lock:
            body: dict[str, Any] = {"access_token": token}
            if self._token_type is not None:
                body["token_type"] = self._token_type
            if self._expires_in is not _OMIT:
                body["expires_in"] = self._expires_in
            body.update(self._extra)
        return body

    # -- answering ---------------------------------------------------------
    def _respond(self, rec: Recorded):
        with self._lock:
            queued = self._queue.pop(0) if self._queue else None
            handler, fixed = self._handler, self._fixed
        if queued is not None:
            return queued[0], queued[1], queued[2]
        if handler is not None:
            return handler(rec)
        if fixed is not None:
            return fixed[0], fixed[1], fixed[2]
        return self._default_reply(rec)

    def _default_reply(self, rec: Recorded) -> tuple[int, Any, Any]:
        """The answer when no queued reply, handler or fixed reply applies (a subclass's grant)."""
        return (
            200,
            [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
            json_body(self.token_body()),
        )


# --------------------------------------------------------------------------- #
# Echo upstream
# --------------------------------------------------------------------------- #


class EchoUpstream(_RecordingServer):
    """The protected service. Answers 200 with a JSON echo of the request:

    ``{"method", "path", "query", "headers": {lower-cased name: value},
    "header_list": [[name, value], ...], "body"}``.

    ``fail_next(n, status=401)`` makes the next n requests get ``status``
    (with an RFC 6750 ``WWW-Authenticate`` header for 401s), e.g. for tests of
    purging a token the upstream rejected.
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._fail: list[tuple[int, Any, Any]] = []
        self._handler: Handler | None = None

    def reset(self):
        with self._lock:
            self._fail.clear()
            self._handler = None
            self._delay = 0.0
            self._requests.clear()

    def fail_next(self, n: int = 1, status: int = 401, body: Any = None, headers: Any = None):
        if headers is None and status == 401:
            headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        if body is None:
            body = {"error": "rejected by EchoUpstream.fail_next", "status": status}
        with self._lock:
            self._fail.extend([(status, headers, body)] * n)

    def set_handler(self, handler: Handler | None):
        """Full control: ``handler(recorded) -> (status, headers, body)``."""
        with self._lock:
            self._handler = handler

    def authorizations(self) -> list[str | None]:
        """The Authorization header of each recorded request (None if absent)."""
        return [r.headers.get("authorization") for r in self.requests]

    def _respond(self, rec: Recorded):
        with self._lock:
            fail = self._fail.pop(0) if self._fail else None
            handler = self._handler
        if fail is not None:
            return fail
        if handler is not None:
            return handler(rec)
        return 200, [("Content-Type", "application/json")], self.echo(rec)

    @staticmethod
    def echo(rec: Recorded) -> dict[str, Any]:
        return {
            "method": rec.method,
            "path": rec.target,
            "query": rec.query_multi,
            "headers": rec.headers,
            "header_list": [[k, v] for k, v in rec.header_list],
            "body": rec.body.decode("utf-8", "replace"),
        }


# --------------------------------------------------------------------------- #
# An IdP that stamps whole-second iat/exp
# --------------------------------------------------------------------------- #


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jws_payload(token: str) -> dict[str, Any] | None:
    """The decoded payload of a JWS-shaped token (``header.payload.signature``), else None.
    No signature check."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None


class WholeSecondIssuer:
    """``TokenServer.set_handler`` handler: an IdP whose clock has whole seconds, as many real ones
    (oidc-provider, an OpenID-certified server): ``iat = floor(now)``, ``exp = iat + lifetime`` and
    ``expires_in = lifetime``, so a token lives up to 1 s less than ``expires_in`` says.

    ``jws=True``: access tokens are JWS-shaped (``header.payload.signature``, base64url, the
    signature does not verify) with ``iat``/``exp`` in the payload; ``jws=False``: opaque tokens,
    the expiry known only here (``expiry[token]``).

    ``lifetimes``: the lifetimes (s) it chooses from. ``steer``: choose them so that the short-life
    case happens on most fetches instead of by chance: when ``now``'s fraction of a second is at
    least ``late_fraction`` it issues the shortest lifetime (the token then dies before a refresh at
    80 % of ``expires_in`` would replace it); otherwise it picks the lifetime whose refresh (at
    ``refresh_ratio`` of it, plus ``refresh_lag_s``) would land late in a second. Any lifetime it
    picks is one an IdP may legitimately issue; only the order is chosen.
    """

    def __init__(self, server: "TokenServer", *, jws: bool = True, lifetimes: Iterable[int] = (3, 4, 5),
                 steer: bool = True, late_fraction: float = 0.7, refresh_ratio: float = 0.8,
                 refresh_lag_s: float = 0.08):
        self.server = server
        self.jws = jws
        self.lifetimes = sorted(lifetimes)
        self.steer = steer
        self.late_fraction = late_fraction
        self.refresh_ratio = refresh_ratio
        self.refresh_lag_s = refresh_lag_s
        self._lock = threading.Lock()
        self.expiry: dict[str, int] = {}  # token -> exp (Unix seconds)
        self.log: list[tuple[float, int, int, str]] = []  # (issued at, lifetime, exp, token)
        self._turn = 0

    def _lifetime(self, now: float) -> int:
        frac = now - int(now)
        if not self.steer:
            self._turn += 1
            return self.lifetimes[self._turn % len(self.lifetimes)]
        if frac >= self.late_fraction:
            return self.lifetimes[0]

        def distance(life: int) -> float:
            nxt = (frac + self.refresh_ratio * life + self.refresh_lag_s) % 1.0
            return abs(nxt - (self.late_fraction + 1.0) / 2)

        return min(self.lifetimes, key=distance)

    def __call__(self, rec: Recorded) -> tuple[int, Any, Any]:
        now = time.time()
        life = self._lifetime(now)
        iat = int(now)
        exp = iat + life
        with self._lock:
            n = len(self.log) + 1
            if self.jws:
                header = {"alg": "RS256", "typ": "at+jwt", "kid": "whole-second"}
                payload = {"iss": "http://idp.test", "sub": "svc-a", "aud": "api", "client_id": "svc-a",
                           "iat": iat, "exp": exp, "jti": f"t{n}"}
                token = ".".join([b64url(json_body(header)), b64url(json_body(payload)),
                                  b64url(f"not-a-signature-{n}".encode())])
            else:
                token = f"opaque-{n}"
            self.expiry[token] = exp
            self.log.append((now, life, exp, token))
        with self.server._lock:
            self.server._issued.append(token)  # visible in issued_tokens()
        body = {"access_token": token, "token_type": "Bearer", "expires_in": life}
        return 200, [("Content-Type", "application/json"), ("Cache-Control", "no-store")], json_body(body)
