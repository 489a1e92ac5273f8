#!/usr/bin/env bash
# Stops the SuperNode started by start-supernode.sh (and its ClientApp processes).
#
#   clients/stop-supernode.sh SITE_ENV
set -euo pipefail
[[ $# -eq 1 && -f "$1" ]] || { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
env_file=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
# shellcheck disable=SC1090
source "$env_file"
pidfile=${SITE_HOME:-$(dirname "$env_file")}/supernode.pid
[[ -f "$pidfile" ]] || { echo "stop-supernode: no $pidfile; nothing to stop"; exit 0; }
pid=$(cat "$pidfile")
if ! kill -0 "$pid" 2>/dev/null; then rm -f "$pidfile"; echo "stop-supernode: pid $pid was not running"; exit 0; fi
kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
kill -KILL -- "-$pid" 2>/dev/null || true
rm -f "$pidfile"
echo "stop-supernode: stopped pid $pid"
