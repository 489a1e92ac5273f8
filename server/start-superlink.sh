#!/usr/bin/env bash
# Starts the coordinator's SuperLink with TLS and SuperNode authentication, in the background.
#
#   server/start-superlink.sh HOME_DIR
#
# HOME_DIR keeps the SuperLink's state: certs/ (from make-certs.sh, or CERTS=DIR), state.db,
# superlink.log, superlink.pid and flwr/config.toml (a `flwr` connection named "fedgan").
# Environment: HOST (listen address, default 0.0.0.0), PORT (default 9093), ADDRESS (how
# `flwr` on this machine reaches it, default 127.0.0.1:$PORT), FOREGROUND=1 to run in the
# foreground (for systemd), PYTHON_BIN (folder of flower-superlink, default: from PATH).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -eq 1 && "$1" != "-h" && "$1" != "--help" ]] || usage
home=$(mkdir -p "$1" && cd "$1" && pwd)
certs=${CERTS:-$home/certs}
host=${HOST:-0.0.0.0}
port=${PORT:-9093}
address=${ADDRESS:-127.0.0.1:$port}
[[ -n "${PYTHON_BIN:-}" ]] && export PATH="$PYTHON_BIN:$PATH"  # Flower starts its helpers by name

command -v "flower-superlink" >/dev/null || {
    echo "start-superlink: flower-superlink not found; install fedgan (pip install -e .) or set PYTHON_BIN" >&2; exit 2; }
for f in ca.crt server.pem server.key; do
    [[ -f "$certs/$f" ]] || { echo "start-superlink: $certs/$f missing; run server/make-certs.sh $certs first" >&2; exit 2; }
done
if [[ -f "$home/superlink.pid" ]] && kill -0 "$(cat "$home/superlink.pid")" 2>/dev/null; then
    echo "start-superlink: already running (pid $(cat "$home/superlink.pid")); stop it with server/stop-superlink.sh $home" >&2
    exit 2
fi

mkdir -p "$home/flwr"
cat > "$home/flwr/config.toml" <<TOML
[superlink]
default = "fedgan"

[superlink.fedgan]
address = "$address"
root-certificates = "$certs/ca.crt"
TOML

cmd=("flower-superlink"
    --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key"
    --enable-supernode-auth
    --host "$host" --port "$port"
    --isolation subprocess
    --database "$home/state.db"
    --disable-runtime-dependency-installation
    --log-file "$home/superlink.log")
export FLWR_HOME=$home/flwr FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1
# Flower's usage telemetry (posts to flower.ai) is off unless the coordinator sets it.
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
if [[ "${FOREGROUND:-0}" == 1 ]]; then
    exec "${cmd[@]}"
fi
setsid "${cmd[@]}" >>"$home/superlink.out" 2>&1 < /dev/null &
pid=$!
echo $pid > "$home/superlink.pid"
for _ in $(seq 120); do  # up when its port answers; say why when it died instead
    if ! kill -0 "$pid" 2>/dev/null; then
        rm -f "$home/superlink.pid"
        echo "start-superlink: the SuperLink exited; last lines of $home/superlink.out:" >&2
        tail -5 "$home/superlink.out" >&2
        exit 1
    fi
    (exec 3<>"/dev/tcp/${address%:*}/${address##*:}") 2>/dev/null && break
    sleep 0.5
done
echo "start-superlink: pid $pid on $host:$port; log $home/superlink.log"
echo "  register a site:  server/register-site.sh $home SITE.pub"
echo "  run the study:    FLWR_HOME=$home/flwr flwr run . fedgan --run-config RUN.toml --stream"
