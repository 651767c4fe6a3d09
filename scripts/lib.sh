# shellcheck shell=bash
#
# Helpers shared by scripts/demo.sh and scripts/test.sh. Source it from a script that runs with
# `set -euo pipefail`:
#
#   source "$(dirname "$0")/lib.sh"
#   ensure_rabbitmq
#
# Every function is idempotent and every wait is bounded. Progress goes to stderr, so stdout
# stays free for data.
#
# Settings (environment):
#   BATON_MGMT_URL        management HTTP API of the local broker   (http://127.0.0.1:15672)
#   BATON_MGMT_USER/PASS  its login                                 (guest / guest)
#   BATON_WAIT_SECS       how long to wait for the broker to start  (60)

BATON_MGMT_URL="${BATON_MGMT_URL:-http://127.0.0.1:15672}"
BATON_MGMT_USER="${BATON_MGMT_USER:-guest}"
BATON_MGMT_PASS="${BATON_MGMT_PASS:-guest}"
BATON_WAIT_SECS="${BATON_WAIT_SECS:-60}"

# RabbitMQ's tools live in /usr/sbin, which is not on every user's PATH.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac
export PATH

# say MESSAGE...: one line of progress on stderr.
say() {
    printf '==> %s\n' "$*" >&2
}

# warn MESSAGE...: a problem that does not stop us.
warn() {
    printf 'warning: %s\n' "$*" >&2
}

# die MESSAGE...: what went wrong and what to do, then exit 1.
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

is_root() {
    [ "$(id -u)" -eq 0 ]
}

has() {
    command -v "$1" >/dev/null 2>&1
}

# can_apt: true when we may install Debian packages ourselves.
can_apt() {
    is_root && has apt-get
}

_APT_UPDATED=0

