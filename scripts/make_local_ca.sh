#!/usr/bin/env bash
# A local certificate authority and a server certificate, to serve LesionNet over HTTPS on a local network (LAN)
# and open it on a phone: browsers refuse service workers (offline page, install) on certificate errors.
#
#   bash scripts/make_local_ca.sh [-o DIR] [-d DAYS] NAME_OR_IP...
#   bash scripts/make_local_ca.sh 192.168.1.20 lesionnet.local     # -> logs/serve/tls/{ca.crt,server.crt,server.key}
#   lesionnet serve ckpt=... host=0.0.0.0 ssl_certfile=logs/serve/tls/server.crt ssl_keyfile=logs/serve/tls/server.key
#
# The CA is made once per DIR and may only sign the names and IPs given when it was made (X.509 name
# constraints), so a phone that trusts it trusts it for this server only, not for the whole web: given only IPs it
# can sign no DNS name (only names under the reserved .invalid, which never resolve), given only names no IP. Later
# runs with the same DIR reuse it and renew the server certificate. ca.key never needs to leave this machine; keep it
# private and delete DIR (and remove the CA from the phone) when the tests are done.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

out="${LESIONNET_TLS_DIR:-logs/serve/tls}"
days=397  # the longest server-certificate life Apple and Chrome accept
while getopts "o:d:h" opt; do
  case "$opt" in
    o) out="$OPTARG" ;;
    d) days="$OPTARG" ;;
    h) usage 0 ;;
    *) usage 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ "$#" -eq 0 ]; then
  echo "error: give the host names and/or IP addresses the phone will use, e.g. 192.168.1.20 (see: ip -4 addr)" >&2
  usage 2
fi
command -v openssl > /dev/null || { echo "error: openssl is not installed (apt-get install -y openssl)" >&2; exit 1; }

# subjectAltName entries and the CA's name constraints for the given names (an IP gets a /32 or /128 constraint).
# A kind of name with no constraint is not constrained at all (RFC 5280), so a kind that was not given is closed:
# no IP given: every IPv4 and IPv6 address excluded; no DNS name given: only names under .invalid permitted (RFC 6761:
# they never resolve; OpenSSL's configuration cannot write the empty name that would exclude every DNS name).
san=() constraint=() ips=0 dns=0
for name in "$@"; do
  if [[ "$name" =~ ^[0-9]+(\.[0-9]+){3}$ ]]; then
    san+=("IP:$name") constraint+=("permitted;IP:$name/255.255.255.255") ips=1
  elif [[ "$name" == *:* ]]; then
    san+=("IP:$name") constraint+=("permitted;IP:$name/ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff") ips=1
  elif [[ "$name" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
    san+=("DNS:$name") constraint+=("permitted;DNS:$name") dns=1
  else
    echo "error: '$name' is neither a host name nor an IP address" >&2
    exit 2
  fi
done
[ "$dns" -eq 1 ] || constraint+=("permitted;DNS:invalid")
[ "$ips" -eq 1 ] || constraint+=("excluded;IP:0.0.0.0/0.0.0.0" "excluded;IP:::/::")
join() { local IFS=,; echo "$*"; }
quiet() {  # run openssl without its progress output; on failure show it and stop
  local log
  if ! log="$("$@" 2>&1)"; then echo "$log" >&2; exit 1; fi
}
names="$(join "$@")"
constraints="$(join "${constraint[@]}")"

mkdir -p "$out"
chmod 700 "$out"
umask 077
if [ -f "$out/ca.crt" ]; then
  if [ "$(cat "$out/ca.names" 2> /dev/null)" != "$names" ]; then
    echo "error: the CA in $out may only sign $(cat "$out/ca.names" 2> /dev/null || echo '(unknown names)'), not" \
      "$names. Use another -o DIR (or delete $out and remove its CA from the phone)." >&2
    exit 1
  fi
  if [ "$(cat "$out/ca.constraints" 2> /dev/null)" != "$constraints" ]; then
    echo "error: the CA in $out was made by an older version of this script, with weaker name constraints. Delete" \
      "$out (and remove its CA from the phone) and run this again." >&2
    exit 1
  fi
  echo "Reusing the CA in $out (for $names)."
else
  quiet openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 825 \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=LesionNet local CA ($(hostname))" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "nameConstraints=critical,$constraints"
  echo "$names" > "$out/ca.names"
  echo "$constraints" > "$out/ca.constraints"
  echo "Made a CA in $out for $names."
fi

quiet openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$out/server.key" \
  -out "$out/server.csr" -subj "/CN=LesionNet server"  # browsers match the subjectAltName, not the CN
cat > "$out/server.ext" << EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$(join "${san[@]}")
EOF
quiet openssl x509 -req -sha256 -days "$days" -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -extfile "$out/server.ext" -out "$out/server.crt"
rm -f "$out/server.csr" "$out/server.ext"
chmod 644 "$out/ca.crt" "$out/server.crt"
quiet openssl verify -CAfile "$out/ca.crt" "$out/server.crt"

cat << EOF

Server certificate for $names (valid $days days): $out/server.crt, key $out/server.key

Serve it:
  lesionnet serve ckpt=<run> host=0.0.0.0 ssl_certfile=$out/server.crt ssl_keyfile=$out/server.key
and open https://$1:8000 on the phone once it trusts the CA.

Install the CA (only $out/ca.crt; never ca.key) on the phone:
  Android: copy ca.crt to the phone, then Settings > Security > More security settings > Encryption & credentials >
           Install a certificate > CA certificate (Chrome trusts user CAs; the menu names vary by vendor).
  iPhone:  AirDrop or mail ca.crt, open it, Settings > General > VPN & Device Management > install the profile,
           then Settings > General > About > Certificate Trust Settings > turn on full trust for it.
Remove it again (same menus) when you are done testing.
EOF
