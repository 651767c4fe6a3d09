#!/usr/bin/env bash
# What a saga costs Baton's process in CPU time and disk writes: `baton up` (every component in
# one process, SQLite) in a vhost and data dir of its own, 100 sagas to warm up, then N sagas
# through the gateway at C in flight, reading the process's CPU time (/proc/PID/stat) and the
# bytes it sent to the disk (/proc/PID/io: the WAL, and the pages the checkpointer copies)
# before and after.
#
#   cargo build --release -p baton-cli
#   scripts/per-saga.sh                  # 1,000 sagas at 16 in flight
#   scripts/per-saga.sh 2000 64          # N and C
#   BATON=path/to/baton scripts/per-saga.sh   # another build, to compare (run them alternately)
#
# It needs the local RabbitMQ with its management API. CPU time moves by 10 % from one run to
# the next on shared cores; the disk bytes by 2 %.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

sagas="${1:-1000}"
concurrency="${2:-16}"
baton="${BATON:-target/release/baton}"
[ -x "$baton" ] || die "no $baton: build it first (cargo build --release -p baton-cli)"
ensure_rabbitmq

out="$(mktemp -d /tmp/baton-per-saga.XXXXXX)"
vhost="per-saga-$$"
scratch_vhost "$vhost" guest
http=127.0.0.1:$((20000 + $$ % 20000))
health=127.0.0.1:$((40000 + $$ % 20000))

cleanup() {
    [ -n "${up:-}" ] && kill -INT "$up" 2>/dev/null && wait "$up" 2>/dev/null
    mgmt DELETE "/vhosts/$vhost" -o /dev/null || true
    rm -rf "$out"
}
trap cleanup EXIT

"$baton" up --mode workflow --http "$http" --health "$health" \
    --amqp-url "amqp://guest:guest@127.0.0.1:5672/$vhost" --data-dir "$out/data" >"$out/up.log" 2>&1 &
up=$!
wait_until 60 "baton up to be ready" curl -fs -o /dev/null "http://$health/health/ready"

"$baton" load --gateway "http://$http" --requests 100 --concurrency "$concurrency" --refusal-rate 0 \
    --seed 7 >/dev/null
sleep 1
ticks=$(getconf CLK_TCK)
read_cost() { echo "$(awk '/^write_bytes/ {print $2}' "/proc/$up/io") $(awk '{print $14 + $15}' "/proc/$up/stat")"; }
read -r disk0 cpu0 < <(read_cost)
"$baton" load --gateway "http://$http" --requests "$sagas" --concurrency "$concurrency" --refusal-rate 0 \
    --seed 8 >"$out/load.log" 2>&1
# The checkpointer copies the last commits within 200 ms.
sleep 1
read -r disk1 cpu1 < <(read_cost)
grep -q "200: $sagas\$" "$out/load.log" || die "not every saga answered 200: $(cat "$out/load.log")"
python3 - "$sagas" "$concurrency" "$disk0" "$disk1" "$cpu0" "$cpu1" "$ticks" "$(grep -o '[0-9.]* requests/s' "$out/load.log")" <<'EOF'
import sys
sagas, c, d0, d1, c0, c1, hz = (int(x) for x in sys.argv[1:8])
print(f"{sagas} sagas at {c} in flight ({sys.argv[8]}): "
      f"{(c1 - c0) * 1000 / hz / sagas:.2f} ms of CPU and {(d1 - d0) / sagas / 1e6:.3f} MB written to disk per saga")
EOF
