# A real Kubernetes control plane on loopback for the e2e suites: etcd, kube-apiserver and
# kube-controller-manager, the pinned builds from e2e/tools (e2e/install-deps makes them, once
# per version; e2e/k8s-tools.sh names them). No kubelet, no scheduler, no container runtime: the
# API with its validation, admission, RBAC and dry-run, CRDs, and the controllers that act on
# API objects alone (PVC <-> PV binding and the protection finalizers, service accounts and the
# kube-root-ca.crt config map, namespace deletion, garbage collection).
#
# Usage, from a script that sourced lib.sh:
#
#   source "$E2E_DIR/k8s-lib.sh"
#   trap 'k8s_down $?' EXIT      # stops everything, also when a step fails
#   k8s_up "$(mktemp -d)"        # a new or empty directory; removed by k8s_down
#   kubectl create namespace demo
#   kubectl apply --dry-run=server -f deploy/csi-interposer.yaml
#
# k8s_up generates a CA and certificates with openssl, starts each component on 127.0.0.1 ports
# chosen at run time, waits until the API is ready and the controllers have made the `default`
# service account, and then exports KUBECONFIG (DIR/kubeconfig, a system:masters client
# certificate) and puts kubectl first on PATH. It takes a few seconds. k8s_down [STATUS] stops
# every process k8s_up started, removes DIR and is idempotent, so an EXIT trap may call it;
# with a non-zero STATUS (the trap's $?) it prints the tail of each component's log first.
# K8S_KEEP=1 keeps DIR for a look afterwards.
#
# In DIR: pki/ (certificates and keys), etcd/ (data), logs/{etcd,kube-apiserver,
# kube-controller-manager}.log, kubeconfig (admin), kube-controller-manager.kubeconfig, bin/kubectl.
# K8S_API_URL is the API's address; the service cluster IP range is 10.0.0.0/24.

source "$E2E_DIR/k8s-tools.sh"

K8S_DIR=""
K8S_API_URL=""
_K8S_PIDS=()
_K8S_NAMES=()
_K8S_PATH_BEFORE=""

# _k8s_free_ports N: N distinct free TCP ports on 127.0.0.1 (held together while chosen).
_k8s_free_ports() {
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$1"
}

