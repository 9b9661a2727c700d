"""Fixtures for the oauth2-cc end-to-end tests (real Envoy, fake IdP, echo upstream).

Fixtures (all function-scoped):
  token_server   servers.TokenServer on a free loopback port
  upstream       servers.EchoUpstream on a free loopback port
  make_token_server  ``make_token_server(**kw)``: more TokenServers (multi-profile tests)
  exchange_server  exchange_server.ExchangeServer: an RFC 8693 token-exchange server
  plugin_config  a fresh copy of plugin_config.SAMPLE (profile "default" on cluster "idp")
  wasm_file      path of the oauth2-cc build; skips the test when it is absent
                 (fails instead when E2E_REQUIRE_WASM=1, as CI should set)
  filter_host    "wasm" or "native": which build of oauth2-cc the test's Envoys load. Every
                 test that uses envoy_factory runs once per host (ids ``[wasm]``,
                 ``[native]``); ``--host wasm|native|both`` (or E2E_HOST) narrows the run.
                 ``@pytest.mark.wasm_only`` keeps a test about proxy-wasm itself (exports,
                 VM failure policy, wasm size) on the wasm build.
  envoy_factory  EnvoyFactory: ``envoy_factory(plugin_config, env=..., routes=...)``
                 builds a bootstrap (ports chosen by the kernel) for the test's
                 filter_host, starts Envoy, waits until /ready says LIVE and stops it
                 after the test. ``env`` reaches the filter either way: the wasm VM's
                 environment, or Envoy's process environment for the native build.

Checks done for every test that started Envoy through the factory: after the test
body, its Envoys are stopped and the test fails if any wrote a ``critical`` wasm
record or a wasm VM failure (see Envoy.wasm_failure_lines), unless the test is
marked ``@pytest.mark.allow_wasm_failures`` or the Envoy was started with
``allow_critical=True`` (the default for ``expect_ready=False``), or if an Envoy
died by itself. A failing test's report gets the last 200 lines of each Envoy log
and the requests the token server and upstream saw.

Environment: ENVOY_BIN, OAUTH2_CC_WASM, OAUTH2_CC_NATIVE, E2E_REQUIRE_WASM (both builds
must exist), E2E_HOST, E2E_ENVOY_LOG_LEVEL (default info), E2E_ENVOY_COMPONENT_LOG_LEVEL
(e.g. "wasm:debug").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pytest

import plugin_config as pc
from envoy import Envoy, bootstrap, native_path, wasm_path
from exchange_server import ExchangeServer
from servers import EchoUpstream, TokenServer

ENVOYS = pytest.StashKey[list]()
SERVERS = pytest.StashKey[dict]()
LOG_TAIL_LINES = 200


HOSTS = ("wasm", "native")


def pytest_addoption(parser):
    parser.addoption(
        "--host", choices=("wasm", "native", "both"), default=os.environ.get("E2E_HOST") or "both",
        help="which oauth2-cc build the envoy_factory tests load (default both, or $E2E_HOST)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "allow_wasm_failures: do not fail the test on critical wasm log records / VM failures"
    )
    config.addinivalue_line(
        "markers", "wasm_only: a test about proxy-wasm itself; runs on the wasm build only"
    )
    config.addinivalue_line(
        "markers", "host_agnostic: the test loads no oauth2-cc build; runs once, not once per host"
    )
    config.addinivalue_line(
        "markers",
        "cpu_heavy: the test drives sustained load or judges timing that a second such test would "
        "disturb; under xdist all of them run one after another on one worker (README: parallel runs)",
    )
    # Registered here too, so that a run without pytest-xdist (-p no:xdist) does not warn.
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist runs a group on one worker (--dist loadgroup)")


CPU_HEAVY_GROUP = "cpu_heavy"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every ``cpu_heavy`` test joins one xdist group. With ``--dist loadgroup`` (``make e2e``) a
    group is one unit of work, and the largest unit is handed out first: the heavy tests start at
    once, one after another on one worker, while the other workers share the light tests. Without
    xdist the marker changes nothing. (tryfirst: xdist reads the group marks in its own hook.)"""
    for item in items:
        if item.get_closest_marker("cpu_heavy") and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(CPU_HEAVY_GROUP))


