#!/usr/bin/env node
// Runs a wasm32-wasip1 test binary under Node's WASI (preview1), so `cargo test --target wasm32-wasip1`
// runs the core's unit tests in a wasm engine: 32-bit usize, wasm float and time arithmetic, WASI
// randomness.
//
//   CARGO_TARGET_WASM32_WASIP1_RUNNER="node $PWD/tools/wasi-test-runner.mjs" \
//     cargo test --target wasm32-wasip1 -p oauth2-cc-core --lib
//
// Cargo calls it as `runner <test.wasm> <libtest args...>` from the package directory.
//
// - A test binary that imports anything beyond WASI (a host's `env.proxy_*`, say) gets a stub for
//   every such import that throws if a test calls it: the module instantiates, the tests run, and
//   a test that reaches a host fails loudly.
// - proxy-wasm exports `_initialize` next to libtest's `_start`; Node's `wasi.start` refuses a module
//   with both, so it is given the instance's exports without `_initialize`.
// - wasm32-wasip1 has no unwinding: a failing test panics with panic=abort, which traps and ends the
//   whole run, and the panic message is lost in libtest's output capture. The runner then runs the
//   binary once more with `--nocapture` so the message is printed, and exits 101 as a failed
//   `cargo test` does.
// - The package directory (CARGO_MANIFEST_DIR), the current directory and the workspace root are preopened at their own
//   absolute paths, so tests that read files through `env!("CARGO_MANIFEST_DIR")` work; the host
//   environment is passed through (UPDATE_SCHEMA, RUST_BACKTRACE...).

import { readFile } from 'node:fs/promises';
import path from 'node:path';
import process from 'node:process';

// Node 20 warns that WASI is experimental each time; the test output is clearer without it.
const emitWarning = process.emitWarning;
process.emitWarning = (warning, ...rest) => {
  const type = typeof rest[0] === 'string' ? rest[0] : rest[0]?.type;
  if (type === 'ExperimentalWarning' || warning?.name === 'ExperimentalWarning') return;
  emitWarning.call(process, warning, ...rest);
};
const { WASI } = await import('node:wasi');

const [wasmPath, ...testArgs] = process.argv.slice(2);
if (!wasmPath) {
  console.error('usage: wasi-test-runner.mjs <test.wasm> [libtest args...]');
  process.exit(2);
}

const preopens = {};
// The workspace root too (this file is in <root>/tools): tests read repository files from there.
const workspaceRoot = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
for (const dir of [process.env.CARGO_MANIFEST_DIR, process.cwd(), workspaceRoot]) {
  if (dir) preopens[path.resolve(dir)] = path.resolve(dir);
}

const module = await WebAssembly.compile(await readFile(wasmPath));

/** One run of the test binary with these libtest arguments: its exit code, or null if it trapped. */
async function run(args) {
  const wasi = new WASI({
    version: 'preview1',
    args: [path.basename(wasmPath), ...args],
    env: process.env,
    preopens,
    returnOnExit: true,
  });
  const imports = wasi.getImportObject();
  for (const { module: from, name, kind } of WebAssembly.Module.imports(module)) {
    if (from in imports && name in imports[from]) continue;
    if (kind !== 'function') throw new Error(`cannot provide import ${from}.${name} (${kind})`);
    imports[from] ??= {};
    imports[from][name] = () => {
      throw new Error(`host import ${from}.${name} called; only Envoy provides it`);
    };
  }
  const instance = await WebAssembly.instantiate(module, imports);
  // Everything but `_initialize` (see above).
  const { _initialize, ...exports } = instance.exports;
  try {
    return wasi.start({ exports });
  } catch (error) {
    const what = error instanceof WebAssembly.RuntimeError ? `trapped (${error.message})` : `failed: ${error}`;
    console.error(`\nwasi-test-runner: the test binary ${what}; on wasm32-wasip1 a panic ends the whole run`);
    return null;
  }
}

let code = await run(testArgs);
if (code === null) {
  if (!testArgs.includes('--nocapture')) {
    console.error('wasi-test-runner: running again with --nocapture to show the panic message\n');
    await run([...testArgs, '--nocapture']);
  }
  code = 101;
}
process.exitCode = code;