# _k8s_cert NAME SUBJECT EXTENSIONS: an EC P-256 key and a certificate signed by the harness CA.
_k8s_cert() {
  local pki=$K8S_DIR/pki name=$1
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/$name.key" -subj "$2" -out "$pki/$name.csr" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n%s\n' "$3" >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 7 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}

_k8s_pki() {
  local pki=$K8S_DIR/pki
  mkdir -p "$pki"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 7 -subj "/CN=csi-interposer-e2e-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  _k8s_cert kube-apiserver "/CN=kube-apiserver" "extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  _k8s_cert admin "/O=system:masters/CN=e2e-admin" "extendedKeyUsage=clientAuth"
  _k8s_cert kube-controller-manager "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
  # The service-account token signing key pair (kube-apiserver signs, verifies with the public key).
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/sa.key" 2>/dev/null
  openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

# _k8s_kubeconfig FILE USER: a kubeconfig for the API with USER's client certificate.
_k8s_kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: $K8S_API_URL
    certificate-authority: $K8S_DIR/pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $K8S_DIR/pki/$2.crt
    client-key: $K8S_DIR/pki/$2.key
contexts:
- name: e2e
  context: {cluster: e2e, user: $2, namespace: default}
current-context: e2e
EOF
}

# _k8s_start NAME COMMAND...: run COMMAND in the background, output to DIR/logs/NAME.log.
_k8s_start() {
  local name=$1
  shift
  "$@" >"$K8S_DIR/logs/$name.log" 2>&1 &
  _K8S_PIDS+=("$!")
  _K8S_NAMES+=("$name")
}

_k8s_tails() {
  local name
  for name in "${_K8S_NAMES[@]:-}"; do
    [ -n "$name" ] && [ -f "$K8S_DIR/logs/$name.log" ] || continue
    printf '\n--- tail of %s ---\n' "$K8S_DIR/logs/$name.log" >&2
    tail -n 25 "$K8S_DIR/logs/$name.log" >&2
  done
}

# _k8s_fail MESSAGE: print the logs' tails, stop everything, fail.
_k8s_fail() {
  k8s_down 1
  die "k8s: $1"
}

# _k8s_wait WHAT SECONDS COMMAND...: until COMMAND succeeds; fails early when a component exits.
_k8s_wait() {
  local what=$1 deadline=$((SECONDS + $2)) i
  shift 2
  until "$@" >/dev/null 2>&1; do
    for i in "${!_K8S_PIDS[@]}"; do
      kill -0 "${_K8S_PIDS[i]}" 2>/dev/null || _k8s_fail "${_K8S_NAMES[i]} exited while waiting for $what"
    done
    [ "$SECONDS" -lt "$deadline" ] || _k8s_fail "timed out waiting for $what"
    sleep 0.1
  done
}

# _k8s_get PATH: GET an API path as the admin.
_k8s_get() {
  curl -sf --max-time 2 --cacert "$K8S_DIR/pki/ca.crt" --cert "$K8S_DIR/pki/admin.crt" \
    --key "$K8S_DIR/pki/admin.key" "$K8S_API_URL$1"
}

# k8s_up DIR: start the control plane with its state in DIR (new or empty); see the top.
k8s_up() {
  [ -z "$K8S_DIR" ] || die "k8s_up: already running in $K8S_DIR"
  [ -n "${1:-}" ] || die "k8s_up: give a directory"
  if [ -e "$1" ] && [ -n "$(ls -A "$1")" ]; then die "k8s_up: $1 is not empty (k8s_down removes it)"; fi
  local bin
  for bin in "$ETCD_BIN" "$KUBE_APISERVER_BIN" "$KUBE_CONTROLLER_MANAGER_BIN" "$KUBECTL_BIN"; do
    [ -x "$bin" ] || die "$bin is missing: run e2e/install-deps"
  done
  command -v openssl >/dev/null || die "openssl is missing: run e2e/install-deps"
  local t0=$SECONDS
  mkdir -p "$1"
  K8S_DIR=$(cd "$1" && pwd)
  mkdir -p "$K8S_DIR/logs" "$K8S_DIR/bin" "$K8S_DIR/cache"
  _k8s_pki

  local etcd_port etcd_peer_port api_port kcm_port
  read -r etcd_port etcd_peer_port api_port kcm_port <<<"$(_k8s_free_ports 4)"
  K8S_API_URL="https://127.0.0.1:$api_port"

  # etcd: one member, plain HTTP on loopback, no fsync (the data is thrown away).
  _k8s_start etcd "$ETCD_BIN" --name e2e --data-dir "$K8S_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "e2e=http://127.0.0.1:$etcd_peer_port" --unsafe-no-fsync --log-level warn
  _k8s_wait "etcd" 30 curl -sf --max-time 1 "http://127.0.0.1:$etcd_port/health"

  # kube-apiserver: TLS on loopback only (no insecure port exists any more), client certificates
  # and service-account tokens, Node + RBAC authorization, the default admission plugins.
  # --allow-privileged: the node plugin's DaemonSet runs privileged containers. No endpoints for
  # the `kubernetes` service: a loopback address is not a valid endpoint, and no pod runs here.
  local pki=$K8S_DIR/pki
  _k8s_start kube-apiserver "$KUBE_APISERVER_BIN" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$pki/kube-apiserver.crt" --tls-private-key-file "$pki/kube-apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode Node,RBAC --anonymous-auth=false \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged=true \
    --endpoint-reconciler-type none \
    --cert-dir "$K8S_DIR/kube-apiserver" --profiling=false
  _k8s_kubeconfig "$K8S_DIR/kubeconfig" admin
  _k8s_kubeconfig "$K8S_DIR/kube-controller-manager.kubeconfig" kube-controller-manager
  _k8s_wait "kube-apiserver /readyz" 90 _k8s_get /readyz

  # kube-controller-manager: the controllers that need no nodes, each with its own service
  # account (and so its bootstrap RBAC role), no leader election. Serving on loopback for /healthz.
  # The PV binder retries a claim whose volume its cache has not seen yet at every sync period:
  # 1 s instead of 15 s, so a claim made together with its PV binds within a second or two.
  local kcm_kubeconfig=$K8S_DIR/kube-controller-manager.kubeconfig
  _k8s_start kube-controller-manager "$KUBE_CONTROLLER_MANAGER_BIN" \
    --kubeconfig "$kcm_kubeconfig" \
    --authentication-kubeconfig "$kcm_kubeconfig" --authorization-kubeconfig "$kcm_kubeconfig" \
    --authentication-skip-lookup \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --cert-dir "$K8S_DIR/kube-controller-manager" \
    --leader-elect=false --use-service-account-credentials=true --pvclaimbinder-sync-period 1s \
    --root-ca-file "$pki/ca.crt" --service-cluster-ip-range 10.0.0.0/24 \
    --controllers persistentvolume-binder-controller,persistentvolume-protection-controller,persistentvolumeclaim-protection-controller,serviceaccount-controller,root-ca-certificate-publisher-controller,namespace-controller,garbage-collector-controller \
    --profiling=false
  _k8s_wait "kube-controller-manager /healthz" 60 curl -skf --max-time 1 "https://127.0.0.1:$kcm_port/healthz"
  # Pods can be admitted once a namespace has its `default` service account.
  _k8s_wait "the default service account" 60 _k8s_get /api/v1/namespaces/default/serviceaccounts/default

  export KUBECONFIG=$K8S_DIR/kubeconfig
  export KUBECACHEDIR=$K8S_DIR/cache
  ln -s "$KUBECTL_BIN" "$K8S_DIR/bin/kubectl"
  _K8S_PATH_BEFORE=$PATH
  export PATH="$K8S_DIR/bin:$PATH"
  log "k8s: kube-apiserver $KUBERNETES_VERSION and etcd $ETCD_VERSION up at $K8S_API_URL in $((SECONDS - t0)) s"
}

# k8s_down [STATUS]: stop what k8s_up started and remove its directory; see the top.
k8s_down() {
  local status=${1:-0} i pid
  # One at a time in reverse order, etcd last: etcd stops gracefully only once the API server's
  # watches are gone (stopped together, both wait out the grace period).
  for ((i = ${#_K8S_PIDS[@]} - 1; i >= 0; i--)); do
    pid=${_K8S_PIDS[i]}
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  # The logs' tails only now: printing can fail (a closed pipe), stopping must not.
  [ "$status" = 0 ] || _k8s_tails
  _K8S_PIDS=()
  _K8S_NAMES=()
  if [ -n "$K8S_DIR" ]; then
    if [ -n "${K8S_KEEP:-}" ]; then log "k8s: kept $K8S_DIR"; else rm -rf "$K8S_DIR"; fi
  fi
  if [ -n "$_K8S_PATH_BEFORE" ]; then
    PATH=$_K8S_PATH_BEFORE
    unset KUBECONFIG KUBECACHEDIR
  fi
  _K8S_PATH_BEFORE=""
  K8S_DIR=""
  K8S_API_URL=""
  return 0
}
