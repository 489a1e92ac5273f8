#!/usr/bin/env bash
# Starts this hospital's SuperNode against the coordinator's SuperLink, in the background.
#
#   clients/start-supernode.sh SITE_ENV
#
# SITE_ENV is a copy of clients/site.env.example. Writes supernode.pid and supernode.log in
# SITE_HOME. FOREGROUND=1 runs it in the foreground (for systemd); PYTHON_BIN names the folder
# of flower-supernode when it is not on PATH.
set -euo pipefail
[[ $# -eq 1 && "$1" != "-h" && "$1" != "--help" ]] || { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ -f "$1" ]] || { echo "start-supernode: site config $1 not found; copy clients/site.env.example" >&2; exit 2; }
env_file=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
# shellcheck disable=SC1090
source "$env_file"
home=${SITE_HOME:-$(dirname "$env_file")}
[[ -n "${PYTHON_BIN:-}" ]] && export PATH="$PYTHON_BIN:$PATH"  # Flower starts its helpers by name
fail() { echo "start-supernode: $*" >&2; exit 2; }

command -v "flower-supernode" >/dev/null || fail "flower-supernode not found; install fedgan (pip install -e .) or set PYTHON_BIN"
py=$(command -v python || command -v python3)
"$py" -c "import fedgan" 2>/dev/null \
    || fail "the fedgan package is not importable by $py; install it (pip install -e .) or set PYTHON_BIN"
[[ -n "${SUPERLINK:-}" ]] || fail "SUPERLINK is empty in $env_file"
[[ -n "${CA_CERT:-}" && -f "$CA_CERT" ]] || fail "CA_CERT '${CA_CERT:-}' not found: ask the coordinator for ca.crt"
[[ -n "${PRIVATE_KEY:-}" && -f "$PRIVATE_KEY" ]] || fail "PRIVATE_KEY '${PRIVATE_KEY:-}' not found: create it with clients/make-site-key.sh"
[[ -n "${DATA_PATH:-}" && -e "$DATA_PATH" ]] || fail "DATA_PATH '${DATA_PATH:-}' does not exist"
case "${DATA_FORMAT:-}" in ""|folder|dicom|nifti) ;; *) fail "DATA_FORMAT '$DATA_FORMAT' must be folder, dicom, nifti or empty";; esac
if [[ -f "$home/supernode.pid" ]] && kill -0 "$(cat "$home/supernode.pid")" 2>/dev/null; then
    echo "start-supernode: already running (pid $(cat "$home/supernode.pid"))" >&2; exit 2
fi

node="data-path='$DATA_PATH'"
[[ -n "${DATA_FORMAT:-}" ]] && node="$node data-format='$DATA_FORMAT'"
[[ -n "${DEVICE:-}" && "${DEVICE}" != auto ]] && node="$node device='$DEVICE'"
[[ -n "${MAX_EPSILON:-}" ]] && node="$node max-epsilon=$MAX_EPSILON"
[[ -n "${HOSPITAL_ID:-}" ]] && node="$node hospital-id=$HOSPITAL_ID"
node="$node state-dir='${STATE_DIR:-$home/state}' cache-dir='${CACHE_DIR:-$home/cache}'"

# WARM_CLIENTAPP=1 (the default): the SuperNode runs in process isolation and fedgan's launcher
# (fedgan.federated.site_exec) forks each round's ClientApp from a process that imported its
# libraries once; 0: Flower starts a fresh ClientApp process per round itself.
case "${WARM_CLIENTAPP:-1}" in 1) isolation=process ;; 0) isolation=subprocess ;;
    *) fail "WARM_CLIENTAPP '$WARM_CLIENTAPP' must be 1 or 0";; esac
port=${CLIENTAPP_PORT:-9094}
# SUPERNODE_POLL_S: the longest idle wait of the SuperNode's loop (fedgan.federated.site_node);
# Flower's own is a fixed 3 s, which every round waits after the site's reply. 3 keeps it.
poll=${SUPERNODE_POLL_S:-0.5}
awk -v p="$poll" 'BEGIN { exit !(p ~ /^[0-9]*\.?[0-9]+$/ && p > 0 && p <= 3) }' \
    || fail "SUPERNODE_POLL_S '$poll' must be a number of seconds in (0, 3]"
cmd=("$py" -m fedgan.federated.site_node --poll "$poll"
    --superlink "$SUPERLINK"
    --root-certificates "$CA_CERT"
    --auth-supernode-private-key "$PRIVATE_KEY"
    --node-config "$node"
    --isolation "$isolation"
    --host 127.0.0.1 --port "$port"
    --max-retries "${MAX_RETRIES:-10}")
if [[ "$isolation" == process ]]; then
    # The SuperNode and the launcher in one process group (stop-supernode.sh stops the group);
    # the launcher exits with the SuperNode, and the group with either.
    cmd=(bash -c '"$@" & node=$!
        "$PY" -m fedgan.federated.site_exec --runtime-api-address "127.0.0.1:$PORT" --insecure \
            --parent-pid "$node" & exe=$!
        wait -n "$node" "$exe"; kill "$node" "$exe" 2>/dev/null; wait' site "${cmd[@]}")
    export PY="$py" PORT="$port"
fi
# Flower's usage telemetry posts to flower.ai from every process, and each round's ClientApp
# waits up to 4 s for it at exit where the site has no Internet: off unless the site sets it.
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
if [[ -n "${CPU_THREADS:-}" ]]; then export OMP_NUM_THREADS=$CPU_THREADS MKL_NUM_THREADS=$CPU_THREADS; fi
# The site's data, read as the SuperNode's rounds will read it (the files listed, one read):
# a folder without images or of another format is said here, not in the first round's log.
data_ok=$("$py" -m fedgan.cli data check --path "$DATA_PATH" ${DATA_FORMAT:+--format "$DATA_FORMAT"} 2>&1) \
    || fail "${data_ok##*fedgan: error: }"
# A DEVICE this machine lacks (cuda without a GPU, cuda:1 on one GPU) would fail every round.
if [[ -n "${DEVICE:-}" && "$DEVICE" != auto ]]; then
    device_ok=$("$py" -c 'import sys
from fedgan.device import resolve_device
try:
    resolve_device(sys.argv[1], "DEVICE")
except ValueError as err:
    sys.exit(str(err))' "$DEVICE" 2>&1) || fail "${device_ok##*$'\n'}"
fi
mkdir -p "$home"
if [[ "${FOREGROUND:-0}" == 1 ]]; then
    exec "${cmd[@]}"
fi
setsid "${cmd[@]}" >>"$home/supernode.log" 2>&1 < /dev/null &
echo $! > "$home/supernode.pid"
echo "start-supernode: pid $! -> $SUPERLINK; ${data_ok#fedgan: }; log $home/supernode.log"