GROUP_LOST = pytest.StashKey[bool]()


def pytest_collection_finish(session):
    """``--dist loadgroup`` hands out work by the ``@group`` suffix xdist's worker adds to each
    grouped node id. A pytest whose node ids xdist cannot suffix (9.2 with xdist 3.8) drops every
    group without a word, and the cpu_heavy tests run side by side: each such test then fails at
    setup, saying so. (``loadgroup`` is set on the workers of a ``--dist loadgroup`` run only.)"""
    if not getattr(session.config.option, "loadgroup", False):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            item.stash[GROUP_LOST] = True


def pytest_runtest_setup(item):
    if item.stash.get(GROUP_LOST, False):
        pytest.fail("pytest-xdist ignored this test's xdist_group (--dist loadgroup found no @group suffix in "
                    "its node id): this pytest and pytest-xdist do not work together; use the versions pinned "
                    "in tests/e2e/requirements.txt", pytrace=False)


def hosts_for(config, node) -> list[str]:
    """The hosts a test runs on: the ``--host`` choice, less what its markers exclude."""
    chosen = config.getoption("--host")
    hosts = list(HOSTS) if chosen == "both" else [chosen]
    if node.get_closest_marker("wasm_only"):
        return [h for h in hosts if h == "wasm"]
    if node.get_closest_marker("host_agnostic"):
        return hosts[:1]
    return hosts


def pytest_generate_tests(metafunc):
    """Every test that uses ``filter_host`` (through envoy_factory) runs once per host; with one
    host it is not parametrized (its id stays unchanged), with none it is skipped."""
    if "filter_host" not in metafunc.fixturenames:
        return
    hosts = hosts_for(metafunc.config, metafunc.definition)
    if len(hosts) != 1:
        metafunc.parametrize("filter_host", hosts, indirect=True)


@pytest.fixture
def filter_host(request) -> str:
    if hasattr(request, "param"):
        return request.param
    return hosts_for(request.config, request.node)[0]


# --------------------------------------------------------------------------- #
# Servers
# --------------------------------------------------------------------------- #


@pytest.fixture
def token_server(request) -> Iterable[TokenServer]:
    s = TokenServer().start()
    request.node.stash.setdefault(SERVERS, {})["token_server"] = s
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def upstream(request) -> Iterable[EchoUpstream]:
    s = EchoUpstream().start()
    request.node.stash.setdefault(SERVERS, {})["upstream"] = s
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def make_token_server(request) -> Iterable:
    """``make_token_server(**kw) -> TokenServer``: extra token servers (e.g. one per
    profile cluster), started now and stopped after the test."""
    made: list[TokenServer] = []

    def make(**kw) -> TokenServer:
        s = TokenServer(**kw).start()
        made.append(s)
        request.node.stash.setdefault(SERVERS, {})[f"token_server{len(made) + 1}"] = s
        return s

    try:
        yield make
    finally:
        for s in made:
            s.stop()


@pytest.fixture
def exchange_server(request) -> Iterable[ExchangeServer]:
    """An RFC 8693 token-exchange server (exchange_server.py); pass it as a token cluster:
    ``envoy_factory.start(cfg, token_clusters={"idp": exchange_server})``."""
    s = ExchangeServer().start()
    request.node.stash.setdefault(SERVERS, {})["exchange_server"] = s
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def plugin_config() -> dict:
    return pc.sample()


def _require_wasm() -> bool:
    return os.environ.get("E2E_REQUIRE_WASM", "") not in ("", "0", "false", "no")


def check_wasm_file(path: str | None = None) -> str:
    """Return the wasm path, or skip (fail under E2E_REQUIRE_WASM=1) when it is missing."""
    path = path or wasm_path()
    if not Path(path).is_file():
        msg = (
            f"oauth2-cc wasm not found at {path}: run `make build` or set OAUTH2_CC_WASM"
        )
        if _require_wasm():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def wasm_file() -> str:
    return check_wasm_file()


