#!/usr/bin/env bash
# Foundation measurements: 1 GiB guests migrated between two vmigrate
# processes over loopback TCP, beside a plain TCP stream measured in the same
# run. Writes bench-data/foundation/results/*.json and prints a table.
#   bash bench-data/foundation/run.sh            (about 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p migrate-cli --bin vmigrate -p harness --bin tcp-baseline >/dev/null
BIN=target/release/vmigrate
OUT=bench-data/foundation/results
TMP=$(mktemp -d)
mkdir -p "$OUT"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT

echo "== raw TCP stream over loopback"
target/release/tcp-baseline --bytes 4G | tee "$OUT/tcp-baseline.json"

migrate() { # name workload mem send-args...
  local name=$1 workload=$2 mem=$3; shift 3
  rm -f "$TMP"/*.api
  # Plaintext (--insecure) on both ends, as in the earlier results:
  # bench-data/channel/ measures the pre-shared-key channel's cost.
  $BIN run --incoming tcp:127.0.0.1:0 --insecure --serial "$TMP/$name.dst.serial" \
    --api-socket "$TMP/dst.api" >"$TMP/dst.out" 2>"$TMP/$name.dst.err" &
  local dst=$!
  $BIN run --workload "$workload" --mem "$mem" --serial "$TMP/$name.src.serial" \
    --api-socket "$TMP/src.api" 2>"$TMP/$name.src.err" &
  local src=$!
  until grep -q listening "$TMP/dst.out" 2>/dev/null && [ -S "$TMP/src.api" ]; do sleep 0.05; done
  sleep 2   # let the workload reach its steady dirtying rate
  local to; to=$(sed -n 's/^vmigrate: listening on //p' "$TMP/dst.out")
  echo "== $name: $workload, $mem, $*"
  $BIN send --api-socket "$TMP/src.api" --to "$to" --insecure --json "$@" >"$OUT/$name.json" || true
  $BIN shutdown --api-socket "$TMP/dst.api" 2>/dev/null || kill $dst 2>/dev/null || true
  $BIN shutdown --api-socket "$TMP/src.api" 2>/dev/null || true
  wait $dst $src 2>/dev/null || true
}

migrate idle-1g        idle  1G --policy qemu
migrate sweep-1g-xen   sweep 1G --policy xen
migrate sweep-1g-qemu2000 sweep 1G --policy qemu --downtime-limit 2000
migrate sweep-1g-qemu300  sweep 1G --policy qemu --timeout 30

python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
tcp = json.load(open(os.path.join(out, "tcp-baseline.json")))
print(f"\nraw TCP stream: {tcp['gbps']:.2f} Gbit/s")
print(f"{'case':20} {'status':10} {'total ms':>9} {'down ms':>8} {'sent MiB':>9} {'iters':>5} {'Mbit/s':>7} {'page Mbit/s':>11} {'vs TCP':>6}  stop reason")
for name in ["idle-1g", "sweep-1g-xen", "sweep-1g-qemu2000", "sweep-1g-qemu300"]:
    r = json.load(open(os.path.join(out, name + ".json")))
    ram = r["ram"]
    down = r["downtime"]
    print(f"{name:20} {r['status']:10} {r['total-time']:9.0f} {down if down is None else round(down,1)!s:>8} "
          f"{ram['transferred']/2**20:9.1f} {len(r['iterations']):5} {ram['mbps']:7.0f} {ram['page-mbps']:11.0f} "
          f"{ram['page-mbps']/1000/tcp['gbps']:6.0%}  {r.get('stop-reason') or r.get('error')}")
PY
