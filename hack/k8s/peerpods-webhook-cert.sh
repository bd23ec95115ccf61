#!/usr/bin/env bash
# The peer pods webhook's serving certificate without cert-manager: makes a CA and a
# certificate for the webhook's Service with openssl, stores them as the Secret
# kata-peerpods-webhook-tls and puts the CA in the MutatingWebhookConfiguration's caBundle.
#
#   hack/k8s/peerpods-webhook-cert.sh [--namespace NS] [--service NAME] [--days N]
#                                     [--out DIR] [--no-apply]
#
# --namespace (default kata-peerpods-webhook) and --service (default
# kata-peerpods-webhook) name the certificate's DNS names, <service>.<namespace>.svc and
# <service>.<namespace>.svc.cluster.local. --days: validity (default 365). --out DIR
# keeps ca.crt, ca.key, tls.crt and tls.key in DIR (otherwise they live in a temporary
# directory removed at exit, so the CA key is not kept). --no-apply only makes the files
# (needs --out), without kubectl.
#
# Run it again to renew: a new CA and certificate, the Secret replaced, caBundle
# patched; the webhook re-reads the mounted files within a minute (kubelet's Secret
# update delay comes first). Needs openssl, and kubectl with rights on the Secret and the
# MutatingWebhookConfiguration.
set -euo pipefail

namespace=kata-peerpods-webhook
service=kata-peerpods-webhook
days=365
out=
apply=1
while [ $# -gt 0 ]; do
    case "$1" in
        --namespace) namespace=$2; shift 2 ;;
        --service) service=$2; shift 2 ;;
        --days) days=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --no-apply) apply=0; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "peerpods-webhook-cert.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$days" in
    ''|*[!0-9]*) echo "peerpods-webhook-cert.sh: --days $days is not a number of days" >&2; exit 2 ;;
esac
if [ "$apply" = 0 ] && [ -z "$out" ]; then
    echo "peerpods-webhook-cert.sh: --no-apply needs --out DIR (the files would be lost)" >&2
    exit 2
fi
for tool in openssl $([ "$apply" = 1 ] && echo kubectl); do
    command -v "$tool" >/dev/null || { echo "peerpods-webhook-cert.sh: $tool not found" >&2; exit 1; }
done

umask 077
if [ -n "$out" ]; then
    mkdir -p "$out"
    dir=$out
else
    dir=$(mktemp -d)
    trap 'rm -rf "$dir"' EXIT
fi
host="$service.$namespace.svc"

openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "$days" \
    -subj "/CN=$service CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/tls.key" -out "$dir/tls.csr" -subj "/CN=$host" 2>/dev/null
printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=DNS:$host,DNS:$host.cluster.local" >"$dir/tls.ext"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$dir/tls.ext" \
    -out "$dir/tls.crt" 2>/dev/null
rm -f "$dir/tls.csr" "$dir/tls.ext"
openssl verify -CAfile "$dir/ca.crt" "$dir/tls.crt" >/dev/null
echo "peerpods-webhook-cert.sh: certificate for $host (and $host.cluster.local), valid $days days"

if [ "$apply" = 0 ]; then
    echo "peerpods-webhook-cert.sh: files in $dir (ca.crt, ca.key, tls.crt, tls.key); nothing applied"
    exit 0
fi
kubectl -n "$namespace" create secret tls kata-peerpods-webhook-tls \
    --cert="$dir/tls.crt" --key="$dir/tls.key" --dry-run=client -o yaml | kubectl apply -f -
ca_bundle=$(base64 -w0 <"$dir/ca.crt")
kubectl patch mutatingwebhookconfiguration kata-peerpods-webhook --type=json \
    -p "[{\"op\": \"replace\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"$ca_bundle\"}]"
echo "peerpods-webhook-cert.sh: Secret $namespace/kata-peerpods-webhook-tls written, caBundle patched"
