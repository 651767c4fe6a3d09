#!/usr/bin/env bash
# Baton's demo: a short side-by-side comparison of the two modes, then the workflow mode (saga
# orchestration) kept running on a local RabbitMQ.
#
#   scripts/demo.sh
#
# It makes sure RabbitMQ is running with its management UI, builds `baton`, runs
# `baton compare` (300 requests at concurrency 16 through both the workflow and the events
# mode, same load, same fault plan, each in a fresh vhost; prints the table and writes the HTML
# report reports/compare.html), then starts every component in one process against a fresh
# vhost (baton-demo) and a fresh data dir (data/demo), creates a few spaces (one is refused at
# the routing step and rolled back), checks the cross-service invariant with `baton audit`, then
# keeps the system running so you can use the API and watch the queues until you press Ctrl-C.
#
# Settings (environment): BATON_DEMO_HTTP (127.0.0.1:8080), BATON_DEMO_VHOST (baton-demo),
# BATON_DEMO_DIR (./data/demo), plus those of scripts/lib.sh.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

HTTP_ADDR="${BATON_DEMO_HTTP:-127.0.0.1:8080}"
HTTP_PORT="${HTTP_ADDR##*:}"
GATEWAY="http://$HTTP_ADDR"
VHOST="${BATON_DEMO_VHOST:-baton-demo}"
DATA_DIR="${BATON_DEMO_DIR:-./data/demo}"
AMQP_URL_DEMO="amqp://guest:guest@127.0.0.1:5672/$VHOST"
BATON="./target/release/baton"
LOG="$DATA_DIR/baton.log"
BATON_PID=""
# The short comparison that runs first (baton compare makes and deletes its own two vhosts).
COMPARE_REQUESTS=300
COMPARE_CONCURRENCY=16
COMPARE_REPORT="./reports/compare.html"
COMPARE_DIR="./data/compare"
COMPARE_TABLE="./reports/compare.txt"

# ---------------------------------------------------------------------------------------------
say "checking the Rust toolchain and the local RabbitMQ"
ensure_rust
ensure_rabbitmq

say "building baton (cargo build --release -p baton-cli; the first build takes a few minutes)"
cargo build --release -p baton-cli
[ -x "$BATON" ] || die "the build finished but $BATON is missing."

# ---------------------------------------------------------------------------------------------
# Checked before the comparison, so a taken port fails at once rather than after it.
if port_in_use "$HTTP_PORT"; then
    die "port $HTTP_PORT on 127.0.0.1 is already taken (another demo still running? see: ss -ltnp 'sport = :$HTTP_PORT'). Stop that program, or pick another address: BATON_DEMO_HTTP=127.0.0.1:8081 scripts/demo.sh"
fi

# ---------------------------------------------------------------------------------------------
# The comparison: both modes (workflow and events) on the same load and the same fault plan
# (the default one: refusals, delays, duplicates, a crash of routing, connection drops), each in
# a fresh vhost it makes and deletes itself and a fresh data dir under $COMPARE_DIR. The table
# goes to stdout (kept in $COMPARE_TABLE), the progress bar to stderr, the charts to the report.
# A failure is reported and the demo goes on with the workflow system.
say "comparing the two modes: baton compare, $COMPARE_REQUESTS requests at concurrency $COMPARE_CONCURRENCY (about 20 seconds)"
mkdir -p "$(dirname "$COMPARE_REPORT")"
rm -f "$COMPARE_REPORT" "$COMPARE_TABLE"
compare_ok=0
COMPARE_SUMMARY="failed this time (see above); retry with: $BATON compare --requests $COMPARE_REQUESTS"
if BATON_MGMT_PASSWORD="$BATON_MGMT_PASS" "$BATON" compare \
    --requests "$COMPARE_REQUESTS" --concurrency "$COMPARE_CONCURRENCY" \
    --report "$COMPARE_REPORT" --out-dir "$COMPARE_DIR" \
    --mgmt-url "$BATON_MGMT_URL" --mgmt-user "$BATON_MGMT_USER" >"$COMPARE_TABLE"; then
    compare_ok=1
