"""An OAuth 2.0 token-exchange server (RFC 8693) for the end-to-end tests.

``ExchangeServer`` is a ``servers.TokenServer`` (same HTTP plumbing, recording, ``set_delay``,
``fail_next``, ``queue_response``, ``set_handler``, ``set_response``) that also issues and
exchanges subject tokens:

* ``mint_subject(sub, exp_in=...)`` signs a subject token (an ES256 JWS with ``iss``, ``sub``,
  ``aud``, ``iat``, ``exp``) with a key only this server holds; ``jwks()`` / ``jwks_json()`` is its
  public half, for Envoy's ``jwt_authn`` (``local_jwks``). ``mint_foreign`` signs with another key.
* A ``grant_type=urn:ietf:params:oauth:grant-type:token-exchange`` request is checked as an IdP
  would: client authentication (``client_secret_basic`` or ``client_secret_post`` against
  ``clients``; a client in ``clients`` with secret None is public and sends only ``client_id``),
  the parameters of RFC 8693 section 2.1, the subject token (signature by this server's key,
  ``exp``, ``subject_token_type``), the actor token when one is sent (a token this server issued),
  and the audience and resource against the refused ones. It answers per section 2.2.1
  (``access_token``, ``issued_token_type``, ``token_type``, ``expires_in``, ``scope`` when one was
  asked for; never a ``refresh_token``) or errs per section 2.2.2 (400 ``invalid_request``,
  ``invalid_target`` for a refused audience or resource; a bad subject token gets
  ``bad_subject_error``, ``invalid_request`` by default as section 2.2.2 says, ``invalid_grant``
  as some IdPs answer).
* An exchanged token names its subject: ``ex-<sub>-<n>`` (the n-th token issued for ``sub``), or
  with ``set_issue_jws(True)`` a JWS with ``sub`` and, when an actor token was sent, ``act``.
  ``subject_of(token)`` reads the subject back from either form.
* Every exchange request is recorded as an ``Exchange`` (subject, audience, resource, scope,
  actor token, the answer) and counted per subject, thread-safely: ``exchanges()``,
  ``exchange_counts()``, ``issued_counts()``, ``wait_for_exchanges(n)``.
* Any other grant gets ``TokenServer``'s default token (``tok-<n>``), so one server can also hand
  a workload its own client-credentials token (an actor token).

Controls for the tests: ``set_exchange_delay`` (seconds, or per subject), ``force_error`` (every
exchange errs until cleared), ``set_exchange_expires_in`` (a value, or per call),
``refuse_targets`` (audiences / resources answered with ``invalid_target``),
``set_granted_scope``, ``set_clients``.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from servers import Recorded, TokenServer, json_body

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"

ISSUER = "https://subjects.idp.test"
SUBJECT_AUDIENCE = "oauth2-cc-e2e"
EXCHANGED_PREFIX = "ex-"
DEFAULT_CLIENTS: Mapping[str, str | None] = {"svc-a": "s3cret"}  # plugin_config's defaults

_JSON_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store"), ("Pragma", "no-cache")]


class SigningKey:
    """An ES256 key pair with a ``kid``: mints JWS tokens, verifies them, publishes a JWKS."""

    def __init__(self, kid: str):
        self.kid = kid
        self._private = ec.generate_private_key(ec.SECP256R1())
        self.public = self._private.public_key()

    def sign(self, claims: Mapping[str, Any], typ: str = "JWT") -> str:
        return pyjwt.encode(dict(claims), self._private, algorithm="ES256", headers={"kid": self.kid, "typ": typ})

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of ``token`` when this key signed it and it has not expired; raises
        ``jwt.PyJWTError`` otherwise (no audience check: the subject token's audience is the
        client's business, not the exchange's)."""
        header = pyjwt.get_unverified_header(token)
        if header.get("kid") != self.kid:
            raise pyjwt.InvalidKeyError(f"unknown kid {header.get('kid')!r}")
        return pyjwt.decode(token, self.public, algorithms=["ES256"],
                            options={"require": ["exp", "sub"], "verify_aud": False})

    def jwk(self) -> dict[str, Any]:
        return {**ECAlgorithm.to_jwk(self.public, as_dict=True), "kid": self.kid, "alg": "ES256", "use": "sig"}


