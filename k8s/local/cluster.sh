#!/usr/bin/env bash
# A real one-node Kubernetes cluster on this machine, built from source (docs/kubernetes.md):
#
#   k8s/local/cluster.sh up        build what is missing (cached), start every server, wait until the
#                                  node is Ready and CoreDNS answers; a second `up` reuses what runs
#   k8s/local/cluster.sh down      stop every process it started (by PID), remove pods, mounts, the
#                                  network and the cluster's state; built binaries and the images
#                                  imported into containerd stay for the next `up`
#   k8s/local/cluster.sh purge     down, and forget the imported images and certificates too
#   k8s/local/cluster.sh trainer   install Kubeflow Trainer and JobSet (built here) into the running cluster
#   k8s/local/cluster.sh status    which servers run, and the node
#   k8s/local/cluster.sh env       `export KUBECONFIG=...; export PATH=...` for this shell
#   k8s/local/cluster.sh load IMAGE...   docker image -> the node's containerd (skipped when current)
#
# What runs (each a host process, stopped by its PID file): containerd (Debian's, own socket and
# state, beside any Docker), etcd (Debian's), kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy (iptables mode); CoreDNS as a Deployment. Pods get a CNI
# bridge (Debian's containernetworking-plugins). The node's address is 10.250.0.1 on a portless
# bridge of this machine: servers listen there or on 127.0.0.1, never on the machine's own
# network, and a FORWARD rule drops pod traffic to anything outside the cluster.
# Needs root, Debian 12 (apt installs what is missing), Go (for the first build) and Docker
# (images/local/docker-engine.sh) to build the small images the cluster runs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"

STATE=${MEDCRITICAL_CLUSTER_STATE:-/var/lib/medcritical-cluster}
RUN=${MEDCRITICAL_CLUSTER_RUN:-/run/medcritical-cluster}
BIN=$CLUSTER_CACHE/kubernetes-$K8S_VERSION/bin
KUBECONFIG_OUT=${MEDCRITICAL_KUBECONFIG:-$HOME/.kube/medcritical-local.config}
NODE=medcritical-node
NODE_IP=10.250.0.1
NODE_IF=mc-node0
BRIDGE=mc-cni0
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
DNS_IP=10.96.0.10
ETCD_CLIENT=127.0.0.1:23790
ETCD_PEER=127.0.0.1:23800
PAUSE_IMAGE=localhost/medcritical-pause:3.10
CONTAINERD_SOCK=$RUN/containerd/containerd.sock
PKI=$STATE/pki
LOGS=$STATE/logs

log() { echo "[cluster $(date +%H:%M:%S)] $*" >&2; }
die() {
  echo "cluster: $*" >&2
  exit 1
}

kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_OUT" "$@"; }
ctr_() { ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }

# ---------------------------------------------------------------- processes, by PID file
running() { # NAME: true when its PID file names a live process
  local f=$RUN/$1.pid
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

start() { # NAME COMMAND...: start it in its own session unless it runs; log to $LOGS/NAME.log
  local name=$1
  shift
  if running "$name"; then
    log "$name runs (pid $(cat "$RUN/$name.pid"))"
    return
  fi
  mkdir -p "$RUN" "$LOGS"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  log "$name started (pid $!, log $LOGS/$name.log)"
}

stop() { # NAME: SIGTERM, then SIGKILL after 20 s
  local f=$RUN/$1.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    log "$1 stopped (pid $pid)"
  fi
  rm -f "$f"
}

write() { # FILE: stdin into FILE, only when it differs (kube-proxy exits when its config file changes)
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  cat >"$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

wait_for() { # SECONDS WHAT COMMAND...: retry until COMMAND succeeds
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq "$seconds"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  die "$what did not come up in ${seconds}s; logs in $LOGS"
}

# ---------------------------------------------------------------- host prerequisites
packages() {
  local need=()
  command -v containerd >/dev/null || need+=(containerd)
  command -v runc >/dev/null || need+=(runc)
  command -v etcd >/dev/null || need+=(etcd-server)
  [ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
  command -v iptables >/dev/null || need+=(iptables)
  command -v conntrack >/dev/null || need+=(conntrack)
  command -v openssl >/dev/null || need+=(openssl)
  command -v socat >/dev/null || need+=(socat) # kubectl port-forward
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

network_up() {
  # A bridge without ports holds the address: these kernels have no dummy interfaces (no modules).
  ip link show "$NODE_IF" >/dev/null 2>&1 || ip link add "$NODE_IF" type bridge
  local addresses  # not `ip | grep -q`: grep quitting early fails the pipeline under pipefail
  addresses=$(ip -4 -o addr show dev "$NODE_IF")
  [[ $addresses == *"$NODE_IP/32"* ]] || ip addr add "$NODE_IP/32" dev "$NODE_IF"
  ip link set "$NODE_IF" up
  # Pods reach Services through the bridge only when bridged traffic passes iptables.
  modprobe br_netfilter 2>/dev/null || true
  mkdir -p "$STATE"
  [ -f "$STATE/sysctl.saved" ] || sysctl -n net.ipv4.ip_forward >"$STATE/sysctl.saved"
  sysctl -qw net.ipv4.ip_forward=1
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
  # Pod traffic stays inside the cluster: nothing forwarded to addresses outside the pod network.
  iptables -C FORWARD -s 10.244.0.0/16 ! -d 10.244.0.0/16 -m comment --comment medcritical-cluster -j DROP 2>/dev/null ||
    iptables -I FORWARD -s 10.244.0.0/16 ! -d 10.244.0.0/16 -m comment --comment medcritical-cluster -j DROP
}

network_down() {
  while iptables -D FORWARD -s 10.244.0.0/16 ! -d 10.244.0.0/16 -m comment --comment medcritical-cluster -j DROP 2>/dev/null; do :; done
  ip link del "$BRIDGE" 2>/dev/null || true
  ip link del "$NODE_IF" 2>/dev/null || true
  if [ -f "$STATE/sysctl.saved" ]; then
    sysctl -qw net.ipv4.ip_forward="$(cat "$STATE/sysctl.saved")" || true
    rm -f "$STATE/sysctl.saved"
  fi
}

# ---------------------------------------------------------------- certificates and kubeconfigs
cert() { # NAME CN O [SAN]: a key and a certificate signed by the cluster CA
  local name=$1 cn=$2 o=$3 san=${4:-}
  [ -f "$PKI/$name.crt" ] && return
  local subj="/CN=$cn"
  [ -n "$o" ] && subj="/O=$o$subj"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  local ext=$PKI/$name.ext
  echo "basicConstraints=CA:FALSE" >"$ext"
  echo "keyUsage=critical,digitalSignature,keyEncipherment" >>"$ext"
  if [ -n "$san" ]; then
    echo "extendedKeyUsage=serverAuth,clientAuth" >>"$ext"
    echo "subjectAltName=$san" >>"$ext"
  else
    echo "extendedKeyUsage=clientAuth" >>"$ext"
  fi
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

kubeconfig() { # NAME CERT FILE
  local name=$1 cert=$2 file=$3
  local k=("$BIN/kubectl" --kubeconfig "$file")
  "${k[@]}" config set-cluster medcritical-local --server "https://$NODE_IP:6443" \
    --certificate-authority "$PKI/ca.crt" --embed-certs >/dev/null
  "${k[@]}" config set-credentials "$name" --client-certificate "$PKI/$cert.crt" \
    --client-key "$PKI/$cert.key" --embed-certs >/dev/null
  "${k[@]}" config set-context medcritical-local --cluster medcritical-local --user "$name" >/dev/null
  "${k[@]}" config use-context medcritical-local >/dev/null
}

pki() {
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  if [ ! -f "$PKI/ca.crt" ]; then
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -days 3650 \
      -subj "/CN=medcritical-local-ca" -out "$PKI/ca.crt" 2>/dev/null
  fi
  [ -f "$PKI/sa.key" ] || openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  [ -f "$PKI/sa.pub" ] || openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  cert apiserver kube-apiserver "" \
    "IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert admin medcritical-admin system:masters
  cert controller-manager system:kube-controller-manager ""
  cert scheduler system:kube-scheduler ""
  cert kube-proxy system:kube-proxy ""
  cert kubelet-client "system:node:$NODE" system:nodes
  cert kubelet "system:node:$NODE" system:nodes "IP:$NODE_IP,DNS:$NODE"
  kubeconfig admin admin "$PKI/admin.kubeconfig"
  kubeconfig controller-manager controller-manager "$PKI/controller-manager.kubeconfig"
  kubeconfig scheduler scheduler "$PKI/scheduler.kubeconfig"
  kubeconfig kube-proxy kube-proxy "$PKI/kube-proxy.kubeconfig"
  kubeconfig "system:node:$NODE" kubelet-client "$PKI/kubelet.kubeconfig"
  mkdir -p "$(dirname "$KUBECONFIG_OUT")"
  install -m 600 "$PKI/admin.kubeconfig" "$KUBECONFIG_OUT"
}

# ---------------------------------------------------------------- the servers
containerd_up() {
  mkdir -p "$STATE/cni/net.d" "$STATE/cni/ipam" "$RUN/containerd"
  write "$STATE/cni/net.d/10-medcritical.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "medcritical",
  "plugins": [
    {
      "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$STATE/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "10.244.0.1"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  write "$STATE/containerd.toml" <<EOF
version = 2
root = "$STATE/containerd"
state = "$RUN/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Root here lacks CAP_SYS_RESOURCE (a sandboxed VM): runc cannot lower oom_score_adj to the
  # kubelet's -998 for pod sandboxes ("failed to update /proc/self/oom_score_adj: Permission
  # denied"); keep containers at or above containerd's own score instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
EOF
  start containerd containerd --config "$STATE/containerd.toml"
  wait_for 60 containerd ctr_ version
}

etcd_up() {
  start etcd etcd --name medcritical --data-dir "$STATE/etcd" \
    --listen-client-urls "http://$ETCD_CLIENT" --advertise-client-urls "http://$ETCD_CLIENT" \
    --listen-peer-urls "http://$ETCD_PEER" --initial-advertise-peer-urls "http://$ETCD_PEER" \
    --initial-cluster "medcritical=http://$ETCD_PEER" --listen-metrics-urls "" \
    --quota-backend-bytes 2147483648
  wait_for 60 etcd curl -sf "http://$ETCD_CLIENT/health"
}

apiserver_up() {
  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://$ETCD_CLIENT" \
    --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port 6443 \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --client-ca-file "$PKI/ca.crt" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --kubelet-preferred-address-types InternalIP \
    --allow-privileged=true --profiling=false --v=1
  wait_for 120 kube-apiserver kc get --raw /readyz
}

controllers_up() {
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$PKI/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$PKI/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$PKI/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=true --service-cluster-ip-range "$SERVICE_CIDR" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" --v=1
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$PKI/scheduler.kubeconfig" \
    --authentication-kubeconfig "$PKI/scheduler.kubeconfig" \
    --authorization-kubeconfig "$PKI/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --v=1
}

kubelet_up() {
  mkdir -p "$STATE/kubelet"
  # Pods get the cluster's DNS only, not this machine's resolvers and search domains.
  echo "nameserver $DNS_IP" | write "$STATE/resolv.conf"
  write "$STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
resolvConf: $STATE/resolv.conf
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
failSwapOn: false
# No eviction for disk and no image garbage collection. Every image here was built on this machine and
# imported: there is no registry to pull one back from, and this machine's free disk comes and goes
# (other work shares it). A disk-pressure eviction in CI once collected the pause image, and no pod could
# start after it ("failed to get sandbox image"). Disk is checked before each import instead (need_disk);
# a full disk then fails a write with "no space left on device", which names the cause.
evictionHard: {memory.available: 200Mi}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 60
EOF
  start kubelet "$BIN/kubelet" --config "$STATE/kubelet.yaml" \
    --kubeconfig "$PKI/kubelet.kubeconfig" --root-dir "$STATE/kubelet" \
    --node-ip "$NODE_IP" --hostname-override "$NODE" --v=1
  write "$STATE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $PKI/kube-proxy.kubeconfig}
hostnameOverride: $NODE
mode: iptables
clusterCIDR: 10.244.0.0/16
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [$NODE_IP/32]
conntrack: {maxPerCore: 0}   # leave this machine's conntrack table size alone
iptables: {localhostNodePorts: false}
EOF
  start kube-proxy "$BIN/kube-proxy" --config "$STATE/kube-proxy.yaml" --v=1
  wait_for 180 "node $NODE" kc wait --for=condition=Ready "node/$NODE" --timeout=1s
}

# ---------------------------------------------------------------- images the cluster runs
normalized() { # an image name as containerd stores it: docker.io/library/NAME:TAG for short names
  local first=${1%%/*}
  if [ "$first" = "$1" ]; then echo "docker.io/library/$1"
  elif [[ $first == *.* || $first == *:* || $first == localhost ]]; then echo "$1"
  else echo "docker.io/$1"; fi
}

digest_of() { ctr_ images ls | awk -v ref="$(normalized "$1")" '$1 == ref {print $3}'; }

need_disk() { # GB WHAT: fail, with what to do, when the cluster's disk has less than GB free
  local free_kb
  mkdir -p "$STATE"
  free_kb=$(df -Pk "$STATE" | awk 'NR == 2 {print $4}')
  if [ "$free_kb" -lt $(($1 * 1024 * 1024)) ]; then
    die "$2 needs about $1 GB free on $(df -P "$STATE" | awk 'NR == 2 {print $6}') ($STATE), and" \
      "$((free_kb / 1024 / 1024)) GB are free. Free some (docker image prune; k8s/local/cluster.sh purge" \
      "forgets the imported images) or put the cluster on a bigger disk (MEDCRITICAL_CLUSTER_STATE)."
  fi
}

load() { # docker images -> containerd's k8s.io namespace, skipped when the same image is there
  mkdir -p "$STATE/containerd-images"
  local image id marker bytes before
  for image in "$@"; do
    id=$(docker image inspect -f '{{.Id}}' "$image") || die "docker has no image $image"
    marker=$STATE/containerd-images/$(echo "$image" | tr '/:' '__')
    before=$(digest_of "$image") # empty: not in containerd
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$id" ] && [ -n "$before" ]; then
      log "$image: in containerd already"
      continue
    fi
    # An import stores the layers twice (the archive's blobs and the unpacked snapshot); a new version of an
    # image already there shares most of them, so only a first import is counted at full size.
    if [ -n "$before" ]; then need_disk 3 "importing $image"; else
      bytes=$(docker image inspect -f '{{.Size}}' "$image")
      need_disk $((2 * bytes / 1024 / 1024 / 1024 + 3)) "importing $image"
    fi
    log "$image: importing into the node's containerd"
    docker save "$image" | ctr_ images import - >/dev/null
    echo "$id" >"$marker"
    # The runtime also names each image by its ID (sha256:...), and that name kept every earlier version of a
    # rebuilt image alive (6 GB each for the CPU image): the earlier version goes under all its names.
    if [ -n "$before" ] && [ "$before" != "$(digest_of "$image")" ]; then
      ctr_ images ls | awk -v d="$before" -v ref="$(normalized "$image")" '$3 == d && $1 != ref {print $1}' |
        xargs -r ctr --address "$CONTAINERD_SOCK" -n k8s.io images rm >/dev/null
    fi
  done
}

addons() {
  # MinIO too: k8s/local/dev runs it, and no registry could give it to the node (it used to be built and
  # loaded by hand, so a fresh machine's tier, or one whose images the kubelet had collected, had none).
  "$here/build-images.sh" pause coredns minio
  load "$PAUSE_IMAGE" "localhost/medcritical-coredns:$COREDNS_VERSION" "localhost/medcritical-minio:$MINIO_VERSION"
  # Local volumes for PersistentVolumeClaims (the dev overlay's MinIO): a default StorageClass
  # without a provisioner and a few PersistentVolumes on this machine's disk.
  local pvs="" i
  for i in 1 2 3 4; do
    mkdir -p "$STATE/volumes/pv$i"
    pvs+="
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: medcritical-local-pv$i}
spec:
  capacity: {storage: 200Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Delete
  storageClassName: local
  local: {path: $STATE/volumes/pv$i}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [$NODE]}]"
  done
  sed -e "s/@DNS_IP@/$DNS_IP/" -e "s#@COREDNS_IMAGE@#localhost/medcritical-coredns:$COREDNS_VERSION#" \
    "$here/addons.yaml" | kc apply -f - >/dev/null
  echo "$pvs" | kc apply -f - >/dev/null
  kc -n kube-system rollout status deployment/coredns --timeout=180s >/dev/null ||
    die "CoreDNS did not become ready: kc -n kube-system describe pods -l k8s-app=kube-dns"
}

# ---------------------------------------------------------------- Kubeflow Trainer and JobSet
module_dir() { go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'; }

trainer() {
  # Trainer and the JobSet release its go.mod requires, as their release manifests install them
  # (controllers in pods, webhooks with their own certificates), from the modules' source. The
  # release's JobSet manifest is a download URL: JobSet comes from its own module's config/.
  "$here/build-images.sh" trainer jobset
  trim_go_cache
  load "localhost/medcritical-trainer-controller-manager:$TRAINER_VERSION" "localhost/medcritical-jobset:$JOBSET_VERSION"
  local t j dir=$STATE/trainer
  t=$(module_dir "github.com/kubeflow/trainer/v2@$TRAINER_VERSION")
  j=$(module_dir "sigs.k8s.io/jobset@$JOBSET_VERSION")
  mkdir -p "$dir/jobset" "$dir/trainer" "$dir/runtime"
  # kustomize takes other kustomizations by relative path only.
  j=$(realpath --relative-to="$dir/jobset" "$j")
  t=$(realpath --relative-to="$dir/trainer" "$t")
  cat >"$dir/jobset/kustomization.yaml" <<YAML
resources: [$j/config/default]
images:   # the release names its registry's image; ours is built here
  - {name: us-central1-docker.pkg.dev/k8s-staging-images/jobset/jobset, newName: localhost/medcritical-jobset, newTag: $JOBSET_VERSION}
patches:   # a 2-core machine: the release asks for half a core
  - target: {kind: Deployment, name: jobset-controller-manager}
    patch: '[{"op": "replace", "path": "/spec/template/spec/containers/0/resources/requests/cpu", "value": "100m"}]'
YAML
  cat >"$dir/trainer/kustomization.yaml" <<YAML
namespace: kubeflow-system
resources:
  - namespace.yaml
  - $t/manifests/base/crds
  - $t/manifests/base/manager
  - $t/manifests/base/rbac
  - $t/manifests/base/webhook
images:
  - {name: ghcr.io/kubeflow/trainer/trainer-controller-manager, newName: localhost/medcritical-trainer-controller-manager, newTag: $TRAINER_VERSION}
secretGenerator:
  - {name: kubeflow-trainer-webhook-cert, namespace: kubeflow-system, options: {disableNameSuffixHash: true}}
configMapGenerator:
  - {name: kubeflow-trainer-public, literals: [kubeflow_trainer_version=$TRAINER_VERSION], options: {disableNameSuffixHash: true}}
YAML
  printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: kubeflow-system}\n' >"$dir/trainer/namespace.yaml"
  # A single file of the module: kustomize loads files only from below the kustomization.
  cp "$dir/trainer/$t/manifests/base/runtimes/torch_distributed.yaml" "$dir/runtime/"
  chmod u+w "$dir/runtime/torch_distributed.yaml"
  echo "resources: [torch_distributed.yaml]" >"$dir/runtime/kustomization.yaml"
  # Server-side apply: the CRDs are larger than client-side apply's annotation allows.
  local apply=(apply --server-side --force-conflicts)
  kc kustomize "$dir/jobset" | kc "${apply[@]}" -f - >/dev/null
  kc kustomize "$dir/trainer" | kc "${apply[@]}" -f - >/dev/null
  # The PyTorchJob CRD of the v1 training operator, for the legacy manifests' server-side dry run.
  kc "${apply[@]}" -f "$here/../crds/kubeflow.org_pytorchjobs.yaml" >/dev/null
  kc -n jobset-system rollout status deployment/jobset-controller-manager --timeout=300s >/dev/null ||
    die "JobSet's controller did not become ready: kubectl -n jobset-system logs deploy/jobset-controller-manager"
  kc -n kubeflow-system rollout status deployment/kubeflow-trainer-controller-manager --timeout=300s >/dev/null ||
    die "Trainer's controller did not become ready: kubectl -n kubeflow-system logs deploy/kubeflow-trainer-controller-manager"
  # The runtime passes Trainer's validating webhook, which answers once its certificate is in place.
  local i
  for i in $(seq 60); do
    if kc kustomize "$dir/runtime" | kc "${apply[@]}" -f - >/dev/null 2>"$LOGS/runtime-apply.err"; then
      log "Kubeflow Trainer $TRAINER_VERSION, JobSet $JOBSET_VERSION and the torch-distributed runtime are installed"
      return
    fi
    sleep 5
  done
  die "the torch-distributed ClusterTrainingRuntime could not be created: $(cat "$LOGS/runtime-apply.err")"
}

# ---------------------------------------------------------------- commands
up() {
  local t0=$SECONDS
  [ "$(id -u)" = 0 ] || die "needs root (containerd, kubelet, network)"
  need_disk 5 "the local cluster"
  packages
  "$here/build-kubernetes.sh"
  network_up
  pki
  containerd_up
  etcd_up
  apiserver_up
  controllers_up
  kubelet_up
  addons
  trim_go_cache
  log "up in $((SECONDS - t0))s: export KUBECONFIG=$KUBECONFIG_OUT (kubectl: $BIN/kubectl)"
}

trim_go_cache() {
  # Every binary and image is built and cached by version; the compiler's cache (6 GB after a cold build)
  # only speeds up a build of another version, and this machine's disk is shared.
  if [ -d "$GOCACHE" ]; then
    log "removing the Go build cache ($(du -sh "$GOCACHE" | cut -f1)): the pinned versions are built"
    rm -rf "$GOCACHE"
  fi
}

cleanup_pods() {
  # The kubelet is stopped: kill what runs in containerd (containers and pod sandboxes) directly.
  if ctr_ version >/dev/null 2>&1; then
    local id
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    sleep 1
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$id" >/dev/null 2>&1 || true; done
  fi
}

unmount_under() { # unmount everything mounted below a folder, deepest first
  local m
  for m in $(awk -v p="$1" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

down() {
  stop kube-proxy
  stop kubelet
  stop kube-scheduler
  stop kube-controller-manager
  cleanup_pods
  stop containerd
  stop kube-apiserver
  stop etcd
  [ -x "$BIN/kube-proxy" ] && "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  unmount_under "$STATE/kubelet"
  unmount_under "$RUN"
  unmount_under "$STATE/containerd/io.containerd.grpc.v1.cri"
  # Network namespaces of the pods (containerd names them cni-*) and their veths go with them.
  local ns
  for ns in $(ls /var/run/netns 2>/dev/null | grep '^cni-' || true); do
    if ! ip netns pids "$ns" 2>/dev/null | grep -q .; then ip netns del "$ns" 2>/dev/null || true; fi
  done
  network_down
  # The cluster's state goes; the imported images (containerd's content) and the certificates stay.
  rm -rf "$STATE/etcd" "$STATE/kubelet" "$STATE/cni/ipam" "$STATE/volumes" "$RUN"
  log "down"
}

status() {
  local name rc=0
  for name in containerd etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
    if running "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else
      echo "$name: stopped"
      rc=1
    fi
  done
  if [ $rc = 0 ]; then kc get nodes -o wide || rc=1; fi
  return $rc
}

# Sourced (for a single function while debugging), it only defines the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    up) up ;;
    down) down ;;
    purge)
      down
      rm -rf "$STATE" "$KUBECONFIG_OUT"
      ;;
    status) status ;;
    trainer) trainer ;;
    env) echo "export KUBECONFIG=$KUBECONFIG_OUT PATH=$BIN:\$PATH" ;;
    load)
      shift
      load "$@"
      ;;
    *)
      echo "usage: $0 up|down|purge|status|trainer|env|load IMAGE..." >&2
      exit 2
      ;;
  esac
fi