def check_native_file(path: str | None = None) -> str:
    """The native build's path, or skip (fail under E2E_REQUIRE_WASM=1) when it is missing."""
    path = path or native_path()
    if not Path(path).is_file():
        msg = f"oauth2-cc dynamic module not found at {path}: run `make build` or set OAUTH2_CC_NATIVE"
        if _require_wasm():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# --------------------------------------------------------------------------- #
# Envoy factory
# --------------------------------------------------------------------------- #


class EnvoyFactory:
    """Builds bootstraps and starts Envoys for one test; every Envoy is stopped
    at the end of the test (even on failure)."""

    def __init__(self, tmp_path: Path, token_server: TokenServer, upstream: EchoUpstream, item,
                 filter_host: str = "wasm"):
        self.filter_host = filter_host
        self.tmp_path = tmp_path
        self.token_server = token_server
        self.upstream = upstream
        self.item = item
        self.envoys: list[Envoy] = item.stash.setdefault(ENVOYS, [])

    def config_text(
        self,
        plugin_config: Mapping[str, Any] | str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        routes: list[dict] | None = None,
        token_clusters: Mapping[str, Any] | None = None,
        wasm: bool = True,
        wasm_file: str | None = None,
        listener_port: int = 0,
        admin_port: int = 0,
        **bootstrap_kw: Any,
    ) -> str:
        """The bootstrap text. plugin_config None means the sample config.
        token_clusters default: every cluster named by a profile -> token_server."""
        if plugin_config is None:
            plugin_config = pc.sample()
        if token_clusters is None:
            token_clusters = {name: self.token_server for name in pc.clusters_of(plugin_config)}
            if wasm and not token_clusters:
                token_clusters = {pc.DEFAULT_CLUSTER: self.token_server}
        native = self.filter_host == "native"
        if wasm and native:
            bootstrap_kw.setdefault("native_file", check_native_file())
        elif wasm:
            wasm_file = check_wasm_file(wasm_file)
        bootstrap_kw.setdefault("upstream_port", self.upstream.port)
        bootstrap_kw.setdefault("filter_host", self.filter_host)
        return bootstrap(
            plugin_config,
            listener_port=listener_port,
            admin_port=admin_port,
            token_clusters=token_clusters,
            env=None if native else env,
            routes=routes,
            wasm=wasm,
            wasm_file=wasm_file,
            **bootstrap_kw,
        )

    def process_env(self, env: Mapping[str, str] | None) -> Mapping[str, str] | None:
        """The native build reads ``{"env": ...}`` secrets from Envoy's own environment."""
        return env if self.filter_host == "native" else None

    def _new(self, text: str, name: str | None, concurrency: int, log_level: str | None,
             component_log_level: str | None, extra_args: Iterable[str],
             env: Mapping[str, str] | None = None) -> Envoy:
        name = name or f"envoy{len(self.envoys)}"
        component_log_level = component_log_level or os.environ.get("E2E_ENVOY_COMPONENT_LOG_LEVEL") or None
        if component_log_level and self.filter_host == "native":
            # The dynamic module logs under Envoy's dynamic_modules component, not wasm.
            component_log_level = ",".join(
                [component_log_level]
                + [f"dynamic_modules:{lvl}" for c, _, lvl in (p.partition(":") for p in component_log_level.split(","))
                   if c == "wasm"])
        e = Envoy(
            text,
            self.tmp_path / name,
            concurrency=concurrency,
            log_level=log_level or os.environ.get("E2E_ENVOY_LOG_LEVEL", "info"),
            component_log_level=component_log_level,
            extra_args=extra_args,
            name=name,
            env=env,
        )
        return e

    def start(
        self,
        plugin_config: Mapping[str, Any] | str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        routes: list[dict] | None = None,
        expect_ready: bool = True,
        token_clusters: Mapping[str, Any] | None = None,
        wasm: bool = True,
        wasm_file: str | None = None,
        concurrency: int = 2,
        log_level: str | None = None,
        component_log_level: str | None = None,
        allow_critical: bool | None = None,
        ready_timeout: float = 30,
        extra_args: Iterable[str] = (),
        name: str | None = None,
        **bootstrap_kw: Any,
    ) -> Envoy:
        """Start Envoy; with expect_ready (default) wait until it is LIVE.
        With expect_ready=False it only starts: call ``wait_exit()`` for a config
        Envoy must refuse. Extra keyword arguments go to ``envoy.bootstrap``
        (failure_policy, reload_base_interval, extra_clusters, virtual_hosts, ...)."""
        text = self.config_text(
            plugin_config, env=env, routes=routes, token_clusters=token_clusters,
            wasm=wasm, wasm_file=wasm_file, **bootstrap_kw,
        )
        e = self._new(text, name, concurrency, log_level, component_log_level, extra_args, self.process_env(env))
        e.allow_critical = (not expect_ready) if allow_critical is None else allow_critical
        e.expect_running = expect_ready
        self.envoys.append(e)
        e.start()
        if expect_ready:
            e.wait_ready(ready_timeout)
        return e

    __call__ = start

    def validate(self, plugin_config: Mapping[str, Any] | str | None = None, *, name: str | None = None,
                 **kw: Any) -> tuple[int, str]:
        """``envoy --mode validate`` on the bootstrap: (exit code, output). Note that
        validate mode loads the wasm module and runs on_vm_start / on_configure, so a
        plugin config the filter rejects fails validation too."""
        text = self.config_text(plugin_config, **kw)
        e = self._new(text, name or f"validate{len(self.envoys)}", 1, None, None, (), self.process_env(kw.get("env")))
        return e.validate()

    def stop_all(self):
        for e in self.envoys:
            try:
                e.stop()
            except Exception:
                pass


