#!/bin/sh
# Makes the files docker-compose.secure.yml mounts, to try TLS, mutual TLS and
# tokens on one machine: a private CA, the server's certificate (for localhost and
# the compose service name `attention`), client certificates for the container's
# health check and for you, and one `infer` token.
#
#   deploy/compose/make-secrets.sh [DIR]      # DIR defaults to deploy/compose/secrets
#
# For production use your own CA (or cert-manager); only the file names matter.
#
# Permissions: DIR is 0700, so other users of this machine cannot open anything in
# it. The files the container reads (server.key, healthcheck.key, tokens, the
# certificates) are 0644 because compose mounts file secrets with the host's owner
# and mode, and the server runs as uid 10001; the bind mount does not pass through
# DIR, so the container can read them and nobody else on the host can. Files only
# you need (ca.key, client.key, infer.token) are 0600. With rootful Docker on
# Linux you may instead `sudo chown 10001:10001` the mounted files and make them 0400.
set -eu

dir=${1:-"$(dirname "$0")/secrets"}
days=${DAYS:-90}
umask 077
mkdir -p "$dir"
chmod 0700 "$dir"
cd "$dir"
if [ -e ca.key ]; then
    echo "$dir already holds a CA (ca.key); remove the folder to start over" >&2
    exit 1
fi
printf '*\n' > .gitignore   # never committed

key() {  # an EC P-256 private key (fast, and accepted by gRPC and tritonclient)
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
}

issue() {  # issue NAME COMMON_NAME EXTENSIONS: NAME.key and NAME.crt signed by the CA
    key "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
        -days "$days" -sha256 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

key ca.key
openssl req -x509 -new -key ca.key -subj "/CN=attention service private CA" -days "$days" -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt

issue server "attention" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:attention,IP:127.0.0.1,IP:::1"
issue healthcheck "attention-healthcheck" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
issue client "attention-client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
cp ca.crt client-ca.crt   # one CA signs both sides here; they may differ

token=$(openssl rand -hex 32)
printf '%s' "$token" > infer.token
digest=$(printf '%s' "$token" | openssl dgst -sha256 -r | cut -d' ' -f1)
printf '# ROLE:SHA256HEX of a bearer token, one a line (roles: infer, admin)\ninfer:%s\n' "$digest" > tokens

chmod 0644 ca.crt client-ca.crt server.crt server.key healthcheck.crt healthcheck.key tokens
chmod 0600 ca.key client.key client.crt infer.token

cat <<DONE
Wrote $dir (valid $days days). Start the service with
  docker compose -f docker-compose.yml -f docker-compose.secure.yml up --build
and call it from this machine with
  attention-client --ca-file $dir/ca.crt --token-file $dir/infer.token \\
    --cert-file $dir/client.crt --key-file $dir/client.key models
DONE
