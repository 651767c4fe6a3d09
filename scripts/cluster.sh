#!/usr/bin/env bash
# A local three-node RabbitMQ cluster on 127.0.0.1, for trying Baton's failover and for tests.
#
#   scripts/cluster.sh [start] [--users DIR]  # start what is not running, join the nodes, print
#                                             # the AMQP_URL to use (stdout); with --users, also
#                                             # Baton's users (scripts/broker-users.sh) in DIR
#   scripts/cluster.sh status                 # which nodes run, and what the cluster says
#   scripts/cluster.sh stop [N]               # stop every node (or node N) cleanly; data kept
#   scripts/cluster.sh kill N                 # SIGKILL node N, as a crash (start brings it back)
#   scripts/cluster.sh freeze N               # SIGSTOP node N, as a stalled machine (thaw N
#                                             # lets it go on: SIGCONT)
#   scripts/cluster.sh ctl N ARGS...          # rabbitmqctl ARGS against node N
#   scripts/cluster.sh purge                  # stop every node and delete the cluster's data
#
# Each node runs the installed server with its own node name (baton-c1@localhost, ...), ports
# (AMQP 5681-5683, management 15681-15683, Erlang distribution 25681-25683), config, logs and
# data, all under one directory; the three share one Erlang cookie (one HOME) and nothing with
# the default node on 5672. Quorum queues get a member on every node
# (broker/cluster.advanced.config). Running `start` again is harmless: it starts only the nodes
# that are down and joins only the nodes that are not in the cluster yet.
#
# Settings (environment):
#   BATON_CLUSTER_DIR        where the nodes keep everything
#                            (${XDG_STATE_HOME:-$HOME/.local/state}/baton/cluster)
#   BATON_CLUSTER_PORT       AMQP port of node 1; node N listens on PORT+N-1        (5681)
#   BATON_CLUSTER_MGMT_PORT  management port of node 1                             (15681)
#   BATON_CLUSTER_DIST_PORT  Erlang distribution port of node 1                    (25681)
#   BATON_CLUSTER_NAME       node name prefix: <NAME>1@localhost ...              (baton-c)
#   BATON_CLUSTER_WAIT_SECS  how long to wait for a node to start                  (120)
# Layout: DIR/home (the shared cookie), DIR/<NAME>N/{rabbitmq.conf,log,mnesia,node.pid}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

NODES=3
PORT="${BATON_CLUSTER_PORT:-5681}"
MGMT_PORT="${BATON_CLUSTER_MGMT_PORT:-15681}"
DIST_PORT="${BATON_CLUSTER_DIST_PORT:-25681}"
NAME="${BATON_CLUSTER_NAME:-baton-c}"
WAIT_SECS="${BATON_CLUSTER_WAIT_SECS:-120}"
DIR="${BATON_CLUSTER_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/baton/cluster}"
case "$NAME" in *[!A-Za-z0-9_-]*) die "BATON_CLUSTER_NAME may hold only letters, digits, '_' and '-'." ;; esac
BIN=/usr/lib/rabbitmq/bin
[ -x "$BIN/rabbitmq-server" ] || BIN="$(dirname "$(command -v rabbitmq-server || echo /usr/sbin/rabbitmq-server)")"

usage() {
    sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
}

node() { printf '%s%s@localhost' "$NAME" "$1"; }
node_dir() { printf '%s/%s%s' "$DIR" "$NAME" "$1"; }
amqp_port() { echo $((PORT + $1 - 1)); }
mgmt_port() { echo $((MGMT_PORT + $1 - 1)); }
dist_port() { echo $((DIST_PORT + $1 - 1)); }

# ctl N ARGS...: rabbitmqctl against node N, with the cluster's cookie.
ctl() {
    local n="$1"
    shift
    HOME="$DIR/home" RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" "$BIN/rabbitmqctl" -n "$(node "$n")" "$@"
}

