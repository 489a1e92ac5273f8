#!/usr/bin/env bash
# Stops the SuperLink started by start-superlink.sh (and the ServerApps it started).
#
#   server/stop-superlink.sh HOME_DIR
set -euo pipefail
[[ $# -eq 1 ]] || { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
pidfile=$1/superlink.pid
[[ -f "$pidfile" ]] || { echo "stop-superlink: no $pidfile; nothing to stop" >&2; exit 0; }
pid=$(cat "$pidfile")
if ! kill -0 "$pid" 2>/dev/null; then rm -f "$pidfile"; echo "stop-superlink: pid $pid was not running"; exit 0; fi
kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
kill -KILL -- "-$pid" 2>/dev/null || true
rm -f "$pidfile"
echo "stop-superlink: stopped pid $pid"
