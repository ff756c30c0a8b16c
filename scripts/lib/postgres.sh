# Shared helpers: find or install PostgreSQL's server binaries, and run a throwaway
# cluster for tests and benchmarks. Source this file; it defines functions only.

pg_bin_dir() {
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return 0
  fi
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
    echo "$dir"
    return 0
  fi
  return 1
}

# Installs Debian's postgresql package when it is missing (as root), or says how.
ensure_postgres_binaries() {
  if pg_bin_dir >/dev/null; then return 0; fi
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing PostgreSQL (apt-get install -y postgresql)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    # Debian starts a system cluster; tests use their own, so leave it be.
    pg_bin_dir >/dev/null && return 0
  fi
  echo "PostgreSQL server binaries are missing. Install them with:" >&2
  echo "    sudo apt-get install -y postgresql" >&2
  return 1
}

# as_pg CMD...: runs a PostgreSQL binary, as the postgres user when we are root
# (PostgreSQL refuses to run as root).
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# start_throwaway_postgres: initdb + start on a free loopback port, tuned for tests
# (no fsync). Sets PG_DIR, PG_PORT and PG_URL (superuser, trust auth on loopback).
start_throwaway_postgres() {
  local bin
  bin=$(pg_bin_dir)
  PG_DIR=$(mktemp -d /var/tmp/kiln-pg.XXXXXX)
  chmod 755 "$PG_DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_DIR"; fi
  as_pg "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust --encoding=UTF8 --no-instructions >"$PG_DIR/initdb.log" 2>&1 \
    || { cat "$PG_DIR/initdb.log" >&2; return 1; }
  cat >>"$PG_DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 600
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
  local attempt
  for attempt in 1 2 3 4 5 6 7 8; do
    PG_PORT=$(( 20000 + (RANDOM % 20000) ))
    if as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -o "-p $PG_PORT" -w -t 60 start >/dev/null 2>&1; then
      PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
      export PG_DIR PG_PORT PG_URL
      return 0
    fi
  done
  echo "could not start PostgreSQL; its log:" >&2
  cat "$PG_DIR/postgres.log" >&2
  return 1
}

stop_throwaway_postgres() {
  [ -n "${PG_DIR:-}" ] || return 0
  as_pg "$(pg_bin_dir)/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
}
