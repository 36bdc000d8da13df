#!/usr/bin/env bash
# A throwaway local PostgreSQL server for trying the team instance (dagster.team.example.yaml)
# on one machine; a team uses a managed one (Cloud SQL) instead. The tests start theirs
# with this script too.
#
#   bash scripts/local_postgres.sh start DIR [PORT]   create (first time) and start a server
#                                                     on 127.0.0.1:PORT (default 5433), data
#                                                     in DIR; prints the variables to export
#   bash scripts/local_postgres.sh stop DIR           stop it (DIR can then be deleted)
#
# The server only listens on 127.0.0.1 and needs a password (scram-sha-256). The password
# is $DAGSTER_PG_PASSWORD if set, else a random one kept in DIR/password (mode 600); it is
# never written anywhere else. Needs Debian's `postgresql` (setup.sh --test installs it).
# As root the server runs as the `postgres` user (PostgreSQL refuses to run as root).
set -euo pipefail
cmd="${1:-}"
dir="${2:-}"
port="${3:-5433}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|stop DIR [PORT]" >&2
  exit 2
fi
bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "local_postgres: no PostgreSQL server found; install Debian's postgresql" \
    "(apt-get install postgresql)" >&2
  exit 1
fi
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
dir="$(realpath -m "$dir")"
case "$cmd" in
  start)
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      mkdir -p "$dir"
      chmod 700 "$dir"
      if [ "$(id -u)" -eq 0 ]; then chown postgres: "$dir"; fi
      ( umask 077; printf '%s\n' "${DAGSTER_PG_PASSWORD:-$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')}" > "$dir/password" )
      if [ "$(id -u)" -eq 0 ]; then chown postgres: "$dir/password"; fi
      as_owner "$bindir/initdb" -D "$dir/data" -U lab --auth=scram-sha-256 \
        --pwfile="$dir/password" >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    if ! as_owner "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
      as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null \
        || { tail -20 "$dir/server.log" >&2; exit 1; }
    fi
    password="$(cat "$dir/password")"
    PGPASSWORD="$password" psql -h 127.0.0.1 -p "$port" -U lab -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'dagster'" | grep -q 1 \
      || PGPASSWORD="$password" psql -h 127.0.0.1 -p "$port" -U lab -d postgres -qc \
        "CREATE DATABASE dagster"
    echo "export DAGSTER_PG_HOST=127.0.0.1 DAGSTER_PG_PORT=$port DAGSTER_PG_USER=lab" \
      "DAGSTER_PG_DB=dagster DAGSTER_PG_PASSWORD=\$(cat '$dir/password')"
    ;;
  stop)
    as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
  *)
    echo "usage: $0 start|stop DIR [PORT]" >&2
    exit 2
    ;;
esac
