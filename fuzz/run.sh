#!/usr/bin/env bash
# Build the libFuzzer targets with coverage instrumentation (stable Rust:
# the same codegen flags cargo-fuzz passes, without a sanitizer, which needs
# nightly), record a seed corpus of real migration streams, and fuzz each
# target for a bounded time.
#   bash fuzz/run.sh [SECONDS_PER_TARGET]      (default 60)
# Prints each target's executions and findings; exits non-zero on a crash
# (the input is kept in fuzz/artifacts/).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
target=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
# --target keeps the flags off build scripts and proc macros.
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
  cargo build --release --locked --target "$target" --bin frame --bin receiver
cargo build --release --locked --bin record-seeds
bin="$CARGO_TARGET_DIR/$target/release"
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
"$CARGO_TARGET_DIR/release/record-seeds" "$corpus/frame" "$corpus/receiver"
mkdir -p artifacts
status=0
for t in frame receiver; do
  log="$corpus/$t.log"
  echo "== fuzz $t for ${secs}s (seeds: $(ls "$corpus/$t" | wc -l))"
  if "$bin/$t" -max_total_time="$secs" -max_len=262144 -rss_limit_mb=2048 -timeout=10 \
       -artifact_prefix="artifacts/$t-" -print_final_stats=1 "$corpus/$t" >"$log" 2>&1; then
    echo "   $t: no crash"
  else
    echo "   $t: FAILED (input in fuzz/artifacts/)"; tail -40 "$log"; status=1
  fi
  grep -E "^stat::number_of_executed_units|^stat::new_units_added|^stat::peak_rss_mb" "$log" | sed "s/^/   $t /"
done
exit $status