@dataclass
class Exchange:
    """One token-exchange request as the server judged it."""

    index: int  # 0-based, in arrival order of exchange requests
    time: float  # time.monotonic() when it was judged
    client_id: str | None
    subject: str | None  # the verified subject token's ``sub``; None when it did not verify
    subject_token: str
    subject_token_type: str | None
    actor_token: str | None
    actor_token_type: str | None
    actor: str | None  # the actor token's subject (its ``sub``, or the client it was issued to)
    audience: list[str]
    resource: list[str]
    scope: str | None
    requested_token_type: str | None
    status: int = 0
    error: str | None = None  # the OAuth error code answered, None on success
    access_token: str | None = None  # the token issued, None on an error
    expires_in: Any = None
    form: dict[str, list[str]] = field(default_factory=dict)  # every form parameter sent


class OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400, headers: Iterable[tuple[str, str]] = ()):
        super().__init__(description)
        self.error, self.description, self.status, self.headers = error, description, status, list(headers)


def _one(form: Mapping[str, list[str]], name: str) -> str | None:
    """A parameter that may appear at most once (RFC 6749 section 3.2: repeated is invalid)."""
    values = form.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise OAuthError("invalid_request", f"{name} repeated")
    return values[0]


class ExchangeServer(TokenServer):
    """A TokenServer that also implements RFC 8693 token exchange (see the module doc)."""

    def __init__(self, *args: Any, clients: Mapping[str, str | None] | None = DEFAULT_CLIENTS,
                 subject_token_types: Iterable[str] = (ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE),
                 issuer: str = ISSUER, **kw: Any):
        self.issuer = issuer
        self.key = SigningKey("subject-signer")
        self.foreign_key = SigningKey("subject-signer")  # same kid, other key: a forged token
        self._initial_clients = None if clients is None else dict(clients)
        self._initial_subject_types = tuple(subject_token_types)
        super().__init__(*args, **kw)

    def _reset_behaviour(self):
        super()._reset_behaviour()
        self._clients = None if self._initial_clients is None else dict(self._initial_clients)
        self._subject_types = set(self._initial_subject_types)
        self._exchanges: list[Exchange] = []
        self._calls: dict[str | None, int] = {}
        self._issued_per_subject: dict[str, int] = {}
        self._exchange_expires_in: Any = 3600
        self._exchange_delay: float | Callable[[str | None], float] = 0.0
        self._forced: tuple[str, int, str] | None = None
        self._refused_audiences: set[str] = set()
        self._refused_resources: set[str] = set()
        self._granted_scope: Any = None  # None: echo the requested scope
        self._bad_subject_error = "invalid_request"
        self._issue_jws = False
        self._jti = itertools.count(1)

    # -- subject tokens ----------------------------------------------------
    def mint_subject(self, sub: str, exp_in: float = 3600.0, *, exp: int | None = None,
                     aud: str | list[str] | None = SUBJECT_AUDIENCE, **claims: Any) -> str:
        """A subject token for ``sub`` signed with this server's key: ``exp`` = now + ``exp_in``
        (whole seconds, rounded down) unless ``exp`` is given; ``claims`` add or replace claims."""
        now = int(time.time())
        body: dict[str, Any] = {"iss": self.issuer, "sub": sub, "iat": now, "exp": exp if exp is not None else int(now + exp_in),
                                "jti": f"s{next(self._jti)}"}
        if aud is not None:
            body["aud"] = aud
        body.update(claims)
        return self.key.sign({k: v for k, v in body.items() if v is not None})

    def mint_foreign(self, sub: str, exp_in: float = 3600.0, **claims: Any) -> str:
        """Like ``mint_subject`` but signed with a key this server does not trust (same ``kid``)."""
        now = int(time.time())
        return self.foreign_key.sign({"iss": self.issuer, "sub": sub, "aud": SUBJECT_AUDIENCE, "iat": now,
                                      "exp": int(now + exp_in), **claims})

    def jwks(self) -> dict[str, Any]:
        """The JWKS that verifies ``mint_subject``'s tokens (not ``mint_foreign``'s)."""
        return {"keys": [self.key.jwk()]}

    def jwks_json(self) -> str:
        return json.dumps(self.jwks())

    # -- controls ----------------------------------------------------------
    def set_clients(self, clients: Mapping[str, str | None] | None):
        """client_id -> secret (None: a public client); None accepts any client unchecked."""
        with self._lock:
            self._clients = None if clients is None else dict(clients)

    def set_subject_token_types(self, *types: str):
        with self._lock:
            self._subject_types = set(types)

    def set_exchange_expires_in(self, value: Any):
        """``expires_in`` of exchanged tokens: a JSON value, None (omitted), or a function of the
        ``Exchange`` being answered returning one of those."""
        with self._lock:
            self._exchange_expires_in = value

    def set_exchange_delay(self, seconds: float | Callable[[str | None], float]):
        """Wait this long before answering an exchange (a function of the subject: per subject).
        ``set_delay`` delays every answer, before anything is judged."""
        with self._lock:
            self._exchange_delay = seconds

    def force_error(self, error: str | None, status: int = 400, description: str = "forced by the test"):
        """Every exchange (after client authentication and the subject token's check, so it is
        counted for its subject) errs with ``error`` until ``force_error(None)``."""
        with self._lock:
            self._forced = None if error is None else (error, status, description)

    def refuse_targets(self, audiences: Iterable[str] = (), resources: Iterable[str] = ()):
        """An exchange asking for any of these audiences or resources gets ``invalid_target``."""
        with self._lock:
            self._refused_audiences = set(audiences)
            self._refused_resources = set(resources)

    def set_granted_scope(self, scope: Any):
        """The ``scope`` of the answer: None echoes the requested scope (omitted when none was
        asked for); a string answers that instead (RFC 8693: required when it differs)."""
        with self._lock:
            self._granted_scope = scope

    def set_bad_subject_error(self, error: str):
        """The error code for a subject or actor token that does not verify."""
        with self._lock:
            self._bad_subject_error = error

    def set_issue_jws(self, on: bool = True):
        """Exchanged tokens as JWS (``sub``, ``act``, ``aud``, ``scope``, ``exp``) instead of
        ``ex-<sub>-<n>``."""
        with self._lock:
            self._issue_jws = on

    # -- inspection --------------------------------------------------------
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    def exchange_counts(self) -> dict[str | None, int]:
        """Exchange requests per subject (whatever the answer); None counts the requests whose
        subject token did not verify or was missing."""
        with self._lock:
            return dict(self._calls)

    def issued_counts(self) -> dict[str, int]:
        """Exchanged tokens issued per subject."""
        with self._lock:
            return dict(self._issued_per_subject)

    def wait_for_exchanges(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` exchange requests were judged; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._exchanges) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def subject_of(self, token: str | None) -> str | None:
        """The subject an exchanged token was issued for (either form); None for anything else."""
        if not token:
            return None
        if token.startswith(EXCHANGED_PREFIX) and "." not in token:
            sub, sep, n = token[len(EXCHANGED_PREFIX):].rpartition("-")
            return sub if sep and n.isdigit() else None
        try:
            claims = self.key.verify(token)
        except pyjwt.PyJWTError:
            return None
        return claims.get("sub") if claims.get("iss") == self.issuer and "exchanged" in claims else None

    # -- answering ---------------------------------------------------------
    def _default_reply(self, rec: Recorded) -> tuple[int, Any, Any]:
        grant = (rec.form_multi.get("grant_type") or [None])[-1]
        if grant not in (TOKEN_EXCHANGE_GRANT, "client_credentials"):
            return 400, _JSON_HEADERS, json_body({"error": "unsupported_grant_type"})
        try:
            client_id = self._authenticate(rec)
        except OAuthError as e:
            return e.status, _JSON_HEADERS + e.headers, json_body({"error": e.error, "error_description": e.description})
        if grant == "client_credentials":
            return super()._default_reply(rec)
        return self._exchange(rec, client_id)

    def _authenticate(self, rec: Recorded) -> str | None:
        """The authenticated client_id (RFC 6749 section 2.3.1: one method per request)."""
        with self._lock:
            clients = self._clients
        basic = rec.basic_auth()
        form_id, form_secret = _one(rec.form_multi, "client_id"), _one(rec.form_multi, "client_secret")
        if clients is None:
            return basic[0] if basic else form_id
        if basic is not None and form_secret is not None:
            raise OAuthError("invalid_request", "more than one client authentication method")
        challenge = [("WWW-Authenticate", 'Basic realm="token"')]
        if basic is not None:
            cid, secret = basic
            if cid in clients and clients[cid] is not None and clients[cid] == secret:
                return cid
            raise OAuthError("invalid_client", "client authentication failed", 401, challenge)
        if form_id is not None and form_id in clients:
            want = clients[form_id]
            if (want is None and form_secret is None) or (want is not None and form_secret == want):
                return form_id
        raise OAuthError("invalid_client", "client authentication failed", 401, challenge)

    def _exchange(self, rec: Recorded, client_id: str | None) -> tuple[int, Any, Any]:
        form = rec.form_multi
        ex = Exchange(index=0, time=time.monotonic(), client_id=client_id, subject=None,
                      subject_token=(form.get("subject_token") or [""])[0],
                      subject_token_type=(form.get("subject_token_type") or [None])[0],
                      actor_token=(form.get("actor_token") or [None])[0],
                      actor_token_type=(form.get("actor_token_type") or [None])[0], actor=None,
                      audience=list(form.get("audience", [])), resource=list(form.get("resource", [])),
                      scope=(form.get("scope") or [None])[0],
                      requested_token_type=(form.get("requested_token_type") or [None])[0],
                      form={k: list(v) for k, v in form.items()})
        try:
            refusal: OAuthError | None = None
            try:
                self._judge(ex)
            except OAuthError as e:
                refusal = e
            delay = self._delay_for(ex.subject)
            if delay > 0:
                self._stopping.wait(delay)  # an answer, success or error, comes late
            if refusal is not None:
                ex.status, ex.error = refusal.status, refusal.error
                return refusal.status, _JSON_HEADERS + refusal.headers, json_body(
                    {"error": refusal.error, "error_description": refusal.description})
            body = self._issue(ex)
            ex.status = 200
            return 200, _JSON_HEADERS, json_body(body)
        finally:
            with self._cond:
                ex.index = len(self._exchanges)
                self._exchanges.append(ex)
                self._calls[ex.subject] = self._calls.get(ex.subject, 0) + 1
                self._cond.notify_all()

    def _judge(self, ex: Exchange):
        """Raises the OAuthError RFC 8693 section 2.2.2 calls for, if any; sets ``ex.subject`` as
        soon as the subject token verified."""
        form = ex.form
        for name in ("subject_token", "subject_token_type", "actor_token", "actor_token_type", "scope",
                     "requested_token_type"):
            _one(form, name)
        with self._lock:
            types, bad_subject = set(self._subject_types), self._bad_subject_error
            refused_aud, refused_res = set(self._refused_audiences), set(self._refused_resources)
            forced = self._forced
        if not ex.subject_token:
            raise OAuthError("invalid_request", "subject_token is required")
        if not ex.subject_token_type:
            raise OAuthError("invalid_request", "subject_token_type is required")
        if (ex.actor_token is None) != (ex.actor_token_type is None):
            raise OAuthError("invalid_request", "actor_token and actor_token_type go together")
        if ex.subject_token_type not in types:
            raise OAuthError("invalid_request", "unsupported subject_token_type")
        try:
            claims = self.key.verify(ex.subject_token)
        except pyjwt.ExpiredSignatureError:
            raise OAuthError(bad_subject, "subject token expired")
        except pyjwt.PyJWTError:
            raise OAuthError(bad_subject, "subject token invalid")
        if claims.get("iss") != self.issuer:
            raise OAuthError(bad_subject, "subject token from another issuer")
        ex.subject = str(claims["sub"])
        if ex.actor_token is not None:
            ex.actor = self._actor_of(ex.actor_token)
            if ex.actor is None:
                raise OAuthError(bad_subject, "actor token invalid")
        if ex.requested_token_type not in (None, ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE):
            raise OAuthError("invalid_request", "unsupported requested_token_type")
        if refused_aud.intersection(ex.audience) or refused_res.intersection(ex.resource):
            raise OAuthError("invalid_target", "audience or resource refused")
        if forced is not None:
            raise OAuthError(forced[0], forced[2], forced[1])

    def _actor_of(self, token: str) -> str | None:
        """Who an actor token stands for: a token this server issued (a client-credentials
        ``tok-<n>``: its client; a JWS: its ``sub``); None when it issued no such token."""
        with self._lock:
            issued = token in self._issued
        if issued:
            return f"client:{token}"
        try:
            return str(self.key.verify(token)["sub"])
        except pyjwt.PyJWTError:
            return None

    def _delay_for(self, sub: str | None) -> float:
        with self._lock:
            d = self._exchange_delay
        return float(d(sub) if callable(d) else d)

    def _issue(self, ex: Exchange) -> dict[str, Any]:
        with self._lock:
            n = self._issued_per_subject.get(ex.subject, 0) + 1
            self._issued_per_subject[ex.subject] = n
            expires_in, granted, as_jws = self._exchange_expires_in, self._granted_scope, self._issue_jws
        if callable(expires_in):
            expires_in = expires_in(ex)
        scope = ex.scope if granted is None else granted
        token = f"{EXCHANGED_PREFIX}{ex.subject}-{n}"
        if as_jws:
            now = int(time.time())
            claims: dict[str, Any] = {"iss": self.issuer, "sub": ex.subject, "iat": now, "exchanged": n,
                                      "exp": now + int(expires_in if isinstance(expires_in, (int, float)) else 3600)}
            if ex.actor is not None:
                claims["act"] = {"sub": ex.actor}
            if ex.audience or ex.resource:
                claims["aud"] = (ex.audience + ex.resource)[0] if len(ex.audience + ex.resource) == 1 else ex.audience + ex.resource
            if scope:
                claims["scope"] = scope
            token = self.key.sign(claims, typ="at+jwt")
        ex.access_token, ex.expires_in = token, expires_in
        body: dict[str, Any] = {"access_token": token,
                                "issued_token_type": JWT_TOKEN_TYPE if ex.requested_token_type == JWT_TOKEN_TYPE else ACCESS_TOKEN_TYPE,
                                "token_type": "Bearer"}
        if expires_in is not None:
            body["expires_in"] = expires_in
        if scope:
            body["scope"] = scope
        return body


def exchange_form(subject_token: str, subject_token_type: str = ACCESS_TOKEN_TYPE, **params: Any) -> str:
    """An x-www-form-urlencoded exchange request body (lists repeat their parameter)."""
    pairs: list[tuple[str, str]] = [("grant_type", TOKEN_EXCHANGE_GRANT), ("subject_token", subject_token),
                                    ("subject_token_type", subject_token_type)]
    for k, v in params.items():
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            pairs.append((k, str(item)))
    return urllib.parse.urlencode(pairs)


def basic(client_id: str, secret: str) -> str:
    """An ``Authorization: Basic`` value, id and secret form-encoded first (RFC 6749 2.3.1)."""
    raw = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return "Basic " + base64.b64encode(raw.encode()).decode()
