#!/usr/bin/env bash
# Give every Baton component its own RabbitMQ user with least-privilege permissions.
#
#   scripts/broker-users.sh [--vhost V] [--prefix P] [--out DIR] [--amqp-host HOST:PORT]
#                           [--scheme amqp|amqps] [--rotate]
#
# Through the management HTTP API (curl; BATON_MGMT_URL, BATON_MGMT_USER, BATON_MGMT_PASS,
# default http://127.0.0.1:15672 with guest/guest), idempotently:
#   1. creates the vhost if it is missing;
#   2. imports the topology of broker/definitions.json into it, hybrid mode's follow-up queues
#      included (components under their own users cannot create the other components' queues,
#      see docs/security.md);
#   3. creates the users <prefix><component> (baton-records, ..., baton-search, ...,
#      baton-reconcile) with random passwords, and sets their permissions and topic
#      permissions (the routing keys each may publish on baton.events) from
#      broker/permissions.json;
#   4. writes each component's URL to <out>/<component>.url (mode 600), e.g.
#      amqp://baton-records:<password>@127.0.0.1:5672/%2F; with --amqp-host listing a cluster's
#      nodes (HOST:PORT,HOST:PORT,...), the comma-separated list of one URL per node.
#
# Running it again keeps the passwords already in <out> (--rotate makes new ones). Progress goes
# to stderr; the list of files and how to use them to stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

VHOST="/"
PREFIX="baton-"
OUT="data/credentials"
AMQP_HOST="127.0.0.1:5672"
SCHEME="amqp"
ROTATE=0

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --vhost) VHOST="${2:?--vhost needs a value}"; shift 2 ;;
        --prefix) PREFIX="${2:?--prefix needs a value}"; shift 2 ;;
        --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
        --amqp-host) AMQP_HOST="${2:?--amqp-host needs HOST:PORT (or a list: HOST:PORT,HOST:PORT)}"; shift 2 ;;
        --scheme) SCHEME="${2:?--scheme needs amqp or amqps}"; shift 2 ;;
        --rotate) ROTATE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'; see the usage above." ;;
    esac
done
case "$SCHEME" in amqp | amqps) ;; *) die "--scheme must be amqp or amqps, not '$SCHEME'." ;; esac
case "$PREFIX" in *[!A-Za-z0-9._-]*) die "--prefix may hold only letters, digits, '.', '_' and '-'." ;; esac

ensure_curl
ensure_jq
mgmt_ok || die "the management API at $BATON_MGMT_URL does not answer with login $BATON_MGMT_USER; start RabbitMQ (scripts/demo.sh does) or set BATON_MGMT_URL/USER/PASS."

PERMISSIONS="$ROOT/broker/permissions.json"
DEFINITIONS="$ROOT/broker/definitions.json"
V="$(url_encode "$VHOST")"

# 1. The vhost.
if ! mgmt GET "/vhosts/$V" >/dev/null 2>&1; then
    say "creating vhost '$VHOST'"
    mgmt PUT "/vhosts/$V" >/dev/null
    mgmt PUT "/permissions/$V/$(url_encode "$BATON_MGMT_USER")" \
        -d '{"configure":".*","write":".*","read":".*"}' >/dev/null
fi

# 2. The topology (idempotent: the same declarations every component makes).
say "importing broker/definitions.json into vhost '$VHOST'"
mgmt POST "/definitions/$V" --data-binary "@$DEFINITIONS" >/dev/null \
    || die "importing $DEFINITIONS failed; a queue may exist with other arguments (delete it, or the vhost, and run again)."

# 3. and 4. The users, their permissions, their URL files.
mkdir -p "$OUT"
chmod 700 "$OUT"
umask 077
written=()
while IFS= read -r entry; do
    component="$(jq -r '.component' <<<"$entry")"
    user="$PREFIX$component"
    file="$OUT/$component.url"
    password=""
    if [ "$ROTATE" -eq 0 ] && [ -f "$file" ]; then
        password="$(sed -n "s|^amqps\{0,1\}://$user:\([0-9a-f]*\)@.*|\1|p" "$file")"
    fi
    if [ -z "$password" ]; then
        password="$(random_secret)"
    fi
    say "user $user: permissions on '$VHOST' from broker/permissions.json"
    mgmt PUT "/users/$(url_encode "$user")" \
        -d "$(jq -n --arg p "$password" '{password: $p, tags: ""}')" >/dev/null
    mgmt PUT "/permissions/$V/$(url_encode "$user")" \
        -d "$(jq -c '{configure, write, read}' <<<"$entry")" >/dev/null
    # Topic permissions: the routing keys it may publish on a topic exchange (baton.events).
    # One PUT per exchange, each replacing the one before; a user with none listed has any
    # left from an earlier run removed.
    if [ "$(jq '.topic // [] | length' <<<"$entry")" -eq 0 ]; then
        mgmt DELETE "/topic-permissions/$V/$(url_encode "$user")" >/dev/null 2>&1 || true
    fi
    while IFS= read -r topic; do
        say "user $user: may publish $(jq -r '.write' <<<"$topic") on $(jq -r '.exchange' <<<"$topic")"
        mgmt PUT "/topic-permissions/$V/$(url_encode "$user")" -d "$topic" >/dev/null
    done < <(jq -c '.topic // [] | .[] | {exchange, write, read}' <<<"$entry")
    urls=""
    IFS=, read -ra hosts <<<"$AMQP_HOST"
    for host in "${hosts[@]}"; do
        urls+="${urls:+,}$SCHEME://$user:$password@$host/$V"
    done
    printf '%s\n' "$urls" >"$file.tmp"
    chmod 600 "$file.tmp"
    mv "$file.tmp" "$file"
    written+=("$component")
done < <(jq -c '.users[]' "$PERMISSIONS")

echo "Credentials written (mode 600) to $OUT/:"
for c in "${written[@]}"; do
    echo "  $OUT/$c.url"
done
echo
echo "Start each component with its own user, for example:"
for c in "${written[@]}"; do
    upper="$(printf '%s' "$c" | tr '[:lower:]' '[:upper:]')"
    case "$c" in
        reconcile) echo "  baton reconcile --amqp-url \"\$(cat $OUT/$c.url)\"" ;;
        gateway) echo "  BATON_${upper}_AMQP_URL_FILE=$OUT/$c.url baton run gateway --http 127.0.0.1:8080" ;;
        *) echo "  BATON_${upper}_AMQP_URL_FILE=$OUT/$c.url baton run $c" ;;
    esac
done
echo
echo "baton up reads the same variables, one per component. See docs/security.md."
