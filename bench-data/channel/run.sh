#!/usr/bin/env bash
# What the migration channel costs: the same 1 GiB guest (hotset over a
# 512 MiB working set of pseudo-random, incompressible pages) migrated over
# loopback TCP with a plaintext channel (--insecure) and with the
# pre-shared-key channel (--psk-file: every 256 KiB record AES-256-GCM sealed)
# and with mutual TLS 1.3 (--tls-cert/--tls-key/--tls-ca; certificates made
# here with openssl), alternating, REPS times each, beside a plain TCP
# stream, all in one run.
# Policy xen (at most 5 iterations), so every run completes. Writes
# bench-data/channel/results/*.json and results.md, and prints the table.
#   bash bench-data/channel/run.sh [REPS]        (about 1 minute for 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${1:-3}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --locked -p migrate-cli --bin vmigrate -p harness --bin tcp-baseline >/dev/null
BIN=$TARGET/release/vmigrate
OUT=bench-data/channel/results
TMP=$(mktemp -d)
mkdir -p "$OUT"
rm -f "$OUT"/*.json
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TMP/key"
chmod 600 "$TMP/key"
# A throw-away CA and one certificate for 127.0.0.1 used by both ends.
(cd "$TMP" &&
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key \
    -out ca.pem -days 1 -subj /CN=bench-ca 2>/dev/null &&
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout end.key \
    -out end.csr -subj /CN=bench 2>/dev/null &&
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' >end.ext &&
  openssl x509 -req -in end.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out end.pem \
    -days 1 -extfile end.ext 2>/dev/null)
TLS=(--tls-cert "$TMP/end.pem" --tls-key "$TMP/end.key" --tls-ca "$TMP/ca.pem")

echo "== raw TCP stream over loopback"
"$TARGET/release/tcp-baseline" --bytes 4G | tee "$OUT/tcp-baseline.json"

migrate() { # name channel-args...
  local name=$1; shift
  rm -f "$TMP"/*.api
  $BIN run --incoming tcp:127.0.0.1:0 "$@" --serial "$TMP/$name.dst.serial" \
    --api-socket "$TMP/dst.api" >"$TMP/dst.out" 2>"$TMP/$name.dst.err" &
  local dst=$!
  $BIN run --workload hotset:wss=512M --mem 1G --serial "$TMP/$name.src.serial" \
    --api-socket "$TMP/src.api" 2>"$TMP/$name.src.err" &
  local src=$!
  until grep -q listening "$TMP/dst.out" 2>/dev/null && [ -S "$TMP/src.api" ]; do sleep 0.05; done
  sleep 2
  local to; to=$(sed -n 's/^vmigrate: listening on //p' "$TMP/dst.out")
  echo "== $name: $*"
  $BIN send --api-socket "$TMP/src.api" --to "$to" "$@" --policy xen --json >"$OUT/$name.json" || true
  $BIN shutdown --api-socket "$TMP/dst.api" 2>/dev/null || kill $dst 2>/dev/null || true
  $BIN shutdown --api-socket "$TMP/src.api" 2>/dev/null || true
  wait $dst $src 2>/dev/null || true
}

for rep in $(seq 1 "$REPS"); do
  migrate "plaintext-$rep" --insecure
  migrate "psk-$rep" --psk-file "$TMP/key"
  migrate "tls-$rep" "${TLS[@]}"
done

python3 - "$OUT" "$REPS" <<'PY' | tee "$OUT/../results.md"
import json, os, statistics, sys
out, reps = sys.argv[1], int(sys.argv[2])
tcp = json.load(open(os.path.join(out, "tcp-baseline.json")))
rows = {}
for mode in ["plaintext", "psk", "tls"]:
    rs = [json.load(open(os.path.join(out, f"{mode}-{i}.json"))) for i in range(1, reps + 1)]
    assert all(r["status"] == "completed" for r in rs), [r.get("error") for r in rs]
    rows[mode] = rs
base = statistics.median(r["ram"]["page-mbps"] for r in rows["plaintext"])
print(f"Loopback TCP, 1 GiB guest, hotset:wss=512M, policy xen, {reps} runs each "
      f"(alternating); raw TCP stream {tcp['gbps']:.2f} Gbit/s in the same run.\n")
print("| channel | page-mbps (median) | runs | ram.mbps (median) | total-time ms (median) | downtime ms (median) | vs plaintext |")
print("|---|---:|---|---:|---:|---:|---:|")
for mode, rs in rows.items():
    pm = [r["ram"]["page-mbps"] for r in rs]
    med = statistics.median(pm)
    print(f"| {mode} | {med:.0f} | {', '.join(f'{x:.0f}' for x in pm)} "
          f"| {statistics.median(r['ram']['mbps'] for r in rs):.0f} "
          f"| {statistics.median(r['total-time'] for r in rs):.0f} "
          f"| {statistics.median(r['downtime'] for r in rs):.1f} | {med / base:.0%} |")
PY
