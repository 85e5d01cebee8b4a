#!/usr/bin/env bash
# The host-side hot path (migrate-core/benches/hot_path.rs, criterion):
# codec with CRC, zstd, zero-page detection, dirty bitmaps, memory digest.
# Writes bench-data/hot-path/results.txt.
#   bash bench-data/hot-path/run.sh        (about 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=bench-data/hot-path/results.txt
{
  echo "# cargo bench -p migrate-core --bench hot_path ($(date -u +%F), $(nproc) cores, $(uname -r))"
  cargo bench --locked -p migrate-core --bench hot_path -- --warm-up-time 1 --measurement-time 3 2>&1 |
    grep -E "^[a-z].*/|time:|thrpt:"
} | tee "$out"