fi
if [ "$compare_ok" -eq 1 ] && [ -s "$COMPARE_REPORT" ]; then
    echo
    cat "$COMPARE_TABLE"
    echo
    REPORT_ABS="$(cd "$(dirname "$COMPARE_REPORT")" && pwd)/$(basename "$COMPARE_REPORT")"
    say "the side-by-side table is above; docs/modes.md explains every row"
    say "HTML report (charts): $REPORT_ABS"
    say "  open it in a browser: file://$REPORT_ABS   (or: xdg-open $REPORT_ABS)"
    say "  the two runs' databases are in $COMPARE_DIR/workflow and $COMPARE_DIR/events"
    COMPARE_SUMMARY="file://$REPORT_ABS   (table: $COMPARE_TABLE)"
else
    if [ -s "$COMPARE_TABLE" ]; then cat "$COMPARE_TABLE"; fi
    warn "baton compare FAILED (its error is above); there is no comparison table or report this time."
    warn "the demo goes on with the workflow system. To retry the comparison alone:"
    warn "  $BATON compare --requests $COMPARE_REQUESTS --concurrency $COMPARE_CONCURRENCY --report $COMPARE_REPORT --out-dir $COMPARE_DIR"
fi

# ---------------------------------------------------------------------------------------------
say "creating a fresh vhost '$VHOST' through the management API"
code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 -u "$BATON_MGMT_USER:$BATON_MGMT_PASS" \
    -X DELETE "$BATON_MGMT_URL/api/vhosts/$VHOST")"
case "$code" in
    204 | 404) ;;
    *) die "could not delete the old vhost '$VHOST' (HTTP $code from $BATON_MGMT_URL)." ;;
esac
mgmt PUT "/vhosts/$VHOST" -d '{"description":"Baton demo"}' >/dev/null
mgmt PUT "/permissions/$VHOST/$BATON_MGMT_USER" -d '{"configure":".*","write":".*","read":".*"}' >/dev/null

say "fresh data dir $DATA_DIR"
rm -rf "$DATA_DIR"
mkdir -p "$DATA_DIR"

# Stop baton on Ctrl-C, on kill, and if this script fails half-way.
# shellcheck disable=SC2317  # called from the traps below
stop_baton() {
    trap - INT TERM EXIT
    if [ -n "$BATON_PID" ] && kill -0 "$BATON_PID" 2>/dev/null; then
        say "stopping baton (pid $BATON_PID)"
        kill -TERM "$BATON_PID" 2>/dev/null || true
        local deadline=$((SECONDS + 20))
        while kill -0 "$BATON_PID" 2>/dev/null; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                warn "baton did not stop within 20 s; killing it"
                kill -KILL "$BATON_PID" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
        wait "$BATON_PID" 2>/dev/null || true
        say "stopped; the databases stay in $DATA_DIR and the queues in vhost '$VHOST'"
    fi
}
trap 'stop_baton; exit 130' INT
trap 'stop_baton; exit 143' TERM
trap 'stop_baton' EXIT

say "starting baton up --mode workflow (logs: $LOG)"
RUST_LOG="${RUST_LOG:-info}" "$BATON" up --mode workflow \
    --data-dir "$DATA_DIR" --amqp-url "$AMQP_URL_DEMO" --http "$HTTP_ADDR" \
    >"$LOG" 2>&1 &
BATON_PID=$!

gateway_ready() {
    if ! kill -0 "$BATON_PID" 2>/dev/null; then
        printf 'error: baton exited during start-up; the end of %s:\n' "$LOG" >&2
        tail -n 20 "$LOG" >&2 || true
        exit 1
    fi
    curl -sf -o /dev/null --max-time 2 "$GATEWAY/health"
}
say "waiting up to 60 s for $GATEWAY/health"
deadline=$((SECONDS + 60))
until gateway_ready; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        tail -n 20 "$LOG" >&2 || true
        die "timed out after 60 s waiting for $GATEWAY/health (the end of $LOG is above)."
    fi
    sleep 0.5
