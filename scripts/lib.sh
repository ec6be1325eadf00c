# Shared by scripts/setup, scripts/test, scripts/demo and bench/run.
# shellcheck shell=bash

PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$PG_BIN/pg_config

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Installs what building and testing need, skipping what is already there.
ensure_dependencies() {
    local packages=(postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev sudo "$@")
    local missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.1'; then
        log "installing cargo-pgrx 0.18.1 (takes a few minutes)"
        cargo install cargo-pgrx --version 0.18.1 --locked
    fi
    if ! grep -qs "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        log "cargo pgrx init --pg15 $PG_CONFIG"
        cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
    fi
}

# start_cluster DIR PORT [postgresql.conf lines...]: a throwaway cluster run by
# the postgres user, reachable only through a socket in DIR.
start_cluster() {
    local dir=$1 port=$2
    shift 2
    rm -rf "$dir"
    mkdir -p "$dir"
    chown postgres: "$dir"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
    {
        echo "port = $port"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$dir'"
        printf '%s\n' "$@"
    } >>"$dir/data/postgresql.conf"
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
}

# restart_cluster DIR [SERVER_OPTIONS]: the options last until the next restart.
restart_cluster() {
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$1/data" -l "$1/server.log" -w restart -o "${2:-}" >/dev/null
}

# Immediate shutdown (as after a crash: no checkpoint), then start with recovery.
crash_cluster() {
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$1/data" -m immediate -w stop >/dev/null
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$1/data" -l "$1/server.log" -w start >/dev/null
}

# start_standby DIR PRIMARY_PORT PORT: a streaming hot standby of the cluster
# in DIR, in DIR/standby, reachable through the same socket directory.
start_standby() {
    local dir=$1 primary_port=$2 port=$3
    rm -rf "$dir/standby"
    mkdir -p "$dir/standby"
    chown postgres: "$dir/standby"
    runuser -u postgres -- "$PG_BIN/pg_basebackup" -h "$dir" -p "$primary_port" -U postgres \
        -D "$dir/standby/data" -R -X stream -c fast >/dev/null
    echo "port = $port" >>"$dir/standby/data/postgresql.conf"
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/standby/data" -l "$dir/standby/server.log" -w start >/dev/null
}

stop_cluster() {
    [ -d "$1/data" ] && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$1/data" -m fast -w stop >/dev/null 2>&1 || true
}