# apt_install PACKAGE...: install Debian packages (root only), running `apt-get update` once.
apt_install() {
    if [ "$_APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed; check the machine's package sources and network."
        _APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
        || die "apt-get install $* failed; install it by hand and run this script again."
}

# wait_until SECONDS WHAT COMMAND...: run COMMAND every second until it succeeds; exit 1 with a
# message naming WHAT after SECONDS.
wait_until() {
    local secs="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "timed out after ${secs} s waiting for ${what}."
        fi
        sleep 1
    done
}

# ensure_curl: curl is needed to talk to the management API and the gateway.
ensure_curl() {
    has curl && return 0
    if can_apt; then
        apt_install curl ca-certificates
    else
        die "curl is not installed; install it (Debian: sudo apt-get install curl) and run this script again."
    fi
}

# ensure_tool COMMAND PACKAGE WHY: COMMAND is on the PATH, installing Debian's PACKAGE when we
# may (root), or saying what to install and why.
ensure_tool() {
    has "$1" && return 0
    if can_apt; then
        apt_install "$2"
    else
        die "$1 is not installed; it is needed $3. Install it (Debian: sudo apt-get install $2) and run this script again."
    fi
}

# ensure_chromium: the console's browser test (tests/tests/console.rs) drives Debian's chromium
# through chromedriver; both come from Debian's packages.
ensure_chromium() {
    ensure_tool chromium chromium "by the console's browser test, to render its pages headless"
    ensure_tool chromedriver chromium-driver "by the console's browser test, to drive chromium"
}

# ensure_jq: scripts/broker-users.sh reads broker/permissions.json with jq (and a test runs it).
ensure_jq() {
    ensure_tool jq jq "by scripts/broker-users.sh to read broker/permissions.json"
}

# ensure_cc: rusqlite builds SQLite from source and needs a C compiler.
ensure_cc() {
    has cc && return 0
    if can_apt; then
        apt_install build-essential pkg-config
    else
        die "no C compiler (cc) found; install one (Debian: sudo apt-get install build-essential) and run this script again."
    fi
}

# ensure_rust: cargo must exist, at least the workspace's rust-version.
ensure_rust() {
    if ! has cargo && [ -x "$HOME/.cargo/bin/cargo" ]; then
        PATH="$HOME/.cargo/bin:$PATH"
        export PATH
    fi
    has cargo || die "cargo is not installed. Install Rust with rustup (https://rustup.rs): curl --proto '=https' -sSf https://sh.rustup.rs | sh, then open a new shell and run this script again."
    ensure_cc

    # Compare rustc's version with the workspace's rust-version, when both are readable.
    local want have
    want="$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml 2>/dev/null | head -n 1)"
    have="$(rustc --version 2>/dev/null | awk '{print $2}')"
    if [ -n "$want" ] && [ -n "$have" ] \
        && [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n 1)" != "$want" ]; then
        die "Rust $have is older than this workspace's rust-version $want; run 'rustup update stable'."
    fi
    say "using $(cargo --version)"
}

# mgmt_ok: the management API answers with our login.
mgmt_ok() {
    curl -sf -o /dev/null --max-time 5 -u "$BATON_MGMT_USER:$BATON_MGMT_PASS" "$BATON_MGMT_URL/api/overview"
}

# rabbit_ping: the local node is up.
rabbit_ping() {
    rabbitmq-diagnostics -q ping >/dev/null 2>&1
}

# can_admin_rabbit: rabbitmqctl & co. work only for root and the rabbitmq user.
can_admin_rabbit() {
    is_root || [ "$(id -un)" = "rabbitmq" ]
}

# ensure_rabbitmq: a local RabbitMQ is running with the management plugin, and
# $BATON_MGMT_URL answers with guest/guest. Installs it from Debian's packages if missing
# (root only), starts it if stopped, enables the plugin. Quick no-op when all is there.
ensure_rabbitmq() {
    ensure_curl

    if mgmt_ok; then
        ensure_rabbit_prometheus
    say "RabbitMQ is running; management API answers at $BATON_MGMT_URL"
        return 0
    fi

    # Installed?
    if ! has rabbitmq-server; then
        if can_apt; then
            say "RabbitMQ is not installed; installing rabbitmq-server from Debian's packages"
            apt_install rabbitmq-server
            install_broker_settings
        else
            die "RabbitMQ is not installed. On Debian or Ubuntu: sudo apt-get update && sudo apt-get install -y rabbitmq-server, then run this script again. With Docker: docker compose up -d rabbitmq."
        fi
    fi

    # Running?
    local was_running=1
    if ! rabbit_ping; then
        was_running=0
        if ! can_admin_rabbit; then
            die "RabbitMQ is installed but not running (or not reachable). Start it with: sudo rabbitmq-server -detached (or sudo systemctl start rabbitmq-server), then run this script again."
        fi
        say "starting RabbitMQ (rabbitmq-server -detached)"
        if [ -d /run/systemd/system ] && has systemctl; then
            systemctl start rabbitmq-server >&2 || rabbitmq-server -detached >&2
        else
            rabbitmq-server -detached >&2 \
                || die "rabbitmq-server -detached failed; see the logs in /var/log/rabbitmq/."
        fi
        say "waiting up to ${BATON_WAIT_SECS} s for RabbitMQ to answer 'rabbitmq-diagnostics -q ping'"
        wait_until "$BATON_WAIT_SECS" "RabbitMQ to start (see /var/log/rabbitmq/ for why it did not)" rabbit_ping
        say "RabbitMQ is up"
    fi

    # Management plugin. A broker that was already running is someone's: it is changed only when
    # its plugin is off, and that is said before it is done.
    if ! mgmt_ok; then
        if ! can_admin_rabbit; then
            warn "cannot check the management plugin as $(id -un); if it is off, run: sudo rabbitmq-plugins enable rabbitmq_management"
        elif rabbitmq-plugins -q is_enabled rabbitmq_management >/dev/null 2>&1; then
            say "the management plugin is enabled; its API at $BATON_MGMT_URL does not answer yet"
        else
            if [ "$was_running" -eq 1 ]; then
                say "RabbitMQ was already running, without its management plugin, which Baton needs: enabling it on that broker now (rabbitmq-plugins enable rabbitmq_management; it stays enabled, 'rabbitmq-plugins disable rabbitmq_management' turns it off again)"
            else
                say "enabling the management plugin (rabbitmq-plugins enable rabbitmq_management)"
            fi
            rabbitmq-plugins enable rabbitmq_management >&2 \
                || die "could not enable the management plugin; run 'rabbitmq-plugins enable rabbitmq_management' by hand to see why."
        fi
        say "waiting up to ${BATON_WAIT_SECS} s for the management API at $BATON_MGMT_URL"
        wait_until "$BATON_WAIT_SECS" \
            "the management API at $BATON_MGMT_URL/api/overview to answer with login $BATON_MGMT_USER (is the plugin on? does the guest user exist?)" \
            mgmt_ok
    fi
    ensure_rabbit_prometheus
    say "RabbitMQ is running; management API answers at $BATON_MGMT_URL"
}

# The PostgreSQL server the tests create their databases on (trust auth for postgres on loopback).
BATON_TEST_DATABASE_URL="${BATON_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

pg_ok() {
    psql "$BATON_TEST_DATABASE_URL" -Atqc 'SELECT 1' >/dev/null 2>&1
}

# ensure_postgres: a PostgreSQL server answering at $BATON_TEST_DATABASE_URL, installed from
# Debian's packages and started when it is not (its loopback connections trusted for the
# postgres user, as the tests' throw-away databases need).
ensure_postgres() {
    if pg_ok; then
        say "PostgreSQL answers at $BATON_TEST_DATABASE_URL"
        return 0
    fi
    if ! has pg_ctlcluster; then
        if can_apt; then
            say "PostgreSQL is not installed; installing postgresql from Debian's packages"
            apt_install postgresql postgresql-client
        else
            die "PostgreSQL is not installed. On Debian or Ubuntu: sudo apt-get install -y postgresql, then run this script again."
        fi
    fi
    is_root || die "PostgreSQL does not answer at $BATON_TEST_DATABASE_URL; start it (sudo pg_ctlcluster <version> main start) and let postgres connect over 127.0.0.1 (trust), then run this script again."
    local version
    version="$(ls /usr/lib/postgresql | sort -n | tail -1)"
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    if [ -f "$hba" ] && ! grep -q '^host all postgres 127.0.0.1/32 trust' "$hba"; then
        say "trusting the postgres user's loopback connections in $hba (the tests' throw-away databases)"
        sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
    fi
    say "starting PostgreSQL $version (pg_ctlcluster $version main restart)"
    pg_ctlcluster "$version" main restart >&2 || service postgresql restart >&2 \
        || die "PostgreSQL did not start; see /var/log/postgresql/."
    wait_until "$BATON_WAIT_SECS" "PostgreSQL to answer at $BATON_TEST_DATABASE_URL (see /var/log/postgresql/)" pg_ok
    say "PostgreSQL answers at $BATON_TEST_DATABASE_URL"
}

# install_broker_settings: on a node this script has just installed (and only when it has no
# configuration of its own yet), put Baton's broker/rabbitmq.conf and enabled_plugins in
# /etc/rabbitmq: loopback listeners, the management plugin, a 1 MiB message limit. The node the
# package started is stopped, so that the start below reads them.
# RabbitMQ's own Prometheus endpoint (:15692/metrics, rabbitmq_prometheus), beside each Baton
# component's /metrics. Not needed to run Baton: a failure to enable it is only said.
ensure_rabbit_prometheus() {
    can_admin_rabbit || return 0
    rabbitmq-plugins -q is_enabled rabbitmq_prometheus >/dev/null 2>&1 && return 0
    say "enabling RabbitMQ's Prometheus endpoint (rabbitmq-plugins enable rabbitmq_prometheus; :15692/metrics)"
    rabbitmq-plugins enable rabbitmq_prometheus >&2 \
        || warn "could not enable rabbitmq_prometheus; RabbitMQ's own metrics stay off"
}

install_broker_settings() {
    local broker
    broker="$(cd "$(dirname "${BASH_SOURCE[0]}")/../broker" && pwd)"
    if [ -e /etc/rabbitmq/rabbitmq.conf ] || [ ! -d /etc/rabbitmq ]; then
        return 0
    fi
    say "installing Baton's broker settings in /etc/rabbitmq (loopback only, management and Prometheus plugins, 1 MiB messages)"
    install -m 644 "$broker/rabbitmq.conf" /etc/rabbitmq/rabbitmq.conf
    install -m 644 "$broker/enabled_plugins" /etc/rabbitmq/enabled_plugins
    if rabbit_ping; then
        say "stopping the node the package started, to start it again with these settings"
        if [ -d /run/systemd/system ] && has systemctl; then
            systemctl stop rabbitmq-server >&2 || rabbitmqctl stop >&2 || true
        else
            rabbitmqctl stop >&2 || true
        fi
    fi
}

# mgmt METHOD PATH [curl args...]: call the management API; fails on an HTTP error.
mgmt() {
    local method="$1" path="$2"
    shift 2
    curl -sS -f --max-time 30 -u "$BATON_MGMT_USER:$BATON_MGMT_PASS" \
        -X "$method" -H 'content-type: application/json' "$@" "$BATON_MGMT_URL/api$path"
}

# scratch_vhost NAME USER: a vhost of its own for a script's run, USER allowed everything in it;
# `mgmt DELETE "/vhosts/NAME"` removes it and all it holds.
scratch_vhost() {
    mgmt PUT "/vhosts/$1" -o /dev/null
    mgmt PUT "/permissions/$1/$2" -d '{"configure":".*","write":".*","read":".*"}' -o /dev/null
}

# port_in_use PORT: something on 127.0.0.1 accepts connections on PORT.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1
}

# url_encode STRING: STRING percent-encoded for a URL path segment ("/" -> "%2F").
url_encode() {
    local s="$1" out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c="${s:i:1}"
        case "$c" in
            [A-Za-z0-9._~-]) out+="$c" ;;
            *) out+="$(printf '%%%02X' "'$c")" ;;
        esac
    done
    printf '%s' "$out"
}

# random_secret: 32 hex characters from /dev/urandom (a password safe in any URL).
random_secret() {
    od -An -tx1 -N16 /dev/urandom | tr -d ' \n'
}
