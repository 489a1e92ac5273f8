#!/usr/bin/env bash
# Creates this hospital's EC key pair (NIST P-384, OpenSSH format, as Flower requires).
#
#   clients/make-site-key.sh KEYS_DIR
#
# Writes KEYS_DIR/site (private: never leaves this machine) and KEYS_DIR/site.pub (send it to
# the coordinator, who registers it with server/register-site.sh).
set -euo pipefail
[[ $# -eq 1 && "$1" != "-h" && "$1" != "--help" ]] || { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
dir=$1
if [[ -e "$dir/site" ]]; then
    echo "make-site-key: $dir/site exists; refusing to replace this site's identity" >&2
    exit 2
fi
mkdir -p "$dir"
chmod 700 "$dir"
if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedgan-site" -f "$dir/site"
else  # the cryptography package comes with Flower
    python3 - "$dir/site" <<'PY' || { echo "make-site-key: need ssh-keygen or Python with 'cryptography' (pip install fedgan)" >&2; exit 2; }
import sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
path = Path(sys.argv[1])
path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
path.chmod(0o600)
pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
Path(str(path) + ".pub").write_bytes(pub + b" fedgan-site\n")
PY
fi
echo "make-site-key: wrote $dir/site (keep private) and $dir/site.pub (send to the coordinator)"
