#!/usr/bin/env bash
# A throwaway RabbitMQ node beside the main one, for runs that restart the broker (`baton chaos`)
# or raise its alarms without disturbing anything else.
#
#   scripts/scratch-broker.sh start   # AMQP on 127.0.0.1:5673, management on 127.0.0.1:15673
#   scripts/scratch-broker.sh ctl     # prints the rabbitmqctl command for it (for --broker-ctl)
#   scripts/scratch-broker.sh stop    # stops it and deletes its data
#
# It uses the installed server with its own node name, ports, home (hence Erlang cookie), data,
# logs and config, under ./data/scratch-broker. Settings: BATON_SCRATCH_PORT (5673),
# BATON_SCRATCH_MGMT_PORT (15673), BATON_SCRATCH_DIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

PORT="${BATON_SCRATCH_PORT:-5673}"
MGMT_PORT="${BATON_SCRATCH_MGMT_PORT:-15673}"
DIR="$(mkdir -p "${BATON_SCRATCH_DIR:-./data/scratch-broker}" && cd "${BATON_SCRATCH_DIR:-./data/scratch-broker}" && pwd)"
NODE="baton-scratch@localhost"
BIN=/usr/lib/rabbitmq/bin
[ -x "$BIN/rabbitmq-server" ] || BIN="$(dirname "$(command -v rabbitmq-server || echo /usr/sbin/rabbitmq-server)")"

ctl_cmd() {
    printf 'env HOME=%s RABBITMQ_CONF_ENV_FILE=%s %s -n %s' "$DIR/home" "$DIR/rabbitmq-env.conf" "$BIN/rabbitmqctl" "$NODE"
}

case "${1:-}" in
start)
    ensure_rabbitmq >/dev/null
    if curl -sf -o /dev/null -u guest:guest "http://127.0.0.1:$MGMT_PORT/api/overview"; then
        say "the scratch broker already runs (AMQP 127.0.0.1:$PORT, management http://127.0.0.1:$MGMT_PORT)"
        exit 0
    fi
    mkdir -p "$DIR/home" "$DIR/log" "$DIR/mnesia"
    # Erlang schedulers that do not spin while idle: a second node on a machine of a few cores
    # would otherwise take CPU from everything else running beside it.
    echo 'SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none"' >"$DIR/rabbitmq-env.conf"
    echo "[rabbitmq_management]." >"$DIR/enabled_plugins"
    cat >"$DIR/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT_PORT
loopback_users = none
max_message_size = 1048576
CONF
    say "starting the scratch broker $NODE (data in $DIR)"
    (
        cd "$DIR"
        HOME="$DIR/home" RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$PORT" \
            RABBITMQ_DIST_PORT="$((PORT + 20000))" RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf" \
            RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" \
            RABBITMQ_MNESIA_BASE="$DIR/mnesia" RABBITMQ_LOG_BASE="$DIR/log" RABBITMQ_PID_FILE="$DIR/node.pid" \
            nohup "$BIN/rabbitmq-server" >"$DIR/server.out" 2>&1 &
    )
    for _ in $(seq 1 120); do
        if curl -sf -o /dev/null -u guest:guest "http://127.0.0.1:$MGMT_PORT/api/overview"; then
            say "scratch broker up: AMQP amqp://guest:guest@127.0.0.1:$PORT, management http://127.0.0.1:$MGMT_PORT"
            say "restart it from baton with: --broker-ctl \"$(ctl_cmd)\""
            exit 0
        fi
        sleep 0.5
    done
    die "the scratch broker did not come up within 60 s; see $DIR/log"
    ;;
ctl)
    ctl_cmd
    echo
    ;;
stop)
    if [ -f "$DIR/node.pid" ]; then
        # shellcheck disable=SC2046
        $(ctl_cmd) stop >/dev/null 2>&1 || kill "$(cat "$DIR/node.pid")" 2>/dev/null || true
    fi
    rm -rf "$DIR"
    say "scratch broker stopped and its data deleted"
    ;;
*)
    echo "usage: scripts/scratch-broker.sh start|ctl|stop" >&2
    exit 2
    ;;
esac