# pid_of N: the OS pid of node N's VM, if it runs.
pid_of() {
    local f
    f="$(node_dir "$1")/node.pid"
    [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"
}

# node_up N: node N's management API answers (the last thing a node starts).
node_up() {
    curl -sf -o /dev/null --max-time 5 -u guest:guest "http://127.0.0.1:$(mgmt_port "$1")/api/overview"
}

# check_ports N: node N's ports are free, or already node N's.
check_ports() {
    local n="$1" p
    for p in "$(amqp_port "$n")" "$(mgmt_port "$n")" "$(dist_port "$n")"; do
        if port_in_use "$p"; then
            die "port $p of node $(node "$n") is taken by another program; pick other ports with BATON_CLUSTER_PORT, BATON_CLUSTER_MGMT_PORT and BATON_CLUSTER_DIST_PORT."
        fi
    done
}

# launch N: start node N in the background, detached from this shell.
launch() {
    local n="$1" d
    d="$(node_dir "$n")"
    mkdir -p "$d/log" "$d/mnesia"
    cat >"$d/rabbitmq.conf" <<CONF
# Node $(node "$n") of Baton's local cluster (written by scripts/cluster.sh at each start).
listeners.tcp.default = 127.0.0.1:$(amqp_port "$n")
management.tcp.ip = 127.0.0.1
management.tcp.port = $(mgmt_port "$n")
max_message_size = 1048576
# Of three nodes, the one cut off from the other two stops rather than going on alone.
cluster_partition_handling = pause_minority
CONF
    say "starting node $(node "$n") (AMQP 127.0.0.1:$(amqp_port "$n"), management http://127.0.0.1:$(mgmt_port "$n"), data in $d)"
    (
        cd "$d"
        HOME="$DIR/home" RABBITMQ_NODENAME="$(node "$n")" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
            RABBITMQ_NODE_PORT="$(amqp_port "$n")" RABBITMQ_DIST_PORT="$(dist_port "$n")" \
            RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/advanced.config" \
            RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" \
            RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" RABBITMQ_PID_FILE="$d/node.pid" \
            ERL_EPMD_ADDRESS=127.0.0.1 \
            setsid nohup "$BIN/rabbitmq-server" >"$d/server.out" 2>&1 </dev/null &
    )
}

# nodes_seen_by N: the cluster's nodes as node N's management API lists them (JSON; quicker
# than rabbitmqctl, whose every call starts a VM).
nodes_seen_by() {
    curl -sf --max-time 10 -u guest:guest "http://127.0.0.1:$(mgmt_port "$1")/api/nodes?columns=name,running"
}

# in_cluster N: node 1 counts node N among the cluster's nodes.
in_cluster() {
    nodes_seen_by 1 | jq -e --arg n "$(node "$1")" 'map(.name) | index($n)' >/dev/null
}

# running_nodes N: the running nodes of the cluster, as node N sees them.
running_nodes() {
    nodes_seen_by "$1" | jq -r 'map(select(.running) | .name) | join(", ")'
}

urls() {
    local n out=""
    for n in $(seq 1 "$NODES"); do
        out+="${out:+,}amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"
    done
    printf '%s' "$out"
}

start() {
    local users="" n
    while [ $# -gt 0 ]; do
        case "$1" in
            --users) users="${2:?--users needs a directory}"; shift 2 ;;
            *) usage >&2; die "unknown argument '$1'; see the usage above." ;;
        esac
    done
    ensure_curl
    ensure_jq
    has rabbitmq-server || [ -x "$BIN/rabbitmq-server" ] \
        || die "RabbitMQ is not installed. On Debian or Ubuntu: sudo apt-get install -y rabbitmq-server, then run this script again."
    mkdir -p "$DIR/home"
    # Erlang schedulers that do not spin while idle: three nodes on a machine of a few cores
    # would otherwise take CPU from everything else running beside them.
    echo 'SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none"' >"$DIR/rabbitmq-env.conf"
    echo "[rabbitmq_management]." >"$DIR/enabled_plugins"
    cp "$ROOT/broker/cluster.advanced.config" "$DIR/advanced.config"
    # All at once: nodes that stopped together wait at boot for the one that stopped last.
    local started=()
    for n in $(seq 1 "$NODES"); do
        if pid_of "$n" >/dev/null; then
            say "node $(node "$n") already runs (pid $(pid_of "$n"))"
        else
            check_ports "$n"
            launch "$n"
            started+=("$n")
        fi
    done
    for n in $(seq 1 "$NODES"); do
        if ! node_up "$n"; then
            say "waiting up to ${WAIT_SECS} s for node $(node "$n")"
            wait_until "$WAIT_SECS" "node $(node "$n") to start (see $(node_dir "$n")/log)" node_up "$n"
        fi
    done
    for n in $(seq 2 "$NODES"); do
        if in_cluster "$n"; then
            continue
        fi
        say "joining node $(node "$n") to $(node 1) (rabbitmqctl stop_app, join_cluster, start_app)"
        # join_cluster resets the node first. The CLI echoes the node's log while it restarts:
        # shown only if a step fails.
        local step out
        for step in stop_app "join_cluster $(node 1)" start_app; do
            # shellcheck disable=SC2086
            out="$(ctl "$n" -q $step 2>&1)" || die "rabbitmqctl $step on $(node "$n") failed: $out"
        done
        wait_until "$WAIT_SECS" "node $(node "$n") to start again after joining" node_up "$n"
    done
    say "cluster of $NODES nodes running: $(running_nodes 1)"
    if [ -n "$users" ]; then
        local hosts=""
        for n in $(seq 1 "$NODES"); do
            hosts+="${hosts:+,}127.0.0.1:$(amqp_port "$n")"
        done
        say "Baton's users and permissions (scripts/broker-users.sh), their URL lists in $users"
        BATON_MGMT_URL="http://127.0.0.1:$(mgmt_port 1)" BATON_MGMT_USER=guest BATON_MGMT_PASS=guest \
            "$ROOT/scripts/broker-users.sh" --amqp-host "$hosts" --out "$users" >&2
    fi
    say "management UI: http://127.0.0.1:$(mgmt_port 1) (guest/guest); stop with: scripts/cluster.sh stop"
    say "point Baton at every node (stdout): export AMQP_URL='$(urls)'"
    urls
    echo
}