@pytest.fixture
def envoy_factory(request, tmp_path, token_server, upstream, filter_host) -> Iterable[EnvoyFactory]:
    f = EnvoyFactory(tmp_path, token_server, upstream, request.node, filter_host)
    try:
        yield f
    finally:
        f.stop_all()


# --------------------------------------------------------------------------- #
# Checks and failure reports
# --------------------------------------------------------------------------- #


def wasm_failures(envoys: Iterable[Envoy]) -> list[str]:
    """Critical wasm records / VM failures of the Envoys that do not allow them."""
    out = []
    for e in envoys:
        if getattr(e, "allow_critical", False):
            continue
        out += [f"{e.name}: {line}" for line in e.wasm_failure_lines()]
    return out


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """After the test body: stop this test's Envoys (flushes their logs), then fail
    the test on critical wasm records or an Envoy that died by itself."""
    envoys: list[Envoy] = item.stash.get(ENVOYS, [])
    try:
        result = yield
    except BaseException:
        for e in envoys:
            e.stop()
        raise
    died = [
        f"{e.name} exited by itself with code {e.proc.returncode}"
        for e in envoys
        if getattr(e, "expect_running", False)
        and not e.stopped_by_us
        and e.proc is not None
        and e.proc.poll() is not None
    ]
    for e in envoys:
        e.stop()
    problems = died
    if not item.get_closest_marker("allow_wasm_failures"):
        problems += wasm_failures(envoys)
    if problems:
        pytest.fail("Envoy problems after the test:\n" + "\n".join(problems), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for e in item.stash.get(ENVOYS, []):
            try:
                report.sections.append(
                    (f"envoy log {e.name} ({e.tmpdir}), last {LOG_TAIL_LINES} lines", e.log_tail(LOG_TAIL_LINES))
                )
            except Exception as exc:  # never hide the real failure
                report.sections.append((f"envoy log {e.name}", f"<unreadable: {exc!r}>"))
        for name, s in item.stash.get(SERVERS, {}).items():
            try:
                reqs = s.requests
                text = "\n".join(r.summary() for r in reqs[-50:]) or "<none>"
                if s.errors:
                    text += "\nhandler errors:\n" + "\n".join(s.errors[-3:])
                report.sections.append((f"{name} requests ({len(reqs)}, last 50)", text))
            except Exception:
                pass
    return report


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
