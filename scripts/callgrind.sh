#!/usr/bin/env bash
# Count the instructions a saga costs Baton, by what the code is: `baton up` (every component
# in one process) under valgrind's callgrind, N create-space sagas one at a time through the
# gateway after 20 not counted, then each function's own instructions summed by library.
# Instruction counts do not depend on how busy the machine is, so two builds compare exactly.
#
#   cargo build --release -p baton-cli
#   scripts/callgrind.sh                 # SQLite, 200 sagas (about a minute)
#   scripts/callgrind.sh --postgres 200  # the state in a PostgreSQL database of its own
#   BATON=path/to/baton scripts/callgrind.sh   # another build
#
# It needs valgrind, python3, the local RabbitMQ with its management API (a vhost of its own
# is made and removed) and, with --postgres, the local PostgreSQL. The raw profile stays in
# the directory it prints, for `callgrind_annotate`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

postgres=0
if [ "${1:-}" = "--postgres" ]; then
    postgres=1
    shift
fi
sagas="${1:-200}"
baton="${BATON:-target/release/baton}"
[ -x "$baton" ] || die "no $baton: build it first (cargo build --release -p baton-cli)"
command -v valgrind >/dev/null || die "valgrind is missing: apt-get install valgrind"
command -v callgrind_control >/dev/null || die "callgrind_control is missing (it comes with valgrind)"
ensure_rabbitmq

out="$(mktemp -d /tmp/baton-callgrind.XXXXXX)"
vhost="callgrind-$$"
scratch_vhost "$vhost" guest
store=(--data-dir "$out/data")
database="baton_callgrind_$$"
if [ "$postgres" = 1 ]; then
    ensure_postgres
    psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $database"
    store=(--database-url "postgres://postgres@127.0.0.1:5432/$database")
fi
http=127.0.0.1:$((20000 + $$ % 20000))
health=127.0.0.1:$((40000 + $$ % 20000))

cleanup() {
    [ -n "${up:-}" ] && kill -INT "$up" 2>/dev/null && wait "$up" 2>/dev/null
    mgmt DELETE "/vhosts/$vhost" -o /dev/null || true
    [ "$postgres" = 1 ] && psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $database" || true
}
trap cleanup EXIT

say "starting baton up under callgrind (its log: $out/up.log)"
valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" \
    "$baton" up --mode workflow --http "$http" --health "$health" \
    --amqp-url "amqp://guest:guest@127.0.0.1:5672/$vhost" "${store[@]}" >"$out/up.log" 2>&1 &
up=$!
for _ in $(seq 1 300); do
    curl -fs -o /dev/null "http://$http/health/ready" && break
    kill -0 "$up" 2>/dev/null || die "baton up ended: see $out/up.log"
    sleep 1
done
curl -fs -o /dev/null "http://$http/health/ready" || die "baton up was not ready within 300 s: see $out/up.log"

say "20 sagas to warm up, not counted"
"$baton" load --gateway "http://$http" --requests 20 --concurrency 1 --refusal-rate 0 --seed 7 >/dev/null
callgrind_control --zero "$up" >/dev/null 2>&1
say "$sagas sagas one at a time, counted"
"$baton" load --gateway "http://$http" --requests "$sagas" --concurrency 1 --refusal-rate 0 --seed 8 |
    grep -E 'by status|throughput'
callgrind_control --dump "$up" >/dev/null 2>&1
profile="$out/callgrind.out.1"
[ -s "$profile" ] || die "callgrind wrote no profile at $profile"

say "instructions per saga, by what the code is (the profile: $profile)"
# Each function's own cost (the lines after a `calls=` line are a callee's and are skipped),
# names decompressed, then summed by the source file or library the function comes from.
python3 - "$profile" "$sagas" <<'EOF'
import collections, re, sys

path, sagas = sys.argv[1], int(sys.argv[2])
names = {"fl": {}, "fn": {}}
def name(kind, value):
    m = re.match(r"\((\d+)\)(?: (.*))?", value)
    if not m:
        return value
    table = names[kind]
    if m.group(2) is not None:
        table[m.group(1)] = m.group(2)
    return table.get(m.group(1), "?")

own = collections.Counter()
file = function = None
callee = False
for line in open(path, errors="replace"):
    line = line.rstrip("\n")
    if not line:
        continue
    if line[0].isdigit() or line[0] in "+-*":
        if callee:
            callee = False
        elif len(line.split()) >= 2:
            own[(file, function)] += int(line.split()[1])
        continue
    key, _, value = line.partition("=")
    if key == "fl":
        file = name("fl", value)
    elif key in ("fi", "fe", "cfi", "cfl"):
        name("fl", value)
    elif key == "fn":
        function = name("fn", value)
    elif key == "cfn":
        name("fn", value)
    elif key == "calls":
        callee = True

groups = [
    ("SQLite", r"sqlite3\.c"),
    ("PostgreSQL client (tokio-postgres, postgres-protocol)", r"tokio-postgres|postgres-protocol|postgres-types"),
    ("memory copies (memcpy, memmove, memset)", r"memmove|memset|memcpy"),
    ("allocation (malloc, free)", r"malloc\.c|arena\.c|__rdl_|__rust_(alloc|dealloc|realloc)"),
    ("tracing and OpenTelemetry", r"tracing-|opentelemetry|/tracing-0|sharded-slab|thread_local"),
    ("metrics (stage timings, Prometheus recorder)", r"/metrics-|crates/metrics/|hashbrown|quanta"),
    ("serde_json and serde", r"serde_json|serde_core|/serde-"),
    ("lapin and the AMQP codec", r"lapin|amq-protocol|/nom-|cookie-factory|async-rs|flume"),
    ("tokio", r"/tokio-1|mio-"),
    ("HTTP (hyper, axum)", r"hyper|axum|/http-|httparse|tower"),
    ("locks and thread wake-ups (pthread, futex)", r"pthread|futex|nptl|lowlevellock"),
    ("Baton's own code", r"/crates/"),
    ("Rust std, core, alloc (formatting, strings, collections)", r"/rustc/"),
]
by = collections.Counter()
for (file, function), n in own.items():
    where = f"{file}:{function}"
    group = next((g for g, p in groups if re.search(p, where)), "other (libc, syscalls, the rest)")
    by[group] += n
total = sum(by.values())
print("| what | thousand instructions per saga | share |")
print("|---|---|---|")
for group, n in by.most_common():
    print(f"| {group} | {n / sagas / 1000:,.0f} | {100 * n / total:.1f} % |")
print(f"| total | {total / sagas / 1000:,.0f} | 100 % |")
EOF
