#!/usr/bin/env bash
# Boots workload images under QEMU and reports the marks each one printed.
# Manual check only (CI has no QEMU): needs qemu-system-x86_64 and perl.
#
#   harness/examples/qemu-smoke.sh [SECONDS] [ACCEL] [MEM] [SPEC...]
#
# Defaults: 30 s, tcg, 256M, and the specs listed below. Each mark is shown
# with the time (s) since QEMU started; a `verify` spec prefixed with
# `KIND:PASS:GPA:` (KIND = skip or corrupt) is built with that deliberate
# fault (see the export example), e.g. `skip:2:0x200000:verify`. QEMU gets isa-debug-exit at 0x501, so a guest
# exit status S shows as QEMU exit code 2*S+1 (verify's mismatch 0x0F → 31).
set -euo pipefail
secs=${1:-30}; accel=${2:-tcg}; mem=${3:-256M}
shift $(( $# < 3 ? $# : 3 ))
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(idle sweep "sweep:start=1M,end=64M" "hotset:wss=64M" \
    "hotset:wss=16M,rate=20000" verify "skip:3:0x2000000:verify" "corrupt:2:0x3FFF000:verify")
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-harness}
cargo build -q -p harness --example export
exporter=$CARGO_TARGET_DIR/debug/examples/export
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for spec in "${specs[@]}"; do
    extra=(); real=$spec
    if [[ $spec == skip:* || $spec == corrupt:* ]]; then
        IFS=: read -r kind pass gpa real <<<"$spec"; extra=(--fault "$kind:$pass:$gpa")
    fi
    "$exporter" "$real" "$mem" "$tmp/img" "${extra[@]}" 2>/dev/null
    set +e
    timeout "$secs" qemu-system-x86_64 -accel "$accel" -m "$mem" \
        -drive format=raw,file="$tmp/img" -serial stdio -display none -no-reboot \
        -device isa-debug-exit,iobase=0x501,iosize=1 </dev/null 2>/dev/null |
        perl -MTime::HiRes=time -e '$t0 = time; $| = 1;
            while (sysread(STDIN, $c, 1)) { printf "%.2f%s ", time - $t0, $c }' >"$tmp/out"
    rc=${PIPESTATUS[0]}
    set -e
    perl -e '$_ = do { local $/; <STDIN> };
        my @m = map { [/^([\d.]+\d)(.)$/s] } split / /;
        my @boot = grep { $_->[1] eq "B" } @m; my @pass = grep { $_->[1] eq "." } @m;
        my @bad = grep { $_->[1] ne "B" && $_->[1] ne "." } @m;
        my $rate = @pass > 1 ? sprintf("%.1f/s", (@pass - 1) / ($pass[-1][0] - $pass[0][0] || 1e-9)) : "-";
        printf "%-30s rc=%-3s boot@%s passes=%d (first@%s last@%s, %s) other=%s\n",
            $ARGV[0], $ARGV[1], (@boot ? join(",", map { $_->[0] } @boot) : "none"), scalar @pass,
            (@pass ? $pass[0][0] : "-"), (@pass ? $pass[-1][0] : "-"), $rate,
            (@bad ? join(" ", map { "$_->[1]\@$_->[0]" } @bad) : "none")' "$spec" "$rc" <"$tmp/out"
done