done
say "gateway is up"

# ---------------------------------------------------------------------------------------------
LAST_WORKFLOW=""
REFUSED_WORKFLOW=""

create_space() {
    local name="$1" owner="$2" expect="$3" out rc=0 wf
    printf '\n--- create-space --name %s --owner %s   (expected: %s)\n' "$name" "$owner" "$expect"
    out="$("$BATON" create-space --name "$name" --owner "$owner" --gateway "$GATEWAY")" || rc=$?
    printf '%s\n' "$out"
    wf="$(printf '%s\n' "$out" | sed -n 's/.*"workflow_id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | head -n 1)"
    if [ "$rc" -eq 0 ]; then
        printf '    -> created (exit 0)\n'
        if [ -n "$wf" ]; then LAST_WORKFLOW="$wf"; fi
    else
        printf '    -> refused (exit %s)\n' "$rc"
        if [ -n "$wf" ]; then REFUSED_WORKFLOW="$wf"; fi
    fi
    return 0
}

say "creating spaces through the gateway"
create_space acme alice "200"
create_space blog alice "200"
create_space shop bob "200"
create_space admin bob "409 at routing: 'admin' is a reserved route; records, placement and entitlements are undone in reverse order"
echo

# The client gets its 200 once the email is committed to the orchestrator's outbox, not sent;
# give the notifier a few seconds before declaring a missing email an inconsistency.
say "checking the cross-service invariant (baton audit; retried for up to 30 s while the last emails go out)"
deadline=$((SECONDS + 30))
audit_clean=1
until "$BATON" audit --data-dir "$DATA_DIR" >"$DATA_DIR/audit.txt" 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        cat "$DATA_DIR/audit.txt"
        warn "baton audit still reports the inconsistencies above after 30 s."
        audit_clean=0
        break
    fi
    sleep 1
done
if [ "$audit_clean" -eq 1 ]; then
    cat "$DATA_DIR/audit.txt"
    say "audit clean: every space that got a 200 has its record, shard, licence, route and email; the refused one has none"
fi

# ---------------------------------------------------------------------------------------------
WF_EXAMPLE="${REFUSED_WORKFLOW:-${LAST_WORKFLOW:-<workflow_id>}}"
cat <<EOT

================================================================================================
 Baton is running in workflow mode.

 HTTP API   $GATEWAY
   curl -s $GATEWAY/health
   curl -s -X POST $GATEWAY/spaces -H 'content-type: application/json' \\
        -d '{"name":"docs","owner":"carol"}'
   curl -s -X POST $GATEWAY/spaces -H 'content-type: application/json' \\
        -d '{"name":"www","owner":"carol"}'          # 409, refused at routing, rolled back
   curl -s $GATEWAY/workflows/$WF_EXAMPLE
                                                    # the saga's timeline, with its compensations

 CLI
   $BATON create-space --name notes --owner dave
   BATON_DATA_DIR=$DATA_DIR $BATON workflows list
   BATON_DATA_DIR=$DATA_DIR $BATON workflows show $WF_EXAMPLE
   $BATON audit --data-dir $DATA_DIR

 RabbitMQ management UI   $BATON_MGMT_URL   (login guest / guest)
   Select the virtual host '$VHOST' (top right), then open the Queues tab:
   <service>.commands, orchestrator.replies, gateway.main.outcomes, their consumers,
   and the .dlq queues (docs/operations.md explains what to look at).

 Logs: $LOG        Databases: $DATA_DIR/*.db
 Comparison of the two modes: $COMPARE_SUMMARY
 Press Ctrl-C to stop.
================================================================================================
EOT

rc=0
wait "$BATON_PID" || rc=$?
# Reached only if baton stopped by itself (Ctrl-C runs the INT trap instead).
BATON_PID=""
printf 'error: baton exited on its own with status %s; the end of %s:\n' "$rc" "$LOG" >&2
tail -n 20 "$LOG" >&2 || true
exit 1
