#!/usr/bin/env bash
# Creates the consortium's certificate authority and the SuperLink's TLS certificate.
#
#   server/make-certs.sh CERTS_DIR [SAN ...]
#
# SANs name how hospitals reach the SuperLink, e.g. DNS:fl.consortium.org IP:10.0.0.5
# (localhost and 127.0.0.1 are always included). Writes CERTS_DIR/ca.crt (give this to every
# hospital), ca.key (keep offline), server.pem and server.key (the SuperLink's).
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 && "$1" != "-h" && "$1" != "--help" ]] || usage
command -v openssl >/dev/null || { echo "make-certs: openssl is missing; install it (e.g. apt install openssl)" >&2; exit 2; }

dir=$1; shift
if [[ -e "$dir/ca.key" ]]; then
    echo "make-certs: $dir/ca.key exists; refusing to replace the CA (delete $dir to start over)" >&2
    exit 2
fi
mkdir -p "$dir"
chmod 700 "$dir"
san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    case "$name" in
        DNS:*|IP:*) san="$san,$name" ;;
        *) echo "make-certs: SAN '$name' must start with DNS: or IP:" >&2; exit 2 ;;
    esac
done
days=${CERT_DAYS:-825}

openssl ecparam -name secp384r1 -genkey -noout -out "$dir/ca.key" 2>/dev/null
openssl req -x509 -new -key "$dir/ca.key" -sha384 -days "$days" \
    -subj "/CN=fedgan consortium CA" -out "$dir/ca.crt"
openssl ecparam -name secp384r1 -genkey -noout -out "$dir/server.key" 2>/dev/null
openssl req -new -key "$dir/server.key" -subj "/CN=fedgan SuperLink" -out "$dir/server.csr"
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" \
    "$san" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days "$days" -sha384 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext"
chmod 600 "$dir/ca.key" "$dir/server.key"
echo "make-certs: wrote $dir/ca.crt (send to hospitals), $dir/server.pem, $dir/server.key; SANs: $san"
