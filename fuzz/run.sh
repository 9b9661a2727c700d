#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 60) each, one after the other, and prints how many
# inputs each executed. Exits non-zero if any target crashed (the input is kept in fuzz/artifacts/)
# or could not run.
#
#   fuzz/run.sh                                        # all targets, 60 s each
#   FUZZ_SECONDS=600 FUZZ_TARGETS="token_response" fuzz/run.sh
#   FUZZ_RUNS=10000000 FUZZ_SECONDS=0 fuzz/run.sh      # 10 million inputs each, no time limit
#   FUZZ_BUILD_FLAGS="" fuzz/run.sh                    # with AddressSanitizer (cargo-fuzz's default)
#   FUZZ_ARGS="-max_len=70000" fuzz/run.sh             # more libFuzzer flags
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). The committed seeds in
# fuzz/corpus/<target>/ are read, never written: what the fuzzer finds goes to
# fuzz/target/corpus/<target>/ (git-ignored), which later runs start from.
set -uo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
runs=${FUZZ_RUNS:-}
# Debug assertions and overflow checks on: an overflow in time arithmetic is a finding too.
# No sanitizer: src/core has no `unsafe`, and without ASan the targets run about 4 times faster.
build_flags=${FUZZ_BUILD_FLAGS---sanitizer none --debug-assertions}
mkdir -p target/logs

failed=()
summary=()
for target in $targets; do
    mkdir -p "target/corpus/$target"
    corpora=("target/corpus/$target")
    [ -d "corpus/$target" ] && corpora+=("corpus/$target")
    log="target/logs/$target.log"
    limits=(-max_total_time="$seconds")
    [ -n "$runs" ] && limits+=(-runs="$runs")
    # shellcheck disable=SC2206
    extra=(${FUZZ_ARGS:-})
    echo "== $target: ${limits[*]} (log: fuzz/$log)"
    # shellcheck disable=SC2086
    cargo +nightly fuzz run $build_flags "$target" "${corpora[@]}" -- \
        "${limits[@]}" -print_final_stats=1 ${extra[@]+"${extra[@]}"} >"$log" 2>&1
    status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ "$status" -ne 0 ] && grep -q "Test unit written to" "$log"; then
        failed+=("$target")
        summary+=("$target: ${execs:-?} executions, CRASH (exit $status)")
        grep -E "panicked at|^SUMMARY|Test unit written to|ERROR" "$log" | head -n 20
    elif [ "$status" -ne 0 ]; then
        failed+=("$target")
        summary+=("$target: did not run (exit $status)")
        grep -E "^error|^Error|No such file" "$log" | head -n 20
    else
        summary+=("$target: ${execs:-?} executions, no crash")
    fi
done

echo "== summary (${limits[*]} per target)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "failed: ${failed[*]} (crash inputs in fuzz/artifacts/<target>/, logs in fuzz/target/logs/)"
    exit 1
fi