stop() {
    local only="${1:-}" n pid
    for n in $(seq "$NODES" -1 1); do
        [ -z "$only" ] || [ "$only" = "$n" ] || continue
        if ! pid="$(pid_of "$n")"; then
            say "node $(node "$n") is not running"
            continue
        fi
        say "stopping node $(node "$n") (rabbitmqctl stop)"
        ctl "$n" -q stop >&2 2>&1 || kill "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 60))
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                warn "node $(node "$n") did not stop within 60 s; killing it"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.5
        done
        rm -f "$(node_dir "$n")/node.pid"
    done
}

status() {
    local n pid running=0
    for n in $(seq 1 "$NODES"); do
        if pid="$(pid_of "$n")"; then
            running=$((running + 1))
            if node_up "$n"; then
                echo "$(node "$n"): running (pid $pid), AMQP 127.0.0.1:$(amqp_port "$n"), management http://127.0.0.1:$(mgmt_port "$n")"
            else
                echo "$(node "$n"): starting (pid $pid)"
            fi
        else
            echo "$(node "$n"): stopped"
        fi
    done
    for n in $(seq 1 "$NODES"); do
        if node_up "$n"; then
            echo "cluster as node $n sees it: running $(running_nodes "$n")"
            echo "AMQP_URL=$(urls)"
            break
        fi
    done
    [ "$running" -gt 0 ] || echo "(data in $DIR; scripts/cluster.sh start starts it)"
}

node_number() {
    case "${1:-}" in
        [1-9]) [ "$1" -le "$NODES" ] || die "there are $NODES nodes; '$1' is not one." ;;
        *) die "name a node by its number, 1 to $NODES." ;;
    esac
}

cmd="${1:-start}"
[ $# -eq 0 ] || shift
case "$cmd" in
    start) start "$@" ;;
    stop)
        [ $# -eq 0 ] || node_number "$1"
        stop "${1:-}"
        ;;
    status) status ;;
    kill)
        node_number "${1:-}"
        if pid="$(pid_of "$1")"; then
            say "killing node $(node "$1") (SIGKILL to pid $pid)"
            kill -KILL "$pid"
        else
            say "node $(node "$1") is not running"
        fi
        ;;
    freeze | thaw)
        node_number "${1:-}"
        sig=STOP
        [ "$cmd" = thaw ] && sig=CONT
        if pid="$(pid_of "$1")"; then
            say "${cmd}ing node $(node "$1") (SIG$sig to pid $pid)"
            kill "-$sig" "$pid"
        else
            die "node $(node "$1") is not running"
        fi
        ;;
    ctl)
        node_number "${1:-}"
        n="$1"
        shift
        ctl "$n" "$@"
        ;;
    purge)
        [ -f "$DIR/advanced.config" ] && [ -d "$DIR/home" ] \
            || die "$DIR does not look like a cluster made by this script; nothing deleted."
        stop
        rm -rf "$DIR"
        say "deleted $DIR"
        ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
esac
