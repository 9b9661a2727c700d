"""Self-tests of the e2e harness. None needs the oauth2-cc filter, except the one
validate test that is skipped when the wasm build is absent."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import ssl
import subprocess
import threading
import time

import pytest

import plugin_config as pc
from conftest import wasm_failures
from envoy import (
    Envoy,
    bootstrap,
    bootstrap_dict,
    direct_route,
    envoy_bin,
    free_port,
    request,
    request_many,
    route,
    wasm_path,
)
from servers import EchoUpstream, TokenServer
from wasm_stub import LOG_CRITICAL, write_stub

pytest_plugins = ["pytester"]

# The harness's own tests run once: they load no oauth2-cc build or a proxy-wasm stub. They run
# on one xdist worker, in file order: test_no_envoy_left_behind, last, then judges them all.
pytestmark = [pytest.mark.wasm_only, pytest.mark.xdist_group("harness")]


def post_form(port, path, form, headers=None, conn=None, tls_context=None):
    own = conn is None
    if own:
        if tls_context is not None:
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=tls_context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    body = "&".join(f"{k}={v}" for k, v in form.items())
    h = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    conn.request("POST", path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read()
    if own:
        conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


# --------------------------------------------------------------------------- #
# TokenServer
# --------------------------------------------------------------------------- #


def test_token_server_default_tokens_and_recording(token_server: TokenServer):
    basic = base64.b64encode(b"svc-a:s3cret").decode()
    st, hdrs, body = post_form(
        token_server.port, "/oauth2/token?x=1",
        {"grant_type": "client_credentials", "scope": "a%20b"},
        headers={"Authorization": f"Basic {basic}", "X-Custom": "v"},
    )
    assert st == 200
    assert hdrs["content-type"] == "application/json"
    assert int(hdrs["content-length"]) == len(body)
    assert json.loads(body) == {"access_token": "tok-1", "token_type": "Bearer", "expires_in": 3600}
    st, _, body = post_form(token_server.port, "/oauth2/token", {"grant_type": "client_credentials"})
    assert json.loads(body)["access_token"] == "tok-2"

    assert token_server.count() == 2
    assert token_server.issued_tokens() == ["tok-1", "tok-2"]
    r = token_server.requests[0]
    assert (r.method, r.path, r.target) == ("POST", "/oauth2/token", "/oauth2/token?x=1")
    assert r.query == {"x": "1"}
    assert r.form == {"grant_type": "client_credentials", "scope": "a b"}
    assert r.headers["x-custom"] == "v"  # lower-cased names
    assert r.header("X-CUSTOM") == "v"
    assert r.basic_auth() == ("svc-a", "s3cret")
    assert token_server.requests[1].basic_auth() is None
    assert r.time <= token_server.requests[1].time
    assert token_server.wait_for_count(2, timeout=0.1), f"count {token_server.count()}"
    assert not token_server.wait_for_count(3, timeout=0.1), f"count {token_server.count()}"


def test_token_server_expires_in_variants(token_server: TokenServer):
    token_server.set_expires_in("120")
    assert json.loads(post_form(token_server.port, "/t", {})[2])["expires_in"] == "120"
    token_server.set_expires_in(None)
    assert "expires_in" not in json.loads(post_form(token_server.port, "/t", {})[2])
    token_server.set_expires_in(1.5)
    assert json.loads(post_form(token_server.port, "/t", {})[2])["expires_in"] == 1.5
    token_server.set_token_fields(token_type="bearer", scope="read")
    assert json.loads(post_form(token_server.port, "/t", {})[2]) == {
        "access_token": "tok-4", "token_type": "bearer", "expires_in": 1.5, "scope": "read",
    }


def test_token_server_fixed_queued_handler_reset(token_server: TokenServer):
    port = token_server.port
    token_server.set_response(400, {"error": "invalid_client"})
    st, h, body = post_form(port, "/t", {})
    assert (st, json.loads(body)) == (400, {"error": "invalid_client"})
    assert h["content-type"] == "application/json"
    token_server.set_response(200, b"not json", headers={"Content-Type": "text/plain"})
    st, h, body = post_form(port, "/t", {})
    assert (st, body, h["content-type"]) == (200, b"not json", "text/plain")

    # one-shot replies win over the fixed reply, in order
    token_server.fail_next(2, status=503)
    token_server.queue_response(401, {"error": "invalid_client"})
    assert [post_form(port, "/t", {})[0] for _ in range(4)] == [503, 503, 401, 200]

    # a handler wins over the fixed reply and can mint counted tokens
    seen = []

    def handler(rec):
        seen.append(rec.form.get("client_id"))
        return 200, {"Content-Type": "application/json"}, token_server.token_body()

    token_server.set_handler(handler)
    st, _, body = post_form(port, "/t", {"client_id": "c1"})
    assert json.loads(body)["access_token"] == "tok-1" and seen == ["c1"]
    assert token_server.issued_tokens() == ["tok-1"]

    token_server.reset()
    assert token_server.count() == 0 and token_server.issued_tokens() == []
    st, _, body = post_form(port, "/t", {})
    assert json.loads(body)["access_token"] == "tok-1"


def test_token_server_handler_error_is_500(token_server: TokenServer):
    token_server.set_handler(lambda rec: 1 / 0)
    st, _, body = post_form(token_server.port, "/t", {})
    assert st == 500 and b"ZeroDivisionError" in body
    assert len(token_server.errors) == 1


def test_token_server_keepalive_and_chunked(token_server: TokenServer):
    conn = http.client.HTTPConnection("127.0.0.1", token_server.port, timeout=5)
    for i in range(3):  # three requests on one connection
        st, _, body = post_form(token_server.port, "/t", {"i": str(i)}, conn=conn)
        assert st == 200 and json.loads(body)["access_token"] == f"tok-{i + 1}"
    # chunked request body
    conn.putrequest("POST", "/t")
    conn.putheader("Content-Type", "application/x-www-form-urlencoded")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for part in (b"grant_type=client_", b"credentials&a=1"):
        conn.send(b"%x\r\n%s\r\n" % (len(part), part))
    conn.send(b"0\r\n\r\n")
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    conn.close()
    last = token_server.last()
    assert last.form == {"grant_type": "client_credentials", "a": "1"}
    assert {r.client for r in token_server.requests[:3]} == {token_server.requests[0].client}


def test_token_server_delay_and_stop_does_not_hang():
    ts = TokenServer().start()
    ts.set_delay(0.3)
    t0 = time.monotonic()
    assert post_form(ts.port, "/t", {})[0] == 200
    took = time.monotonic() - t0
    assert took >= 0.3, f"answered after {took:.3f} s with a 0.3 s delay"
    ts.set_delay(30)  # a request stuck in the delay must not block stop()
    th = threading.Thread(target=lambda: _swallow(post_form, ts.port, "/t", {}), daemon=True)
    th.start()
    assert ts.wait_for_count(2, timeout=5), f"count {ts.count()}"
    t0 = time.monotonic()
    ts.stop()
    took = time.monotonic() - t0
    assert took < 3, f"stop() took {took:.3f} s with a request stuck in a 30 s delay"


def test_token_server_parallel(token_server: TokenServer):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(32) as ex:
        res = list(ex.map(lambda _: post_form(token_server.port, "/t", {})[0], range(200)))
    assert res == [200] * 200
    assert token_server.count() == 200
    assert len(set(token_server.issued_tokens())) == 200


def _swallow(fn, *a):
    try:
        fn(*a)
    except Exception:
        pass


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_token_server_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=idp.test"],
        check=True, capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    with TokenServer(ssl_context=ctx) as ts:
        assert ts.url.startswith("https://127.0.0.1:")
        client = ssl.create_default_context(cafile=str(cert))
        client.check_hostname = False
        st, _, body = post_form(ts.port, "/t", {"grant_type": "client_credentials"}, tls_context=client)
        assert st == 200 and json.loads(body)["access_token"] == "tok-1"
        # the token cluster built for a TLS server gets a TLS transport socket
        d = bootstrap_dict(None, wasm=False, listener_port=0, admin_port=0, token_clusters={"idp": ts})
        assert d["static_resources"]["clusters"][0]["transport_socket"]["name"] == "envoy.transport_sockets.tls"


# --------------------------------------------------------------------------- #
# EchoUpstream
# --------------------------------------------------------------------------- #


def test_echo_upstream(upstream: EchoUpstream):
    r = request(upstream.port, "/a/b?q=1", {"Authorization": "Bearer x", "X-A": "1"})
    assert r.status == 200
    echo = r.json()
    assert echo["method"] == "GET" and echo["path"] == "/a/b?q=1"
    assert echo["headers"]["authorization"] == "Bearer x" and echo["headers"]["x-a"] == "1"
    assert echo["query"] == {"q": ["1"]}

    upstream.fail_next(2)  # default 401 with WWW-Authenticate
    r1, r2, r3 = (request(upstream.port, "/") for _ in range(3))
    assert (r1.status, r2.status, r3.status) == (401, 401, 200)
    assert r1.headers["www-authenticate"].startswith("Bearer")
    upstream.fail_next(1, status=503)
    assert request(upstream.port, "/").status == 503
    assert upstream.count() == 5
    assert upstream.authorizations()[0] == "Bearer x"
    assert upstream.requests[0].header_values("authorization") == ["Bearer x"]
    r = request(upstream.port, "/p", method="POST", body="hello")
    assert r.json()["body"] == "hello" and r.json()["method"] == "POST"


# --------------------------------------------------------------------------- #
# bootstrap()
# --------------------------------------------------------------------------- #


def test_bootstrap_shape():
    d = bootstrap_dict(
        pc.sample(), listener_port=10000, admin_port=10001,
        token_clusters={"idp": ("127.0.0.1", 9000), "idp2": {"host": "127.0.0.1", "port": 9001, "connect_timeout": "2s"}},
        upstream_port=9002, env={"SECRET": "x"},
        routes=[route("/api", name="api", profile="default"), direct_route("/d", 204, name="d", metadata={"skip": True})],
        reload_base_interval="0.1s",
    )
    assert d["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 10001}
    hcm = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm, router = hcm["http_filters"]
    assert router["name"] == "envoy.filters.http.router"
    plugin = wasm["typed_config"]["config"]
    assert wasm["typed_config"]["@type"] == "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
    assert plugin["name"] == plugin["root_id"] == plugin["vm_config"]["vm_id"] == "oauth2_cc"
    assert plugin["failure_policy"] == "FAIL_RELOAD"
    assert plugin["reload_config"] == {"backoff": {"base_interval": "0.1s"}}
    assert json.loads(plugin["configuration"]["value"]) == pc.sample()
    assert plugin["vm_config"]["environment_variables"] == {"key_values": {"SECRET": "x"}}
    assert plugin["vm_config"]["code"]["local"]["filename"] == wasm_path()
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["metadata"] == {"filter_metadata": {"oauth2_cc": {"profile": "default"}}}
    assert routes[1]["direct_response"]["status"] == 204
    names = [c["name"] for c in d["static_resources"]["clusters"]]
    assert names == ["upstream", "idp", "idp2"]
    assert d["static_resources"]["clusters"][2]["connect_timeout"] == "2s"
    json.loads(bootstrap(pc.sample(), listener_port=1, admin_port=2, upstream_port=3))  # serialises


def test_paths():
    assert os.path.exists(envoy_bin()), envoy_bin()
    assert wasm_path().endswith("oauth2_cc.wasm")
    assert 1024 < free_port() < 65536


# --------------------------------------------------------------------------- #
# Envoy without the wasm filter
# --------------------------------------------------------------------------- #


def test_envoy_without_wasm_proxies_to_upstream(envoy_factory, upstream):
    e = envoy_factory.start(
        wasm=False,
        routes=[
            direct_route("/direct", 418, "teapot", name="direct"),
            route("/named", name="named-route", profile="default"),
            route("/"),
        ],
    )
    r = e.request("/hello?x=1", {"X-Test": "1"}, host="billing.internal")
    assert r.status == 200, r
    echo = r.json()
    assert echo["path"] == "/hello?x=1"
    assert echo["headers"]["x-test"] == "1"
    assert echo["headers"]["host"] == "billing.internal"
    assert "authorization" not in echo["headers"]
    assert upstream.count() == 1
    assert e.request("/named/x").status == 200
    r = e.request("/direct")
    assert (r.status, r.body) == (418, b"teapot")
    assert upstream.count() == 2

    rs = request_many(e.port, 40, "/many", workers=8)
    assert [r.status for r in rs] == [200] * 40

    stats = e.stats()
    assert stats["cluster.upstream.upstream_rq_200"] == 42
    assert e.stat("http.ingress_http.downstream_rq_completed") == 43
    assert "envoy_cluster_upstream_rq" in e.prometheus()
    assert "starting main dispatch loop" in e.log()
    assert e.critical_wasm_lines() == []
    pid = e.proc.pid
    assert e.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "exiting" in e.log()


def test_envoy_context_manager_and_fixed_ports(tmp_path, upstream):
    lp, ap = free_port(), free_port()
    text = bootstrap(None, wasm=False, listener_port=lp, admin_port=ap, upstream_port=upstream.port)
    with Envoy(text, tmp_path, concurrency=1) as e:
        e.wait_ready()
        assert (e.port, e.admin_port) == (lp, ap)
        assert request(lp, "/").status == 200
    assert e.proc.poll() is not None


def test_envoy_refused_bootstrap_exits(envoy_factory):
    e = envoy_factory.start(wasm=False, expect_ready=False,
                            virtual_hosts=[{"name": "x", "domains": ["*"], "routes": [{"bogus": 1}]}])
    assert e.wait_exit(30) != 0
    assert "[critical]" in e.log()


# --------------------------------------------------------------------------- #
# The wasm filter block, exercised with a tiny stub module (wasm_stub.py)
# --------------------------------------------------------------------------- #


@pytest.fixture
def stub(tmp_path):
    def make(**kw):
        return write_stub(tmp_path / f"stub{len(os.listdir(tmp_path))}.wasm", **kw)
    return make


def test_validate_accepts_wasm_block_with_stub(envoy_factory, stub, plugin_config):
    rc, out = envoy_factory.validate(
        plugin_config, wasm_file=stub(), env={"IDP_SECRET": "s"}, reload_base_interval="0.2s",
        routes=[route("/", name="r", profile="default"), direct_route("/d")],
    )
    assert rc == 0, out
    assert "OK" in out


def test_validate_runs_on_configure(envoy_factory, stub):
    # validate mode instantiates the VM and calls proxy_on_configure: a refused
    # plugin configuration fails validation.
    rc, out = envoy_factory.validate(pc.sample(), wasm_file=stub(configure_ok=False))
    assert rc != 0
    assert "Unable to create Wasm plugin oauth2_cc" in out


def test_validate_missing_wasm_file_fails(tmp_path):
    # (the factory would skip the test for a missing file: use Envoy directly)
    text = bootstrap(pc.sample(), wasm_file=str(tmp_path / "absent.wasm"), listener_port=0, admin_port=0,
                     upstream_port=1, token_clusters={"idp": ("127.0.0.1", 1)})
    rc, out = Envoy(text, tmp_path / "e").validate()
    assert rc != 0 and "Invalid path" in out


def test_validate_real_wasm(envoy_factory, wasm_file, plugin_config):
    rc, out = envoy_factory.validate(plugin_config, wasm_file=wasm_file)
    assert rc == 0, out


def test_stub_wasm_serves_traffic(envoy_factory, stub, upstream, token_server):
    e = envoy_factory.start(wasm_file=stub(), env={"IDP_SECRET": "s"})
    assert [e.request("/x").status for _ in range(10)] == [200] * 10
    assert upstream.count() == 10 and token_server.count() == 0
    assert e.stat("wasm.envoy.wasm.runtime.v8.active") >= 2
    assert e.wasm_failure_lines() == []


@pytest.mark.allow_wasm_failures
def test_critical_wasm_log_is_detected(envoy_factory, stub):
    e = envoy_factory.start(wasm_file=stub(request_log=(LOG_CRITICAL, "stub says critical")))
    assert e.request("/").status == 200
    e.stop()
    lines = e.critical_wasm_lines()
    assert lines and "stub says critical" in lines[0] and "[critical][wasm]" in lines[0]
    assert wasm_failures([e]) == [f"{e.name}: {lines[0]}"]  # what the autouse check would report
    e.allow_critical = True
    assert wasm_failures([e]) == []


@pytest.mark.allow_wasm_failures
def test_wasm_trap_is_detected(envoy_factory, stub):
    e = envoy_factory.start(wasm_file=stub(trap_on_request=True), reload_base_interval="0.1s")
    assert e.request("/").status == 503  # a trapped VM fails closed
    e.stop()
    assert e.critical_wasm_lines() == []  # a bare trap is only logged at error...
    failures = e.wasm_failure_lines()
    assert any("proxy_on_request_headers failed" in l for l in failures), failures  # ...and still caught


def test_refused_plugin_config_exits(envoy_factory, stub):
    e = envoy_factory.start(wasm_file=stub(configure_ok=False), expect_ready=False)
    assert e.wait_exit(30) == 1
    critical = e.critical_wasm_lines()
    assert any("Plugin oauth2_cc failed to load" in l for l in critical), critical


# --------------------------------------------------------------------------- #
# The conftest checks themselves, run in a child pytest (pytester)
# --------------------------------------------------------------------------- #

HARNESS_FILES = ("conftest.py", "envoy.py", "servers.py", "exchange_server.py", "plugin_config.py", "wasm_stub.py", "pytest.ini")

META_TESTS = """
import os, signal, time
import pytest
from wasm_stub import write_stub, LOG_CRITICAL

