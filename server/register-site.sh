#!/usr/bin/env bash
# Registers a hospital's public key with the running SuperLink; only registered SuperNodes
# may connect.
#
#   server/register-site.sh HOME_DIR SITE_PUBLIC_KEY [NAME]
set -euo pipefail

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 2 && $# -le 3 ]] || usage
home=$1 key=$2
[[ -n "${PYTHON_BIN:-}" ]] && export PATH="$PYTHON_BIN:$PATH"  # Flower starts its helpers by name
[[ -f "$home/flwr/config.toml" ]] || { echo "register-site: $home has no SuperLink connection; run server/start-superlink.sh $home first" >&2; exit 2; }
[[ -f "$key" ]] || { echo "register-site: public key $key not found; the site creates it with clients/make-site-key.sh" >&2; exit 2; }
grep -q "^ecdsa-sha2-" "$key" || { echo "register-site: $key is not an EC public key in OpenSSH format (ecdsa-sha2-nistp384 ...)" >&2; exit 2; }
args=()
[[ $# -eq 3 ]] && args+=(--name "$3")
FLWR_HOME=$home/flwr "flwr" supernode register "$key" fedgan "${args[@]}"
