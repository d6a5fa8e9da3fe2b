# Services the tests use, sourced by .ci/run (which runs with `set -euo pipefail`).
#
# PostgreSQL for tests/test_tune_postgres.py (two tuning workers sharing one Optuna study):
# installs the Debian package if no server binaries exist (root only; `apt-get update` once),
# starts a private server on 127.0.0.1 with its own data directory (as the postgres user when
# run as root), creates a database and exports
#   ATTNCC_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:PORT/attncc_test
# Idempotent: a server already running on that data directory is reused. It never fails the
# CI: if anything goes wrong it exports ATTNCC_TEST_POSTGRES_SKIP_REASON instead, and the
# test skips with that reason.
#
# Knobs: ATTNCC_PG_DIR (default /tmp/attncc-pg-$UID), ATTNCC_PG_PORT (default 55432).

_attncc_pg_bindir() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/pg_ctl" ] && { echo "$dir"; return 0; }
    done
    command -v pg_ctl >/dev/null 2>&1 && { dirname "$(command -v pg_ctl)"; return 0; }
    return 1
}

_attncc_pg_install() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "no PostgreSQL server binaries and cannot install them (needs root and apt-get)"
        return 1
    fi
    echo "[services] installing postgresql (apt-get)" >&2
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 \
        || { echo "apt-get install postgresql failed"; return 1; }
}

_attncc_pg_start() {
    local bindir data port as_pg log
    bindir=$(_attncc_pg_bindir) || { _attncc_pg_install || return 1; bindir=$(_attncc_pg_bindir) \
        || { echo "postgresql installed but pg_ctl not found"; return 1; }; }
    data=${ATTNCC_PG_DIR:-/tmp/attncc-pg-$(id -u)}
    port=${ATTNCC_PG_PORT:-55432}
    log="$data.log"
    as_pg=()
    if [ "$(id -u)" = 0 ]; then
        # NOTE: the server refuses to run as root; the Debian package creates the postgres user.
        id postgres >/dev/null 2>&1 || { echo "running as root but there is no postgres user"; return 1; }
        as_pg=(runuser -u postgres --)
    fi
    if ! "${as_pg[@]}" "$bindir/pg_ctl" status -D "$data" >/dev/null 2>&1; then
        if [ ! -f "$data/PG_VERSION" ]; then
            rm -rf "$data" && mkdir -p "$data" && chmod 700 "$data" || { echo "cannot create $data"; return 1; }
            [ "$(id -u)" = 0 ] && chown postgres "$data"
            "${as_pg[@]}" "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >/dev/null 2>&1 \
                || { echo "initdb failed in $data"; return 1; }
        fi
        touch "$log" && { [ "$(id -u)" != 0 ] || chown postgres "$log"; }
        "${as_pg[@]}" "$bindir/pg_ctl" -D "$data" -l "$log" -w -t 30 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $data" start >/dev/null 2>&1 \
            || { echo "pg_ctl start failed (see $log)"; return 1; }
    fi
    local psql=("$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAq)
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'attncc_test'" 2>/dev/null)" != 1 ]; then
        "${psql[@]}" -c "CREATE DATABASE attncc_test" >/dev/null 2>&1 \
            || { echo "cannot create database attncc_test on port $port"; return 1; }
    fi
    echo "postgresql://postgres@127.0.0.1:$port/attncc_test"
}

_attncc_pg_result=$(_attncc_pg_start 2>&1 | tail -n 1) || true
case "$_attncc_pg_result" in
    postgresql://*)
        export ATTNCC_TEST_POSTGRES_URL="$_attncc_pg_result"
        unset ATTNCC_TEST_POSTGRES_SKIP_REASON
        echo "[services] PostgreSQL ready: $ATTNCC_TEST_POSTGRES_URL"
        ;;
    *)
        unset ATTNCC_TEST_POSTGRES_URL
        export ATTNCC_TEST_POSTGRES_SKIP_REASON=".ci/services.sh could not start PostgreSQL: $_attncc_pg_result"
        echo "[services] $ATTNCC_TEST_POSTGRES_SKIP_REASON"
        ;;
esac
unset _attncc_pg_result