def test_critical_fails(envoy_factory, tmp_path):
    e = envoy_factory.start(wasm_file=write_stub(tmp_path / "s.wasm", request_log=(LOG_CRITICAL, "boom")))
    assert e.request("/").status == 200

@pytest.mark.allow_wasm_failures
def test_critical_allowed(envoy_factory, tmp_path):
    e = envoy_factory.start(wasm_file=write_stub(tmp_path / "s.wasm", request_log=(LOG_CRITICAL, "boom")))
    assert e.request("/").status == 200

def test_died(envoy_factory):
    e = envoy_factory.start(wasm=False)
    os.kill(e.proc.pid, signal.SIGKILL)
    e.proc.wait()

def test_plain_failure_dumps_log(envoy_factory):
    e = envoy_factory.start(wasm=False)
    assert e.request("/some/path").status == 200
    assert False, "deliberate"
"""


def test_conftest_checks_and_reports(pytester, monkeypatch):
    here = os.path.dirname(os.path.abspath(__file__))
    for name in HARNESS_FILES:
        with open(os.path.join(here, name)) as f:
            (pytester.path / name).write_text(f.read())
    pytester.makepyfile(test_meta=META_TESTS)
    # the copies live outside the repo: pin the binary and wasm paths
    monkeypatch.setenv("ENVOY_BIN", envoy_bin())
    monkeypatch.setenv("OAUTH2_CC_WASM", wasm_path())
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "--host", "wasm")
    res.assert_outcomes(passed=1, failed=3)
    out = res.stdout.str()
    assert "FAILED test_meta.py::test_critical_fails - Failed: Envoy problems" in out
    assert "PASSED test_meta.py::test_critical_allowed" in out
    assert "exited by itself with code -9" in out
    assert "envoy log envoy0" in out and "starting main dispatch loop" in out
    assert "upstream requests (1, last 50)" in out and "GET /some/path" in out


def test_no_envoy_left_behind(tmp_path_factory):
    # runs last in this file: every Envoy started above (here or in the pytester
    # child) was stopped. Only Envoys whose command line points into this session's
    # temporary directory count, so other Envoys on the machine are ignored.
    base = str(tmp_path_factory.getbasetemp())
    out = subprocess.run(["pgrep", "-f", "_bin/envoy"], capture_output=True, text=True)
    mine = []
    for pid in out.stdout.split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if base in cmdline:
            mine.append((pid, cmdline))
    assert mine == []
