#!/usr/bin/env bash
# Run every test of Baton against a real local RabbitMQ and PostgreSQL.
#
#   scripts/test.sh                 # everything (about 20 minutes on 2 cores, plus the first
#                                   # build, about 6 minutes)
#   scripts/test.sh -E 'test(saga)' # extra arguments go to the test runner: nextest's filter
#                                   # expressions; without nextest, a plain `test(NAME)` is turned
#                                   # into cargo test's name filter
#
# It makes sure RabbitMQ is running with its management plugin and PostgreSQL answers on
# 127.0.0.1:5432 (installing or starting them when it can), and that the tools some tests use are there (jq, openssl for the TLS test, faketime
# for the clock-jump test), builds every target of the workspace, then runs the whole suite.
# Each integration test creates its own vhost through the management API and its own temporary
# data dir (and, on PostgreSQL, its own database), so the tests run in parallel and leave
# nothing behind. The saga and delivery tests run a second time with their state on PostgreSQL.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

say "step 1/4: checking the Rust toolchain, then formatting and lints (cargo fmt --check, clippy -D warnings)"
ensure_rust
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings

say "step 2/4: checking the local RabbitMQ and PostgreSQL, and the tools of some tests (jq, openssl, faketime, chromium)"
ensure_rabbitmq
ensure_postgres
export BATON_TEST_DATABASE_URL
ensure_jq
ensure_tool openssl openssl "by the TLS test, to make its certificates"
ensure_tool faketime faketime "by the clock-jump test, to move a component's clock"
ensure_chromium

# The test binaries run a second time on PostgreSQL.
POSTGRES_TESTS='binary(workflow) | binary(nested) | binary(console) | binary(events) | binary(delivery) | binary(crash) | binary(crash_points) | binary(reliability) | binary(cancel) | binary(idempotency) | binary(changed_workflow) | binary(gateway_input)'

# Where the tests find the broker; a test appends its own vhost to the AMQP URL.
export BATON_TEST_AMQP_URL="${BATON_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}"
export BATON_TEST_MGMT_URL="${BATON_TEST_MGMT_URL:-$BATON_MGMT_URL}"
say "tests use the broker at $BATON_TEST_AMQP_URL (management API $BATON_TEST_MGMT_URL, login guest/guest)"

say "step 3/4: building the workspace (cargo build --workspace --all-targets; about 6 minutes the first time)"
cargo build --workspace --all-targets

if cargo nextest --version >/dev/null 2>&1 && [ $# -gt 0 ]; then
    # The caller's own selection (nextest ORs several -E, so it is not combined with ours).
    say "step 4/4: running the tests you selected (cargo nextest run $*)"
    cargo nextest run --workspace --no-fail-fast --test-threads 1 "$@"
elif cargo nextest --version >/dev/null 2>&1; then
    # nextest does not run doc tests: run them first, so the suite's summary is the last thing printed.
    say "step 4/4: running the tests (doc tests with cargo test, then cargo nextest run; about 15 minutes on 2 cores)"
    cargo test --workspace --doc
    # One test at a time: each is isolated (own vhost, own data dir) and can run beside the
    # others, but several of them start a RabbitMQ node or a dozen processes of their own, and
    # on two cores their timeouts then measure the starvation rather than Baton.
    cargo nextest run --workspace --no-fail-fast --test-threads 1 -E 'not binary(chaos)'
    # The saga and delivery guarantees once more, every test's state in a PostgreSQL database of
    # its own (the tests of what only SQLite has, its files and its disk, stay on SQLite).
    say "running the saga and delivery tests again on PostgreSQL (BATON_TEST_STORE=postgres)"
    BATON_TEST_STORE=postgres cargo nextest run --workspace --no-fail-fast --test-threads 1 \
        -E "$POSTGRES_TESTS"
    # The chaos runs restart their own broker node and kill every component for 40 s; they run
    # alone, one after the other, after the rest, so that what they measure is the faults they
    # inject and not two cores starved by the other tests.
    say "running the chaos tests on their own (one per mode, about 2 minutes)"
    # Selected with --workspace, as above: `-p baton-tests` alone would resolve features
    # differently and rebuild half the dependency tree.
    cargo nextest run --workspace --no-fail-fast --test-threads 1 -E 'binary(chaos)'
else
    say "step 4/4: running the tests (cargo test; install cargo-nextest for a faster, clearer run)"
    # cargo test knows no filter expressions: `-E 'test(NAME)'` becomes the name filter NAME.
    args=()
    while [ $# -gt 0 ]; do
        case "$1" in
            -E)
                [ $# -ge 2 ] || die "-E needs a filter expression, e.g. -E 'test(saga)'"
                case "$2" in
                    'test('*')') f="${2#test(}"; args+=("${f%)}") ;;
                    *) die "without cargo-nextest only -E 'test(NAME)' is understood; install it with 'cargo install cargo-nextest --locked'" ;;
                esac
                shift 2
                ;;
            *) args+=("$1"); shift ;;
        esac
    done
    # One test at a time, for the reason given above.
    cargo test --workspace --no-fail-fast -- --test-threads 1 "${args[@]}"
    if [ ${#args[@]} -eq 0 ]; then
        say "running the saga and delivery tests again on PostgreSQL (BATON_TEST_STORE=postgres)"
        tests=()
        for t in $(grep -o 'binary([a-z_]*)' <<<"$POSTGRES_TESTS" | sed 's/binary(\(.*\))/\1/'); do tests+=(--test "$t"); done
        BATON_TEST_STORE=postgres cargo test -p baton-tests --no-fail-fast "${tests[@]}" -- --test-threads 1
    fi
fi
