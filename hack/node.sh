#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine, for hack/e2e.sh: etcd, kube-apiserver (Node,RBAC;
# NodeRestriction and ServiceAccount admission), kube-controller-manager (token controller), kube-scheduler,
# kubelet (cgroupfs driver, cgroup v1 allowed) and containerd + runc + CNI plugins from Debian's packages.
#
#   hack/node.sh up       build what is missing, start everything, wait for the node to be Ready
#   hack/node.sh down     stop everything and remove what it left: processes, mounts, netns, the bridge,
#                         iptables chains, cgroups, host sysctls the kubelet changed
#   hack/node.sh status   what runs, and the node as the apiserver sees it
#   hack/node.sh env      print `export KUBECONFIG=...` (admin) and the tool PATH
#   hack/node.sh images   build the pause and workload images (OCI archives; cached); prints their directory
#   hack/node.sh import ARCHIVE NAME   import an OCI archive into the node's containerd under NAME
#   hack/node.sh pod-sysctl-defaults [NAME=VALUE...]   the kubelet's defaultPodSysctls (none when no argument):
#                                      rewrites its config and restarts it (new pod sandboxes get them)
#   hack/node.sh leftovers             what `down` should have removed (empty output: clean)
#   hack/node.sh purge                 down, and remove the state dir too (certificates, logs, configs)
#
# Nothing comes from a registry: binaries are built from the Go modules (hack/tools.sh), the pause image from
# the k8s module's build/pause/linux/pause.c (static, gcc), the workload image from hack/workload; images are
# imported with `ctr -n k8s.io images import` and run with imagePullPolicy Never/IfNotPresent.
#
# Service routing without kube-proxy: the apiserver reaches webhooks (and any Service it calls) at their
# endpoints (--enable-aggregator-routing), and pods reach the apiserver at the `kubernetes` Service's ClusterIP
# through one DNAT rule in the chain KEEPALIVE-NODE. There is no cluster DNS.
#
# The node runs the newest Kubernetes of hack/versions.env (KUBE_VERSION picks another listed one); from 1.37 on
# with the kubelet's DefaultPodSysctls feature gate on (KEP-5996, alpha), so `pod-sysctl-defaults` can give every
# new pod sysctls that its spec does not name (a value in the pod spec still wins).
#
# Environment: KEEPALIVE_NODE_DIR (state, default /var/lib/keepalive-node), KEEPALIVE_NODE_RUN (default
# /run/keepalive-node), KEEPALIVE_CACHE (as hack/tools.sh), KUBE_VERSION (as hack/tools.sh).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cache="${KEEPALIVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keepalive-operator}"
state="${KEEPALIVE_NODE_DIR:-/var/lib/keepalive-node}"
run="${KEEPALIVE_NODE_RUN:-/run/keepalive-node}"
pki="$state/pki"
logs="$state/logs"

NODE_NAME=keepalive-node
ETCD_PORT=23790
ETCD_PEER_PORT=23800
API_PORT=16443
KUBELET_PORT=11250
KUBELET_HEALTHZ_PORT=11248
SERVICE_CIDR=10.96.0.0/24
SERVICE_IP=10.96.0.1
POD_CIDR=10.244.0.0/24
BRIDGE=kanode0
CHAIN=KEEPALIVE-NODE
PAUSE_IMAGE=localhost/keepalive-e2e/pause:3.10
WORKLOAD_IMAGE=localhost/keepalive-e2e/workload:1
CNI_BIN=/usr/lib/cni
# Host sysctls the kubelet sets at start (setupKernelTunables); restored by `down`.
KUBELET_SYSCTLS="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes"

say() { printf '[node %s] %s\n' "$(date -u +%T)" "$*" >&2; }
die() { printf '[node] error: %s\n' "$*" >&2; exit 1; }

bin() { echo "$("$here/tools.sh" path)"; }
# The node's Kubernetes minor: KUBE_VERSION, else the newest of hack/versions.env.
node_minor() {
  local v="${KUBE_VERSION:-}" rest
  [[ -n $v ]] || read -r v rest < <("$here/tools.sh" versions)
  v="${v#v1.}"; echo "${v%%.*}"
}

kubectl_() { "$BIN/kubectl" --kubeconfig "$state/admin.kubeconfig" "$@"; }
ctr_() { ctr --address "$run/containerd.sock" -n k8s.io "$@"; }

node_ip() {
  local ip
  ip="$(ip -4 -o addr show scope global | awk '$2 != "'$BRIDGE'" {sub(/\/.*/, "", $4); print $4; exit}')"
  [[ -n $ip ]] || die "no global IPv4 address on this machine"
  echo "$ip"
}

# --- packages ----------------------------------------------------------------------------------------------------
ensure_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [[ -x $CNI_BIN/bridge ]] || missing+=(containernetworking-plugins)
  command -v buildah >/dev/null || missing+=(buildah)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v gcc >/dev/null || missing+=(gcc libc6-dev)
  command -v nsenter >/dev/null || missing+=(util-linux)
  command -v tcpdump >/dev/null || missing+=(tcpdump)
  command -v ss >/dev/null || missing+=(iproute2)
  command -v conntrack >/dev/null || missing+=(conntrack)
  ((${#missing[@]} == 0)) && return
  [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || die "missing packages: ${missing[*]}"
  say "installing ${missing[*]} (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  # The package's own service is not ours: the node runs its own containerd with its own socket and dirs.
}

# --- images ------------------------------------------------------------------------------------------------------
images_dir="$cache/images"
buildah_() {
  local store="$cache/e2e-buildah"
  mkdir -p "$store/root" "$store/run"
  [[ -f $store/policy.json ]] || printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$store/policy.json"
  buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"
}

# oci_image NAME BINARY ARCHIVE ENTRYPOINT_JSON USER: a FROM-scratch image of one static binary, cached by key
oci_image() {
  local name="$1" binary="$2" out="$3" entry="$4" user="$5" key
  key="$( (sha256sum "$binary" | cut -d' ' -f1; echo "$name $entry $user"; sed -n '/^oci_image()/,/^}/p' "$0") | sha256sum | cut -c1-32)"
  if [[ -f $out && -f $out.key && $(cat "$out.key") == "$key" ]]; then return; fi
  say "building image $name"
  local store="$cache/e2e-buildah" ctr_id
  buildah_ rm --all >/dev/null 2>&1 || true
  ctr_id="$(buildah_ from --signature-policy "$store/policy.json" scratch)"
  buildah_ copy --chmod 0555 "$ctr_id" "$binary" "/$(basename "$binary")" >/dev/null
  buildah_ config --entrypoint "$entry" --cmd '' --user "$user" --label "org.opencontainers.image.title=$name" "$ctr_id"
  buildah_ commit --quiet --signature-policy "$store/policy.json" --timestamp 0 "$ctr_id" "$name" >/dev/null
  buildah_ rm "$ctr_id" >/dev/null
  rm -f "$out"
  buildah_ push --quiet --signature-policy "$store/policy.json" "$name" "oci-archive:$out.tmp:$name" >&2
  buildah_ rmi --force "$name" >/dev/null 2>&1 || true
  mv "$out.tmp" "$out"
  echo "$key" >"$out.key"
}

build_images() {
  mkdir -p "$images_dir/e2e"
  local w="$images_dir/e2e"
  # pause: the upstream pause.c of the pinned k8s module, static.
  local moddir
  local wrapper; wrapper="$("$here/tools.sh" moddir)"
  moddir="$(cd "$wrapper" && go list -m -f '{{.Dir}}' k8s.io/kubernetes 2>/dev/null)" || true
  if [[ -z $moddir || ! -f $moddir/build/pause/linux/pause.c ]]; then
    (cd "$wrapper" && go mod download k8s.io/kubernetes) >&2
    moddir="$(cd "$wrapper" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
  fi
  local src="$moddir/build/pause/linux/pause.c"
  if [[ ! -x $w/pause || $src -nt $w/pause ]]; then
    say "compiling pause from $src (static)"
    gcc -Os -Wall -Werror -static -DVERSION=v3.10-keepalive-e2e -o "$w/pause" "$src"
    strip "$w/pause"
  fi
  oci_image "$PAUSE_IMAGE" "$w/pause" "$w/pause.oci.tar" '["/pause"]' 65535:65535
  # the workload
  say "building the workload (Go, static)"
  (cd "$root/hack/workload" && CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags '-s -w' \
    -o "$w/keepalive-workload.new" .)
  if cmp -s "$w/keepalive-workload.new" "$w/keepalive-workload"; then rm "$w/keepalive-workload.new"
  else mv "$w/keepalive-workload.new" "$w/keepalive-workload"; fi
  oci_image "$WORKLOAD_IMAGE" "$w/keepalive-workload" "$w/workload.oci.tar" '["/keepalive-workload"]' 65532:65532
  echo "$w"
}

# import_image ARCHIVE NAME: into containerd's k8s.io namespace under NAME. The archive's manifest is renamed to
# NAME first: ctr keeps a short name such as keepalive-operator:0.1.0 as it is, which the CRI plugin then
# normalizes to docker.io/library/... and no longer finds.
import_image() {
  local archive="$1" name="$2" tmp
  tmp="$(mktemp -d)"
  tar -xf "$archive" -C "$tmp"
  sed -i -E 's#"org\.opencontainers\.image\.ref\.name":"[^"]*"#"org.opencontainers.image.ref.name":"'"$name"'"#' "$tmp/index.json"
  grep -qF "\"$name\"" "$tmp/index.json" || { rm -rf "$tmp"; die "$archive: no image name in its index.json"; }
  tar -cf "$tmp.tar" -C "$tmp" .
  rm -rf "$tmp"
  ctr_ images import --all-platforms "$tmp.tar" >/dev/null || { rm -f "$tmp.tar"; die "importing $archive failed"; }
  rm -f "$tmp.tar"
  ctr_ images ls -q | grep -x "$name" >/dev/null || die "image $name not found after importing $archive"
}

# --- PKI (openssl, ECDSA P-256) -----------------------------------------------------------------------------------
# cert NAME CN O SANS: key + certificate signed by the CA; SANS like "DNS:a,IP:1.2.3.4" or ""
cert() {
  local name="$1" cn="$2" o="$3" sans="$4" usage="$5" subj="/CN=$2"
  [[ -f $pki/$name.crt ]] && return
  [[ -n $o ]] && subj="/O=$o/CN=$cn"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/$name.key" 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [[ -n $sans ]] && echo "subjectAltName=$sans"
  } >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 30 \
    -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}

kubeconfig() { # NAME CERT: a kubeconfig for the client certificate pki/CERT
  cat >"$state/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: keepalive-node
  cluster:
    certificate-authority: $pki/ca.crt
    server: https://$NODE_IP:$API_PORT
users:
- name: $1
  user:
    client-certificate: $pki/$2.crt
    client-key: $pki/$2.key
contexts:
- name: keepalive-node
  context: {cluster: keepalive-node, user: $1}
current-context: keepalive-node
EOF
}

make_pki() {
  mkdir -p "$pki"
  chmod 700 "$pki"
  if [[ ! -f $pki/ca.crt ]]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=keepalive-node-ca" -days 30 \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -out "$pki/ca.crt" 2>/dev/null
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/sa.key" 2>/dev/null
    openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  fi
  # The node IP is in the serving certificates: a new IP means new certificates.
  if [[ -f $pki/node-ip && $(cat "$pki/node-ip") != "$NODE_IP" ]]; then rm -f "$pki"/apiserver.* "$pki"/kubelet.*; fi
  echo "$NODE_IP" >"$pki/node-ip"
  cert apiserver kube-apiserver "" \
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:$NODE_IP,IP:$SERVICE_IP" \
    serverAuth
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters "" clientAuth
  cert admin admin system:masters "" clientAuth
  cert controller-manager system:kube-controller-manager "" "" clientAuth
  cert scheduler system:kube-scheduler "" "" clientAuth
  cert kubelet-client "system:node:$NODE_NAME" system:nodes "" clientAuth
  cert kubelet "system:node:$NODE_NAME" system:nodes "DNS:$NODE_NAME,IP:$NODE_IP,IP:127.0.0.1" serverAuth
  kubeconfig admin admin
  kubeconfig controller-manager controller-manager
  kubeconfig scheduler scheduler
  kubeconfig kubelet kubelet-client
}

# --- processes ---------------------------------------------------------------------------------------------------
# alive PID: running (a killed process can stay a zombie until init reaps it)
alive() {
  local st
  st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ -n $st && $st != Z && $st != X ]]
}

# start NAME CMD...: in its own session, logs in $logs/NAME.log, pid in $run/pids/NAME
start() {
  local name="$1"; shift
  local pidf="$run/pids/$name"
  if [[ -f $pidf ]] && alive "$(cat "$pidf")"; then return; fi
  setsid "$@" >>"$logs/$name.log" 2>&1 </dev/null &
  echo $! >"$pidf"
  say "started $name (pid $!)"
}

# stop NAME: SIGTERM, then SIGKILL after 10 s
stop() {
  local pidf="$run/pids/$1" pid i
  [[ -f $pidf ]] || return 0
  pid="$(cat "$pidf")"
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
    say "stopped $1 (pid $pid)"
  fi
  rm -f "$pidf"
}

# wait_for WHAT SECONDS CMD...: poll every 0.5 s
wait_for() {
  local what="$1" secs="$2"; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not ready after ${secs} s (logs in $logs)"
    sleep 0.5
  done
}

write_configs() {
  mkdir -p "$state/containerd" "$state/cni/net.d" "$state/cni/ipam" "$state/kubelet" "$state/kubelet/manifests"
  cat >"$state/containerd/config.toml" <<EOF
version = 2
root = "$state/containerd/root"
state = "$run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.grpc.v1.introspection.tracing"]
[grpc]
  address = "$run/containerd.sock"
[ttrpc]
  address = "$run/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  enable_selinux = false
  # The kubelet asks for negative OOM score adjustments (-998 for sandboxes); without CAP_SYS_RESOURCE (as in a
  # container) runc cannot set them: clamp to containerd's own value instead.
  restrict_oom_score_adj = true
  # Pod network namespaces under our runtime dir (not /run/netns), where "down" finds every one of them.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$run/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$state/cni/net.d"
    max_conf_num = 1
EOF
  cat >"$state/cni/net.d/10-keepalive-node.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "keepalive-node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$state/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  write_kubelet_config
}

save_host_state() {
  [[ -f $state/host-sysctls ]] && return
  local k
  # The nftables tables that exist before us (iptables-nft creates ip nat/filter/mangle on first use).
  if command -v nft >/dev/null; then nft list tables 2>/dev/null >"$state/host-nft-tables" || true; fi
  for k in $KUBELET_SYSCTLS net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables; do
    printf '%s=%s\n' "$k" "$(sysctl -n "$k" 2>/dev/null || echo '')"
  done >"$state/host-sysctls"
}

setup_routing() {
  # Pods reach the apiserver at the kubernetes Service's ClusterIP:443 (what in-cluster clients read from
  # KUBERNETES_SERVICE_HOST/PORT).
  iptables -t nat -N "$CHAIN" 2>/dev/null || true
  iptables -t nat -F "$CHAIN"
  iptables -t nat -A "$CHAIN" -d "$SERVICE_IP/32" -p tcp --dport 443 -j DNAT --to-destination "$NODE_IP:$API_PORT"
  iptables -t nat -C PREROUTING -j "$CHAIN" 2>/dev/null || iptables -t nat -I PREROUTING -j "$CHAIN"
  iptables -t nat -C OUTPUT -j "$CHAIN" 2>/dev/null || iptables -t nat -I OUTPUT -j "$CHAIN"
}

# The kubelet's configuration, with the defaultPodSysctls saved by `pod-sysctl-defaults` (if any).
write_kubelet_config() {
  cat >"$state/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 0.0.0.0
port: $KUBELET_PORT
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization:
  mode: Webhook
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$run/containerd.sock
# Static pods: the e2e drops a manifest here (the agent must verify them through their mirror pod's config hash).
staticPodPath: $state/kubelet/manifests
fileCheckFrequency: 5s
resolvConf: /etc/resolv.conf
# Plenty of room is not guaranteed on a shared machine: do not evict or collect images here.
evictionHard: {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
imageGCHighThresholdPercent: 100
imageMinimumGCAge: 87600h
serializeImagePulls: false
podCIDR: $POD_CIDR
maxPods: 110
makeIPTablesUtilChains: false
registerNode: true
rotateCertificates: false
serverTLSBootstrap: false
shutdownGracePeriod: 0s
EOF
  if (( $(node_minor) >= 37 )); then
    printf 'featureGates:\n  DefaultPodSysctls: true\n' >>"$state/kubelet/config.yaml"
    if [[ -s $state/kubelet/default-pod-sysctls ]]; then
      echo "defaultPodSysctls:" >>"$state/kubelet/config.yaml"
      local line
      while IFS= read -r line; do
        printf '  %s: "%s"\n' "${line%%=*}" "${line#*=}" >>"$state/kubelet/config.yaml"
      done <"$state/kubelet/default-pod-sysctls"
    fi
  fi
}

start_kubelet() {
  start kubelet "$BIN/kubelet" \
    --config="$state/kubelet/config.yaml" --kubeconfig="$state/kubelet.kubeconfig" \
    --root-dir="$state/kubelet" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
    --cert-dir="$state/kubelet/pki" --v=1
}

# pod-sysctl-defaults NAME=VALUE...: the kubelet restarted with these defaultPodSysctls (none: without)
pod_sysctl_defaults() {
  (( $(node_minor) >= 37 )) || die "defaultPodSysctls needs a 1.37 kubelet (this node: 1.$(node_minor))"
  [[ -f $run/pids/kubelet ]] || die "the node is not up (hack/node.sh up)"
  local kv
  for kv in "$@"; do
    [[ $kv =~ ^[a-z0-9_.]+=[0-9A-Za-z_.-]+$ ]] || die "not NAME=VALUE: '$kv'"
  done
  printf '%s\n' "$@" | sed '/^$/d' >"$state/kubelet/default-pod-sysctls"
  BIN="$(bin)"; NODE_IP="$(cat "$pki/node-ip")"
  write_kubelet_config
  stop kubelet
  start_kubelet
  # The new kubelet serving (its healthz), then the node Ready: pods created from now on get the new defaults.
  wait_for "kubelet healthz" 60 curl -sf "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz"
  wait_for "node $NODE_NAME" 120 kubectl_ wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
  say "kubelet restarted with defaultPodSysctls: ${*:-(none)}"
}

up() {
  local t0=$SECONDS
  [[ $(id -u) -eq 0 ]] || die "needs root"
  ensure_packages
  say "binaries (hack/tools.sh; a cold build of kubelet, kube-controller-manager and kube-scheduler takes minutes)"
  "$here/tools.sh" build node >/dev/null
  BIN="$(bin)"
  local imgdir
  imgdir="$(build_images)"
  NODE_IP="$(node_ip)"
  say "node $NODE_NAME at $NODE_IP; state in $state, runtime in $run"
  mkdir -p "$state" "$logs" "$run/pids" "$state/etcd"
  save_host_state
  make_pki
  write_configs
  setup_routing

  start etcd "$BIN/etcd" --name=default --data-dir="$state/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="default=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level=warn
  wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"

  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=0.0.0.0 --advertise-address="$NODE_IP" --secure-port="$API_PORT" \
    --cert-dir="$state/apiserver-certs" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$pki/ca.crt" \
    --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --enable-aggregator-routing=true \
    --allow-privileged=true --profiling=false --v=1
  wait_for kube-apiserver 90 "$BIN/kubectl" --kubeconfig "$state/admin.kubeconfig" get --raw /readyz

  # No cloud: its controllers off where the controller-manager still has them (1.37 removed them).
  local controllers='*,-nodeipam'
  (( $(node_minor) >= 37 )) || controllers+=',-cloud-node-lifecycle,-service-lb-controller,-node-route-controller'
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$state/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$state/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$state/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=0 --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --service-cluster-ip-range="$SERVICE_CIDR" --cluster-name=keepalive-node \
    --controllers="$controllers" \
    --profiling=false --v=1
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$state/scheduler.kubeconfig" \
    --authentication-kubeconfig="$state/scheduler.kubeconfig" \
    --authorization-kubeconfig="$state/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=0 --leader-elect=false --profiling=false --v=1

  start containerd containerd --config "$state/containerd/config.toml"
  wait_for containerd 30 ctr --address "$run/containerd.sock" version
  say "importing images into containerd"
  import_image "$imgdir/pause.oci.tar" "$PAUSE_IMAGE"
  import_image "$imgdir/workload.oci.tar" "$WORKLOAD_IMAGE"

  start_kubelet
  say "waiting for the node to be Ready"
  wait_for "node $NODE_NAME" 180 kubectl_ wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
  # The ServiceAccount admission needs the default ServiceAccount, which the controller-manager creates.
  wait_for "default ServiceAccount" 60 kubectl_ get serviceaccount default -n default
  say "node Ready after $((SECONDS - t0)) s; export KUBECONFIG=$state/admin.kubeconfig"
}

# --- down --------------------------------------------------------------------------------------------------------
# Processes of ours that `stop` does not track: containerd's shims (started by our containerd, with our socket in
# their arguments) and the containers' processes (in runc's state under our runc root).
kill_runtime_leftovers() {
  local id pid
  if [[ -d $run/runc ]]; then
    for d in "$run"/runc/*/; do
      [[ -d $d ]] || continue
      for id in $(runc --root "$d" list -q 2>/dev/null); do
        runc --root "$d" kill -a "$id" KILL 2>/dev/null || true
        sleep 0.2
        runc --root "$d" delete -f "$id" 2>/dev/null || true
      done
    done
  fi
  for pid in $(pgrep -f -- "-address $run/containerd.sock" 2>/dev/null || true); do
    # Only shims whose command line names our socket.
    grep -qaF -- "$run/containerd.sock" "/proc/$pid/cmdline" 2>/dev/null || continue
    kill -KILL "$pid" 2>/dev/null || true
  done
}

unmount_under() { # every mount point under the given directories, deepest first
  local m
  for dir in "$@"; do
    [[ -d $dir ]] || continue
    while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(awk -v d="$dir" '{ gsub(/\\040/, " ", $5); if (index($5, d "/") == 1 || $5 == d) print $5 }' /proc/self/mountinfo | sort -r)
  done
}

remove_cgroups() { # the kubelet's kubepods hierarchy in every cgroup v1 controller (and the unified one)
  local h
  for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    [[ -d ${h}kubepods ]] || continue
    find "${h}kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

remove_iptables() {
  local t c
  iptables -t nat -D PREROUTING -j "$CHAIN" 2>/dev/null || true
  iptables -t nat -D OUTPUT -j "$CHAIN" 2>/dev/null || true
  iptables -t nat -F "$CHAIN" 2>/dev/null || true
  iptables -t nat -X "$CHAIN" 2>/dev/null || true
  # What the CNI plugins (portmap, bridge) and the kubelet added, if a pod was not torn down through CNI.
  for t in nat filter mangle; do
    for c in $(iptables -t "$t" -S 2>/dev/null | awk '$1 == "-N" && ($2 ~ /^CNI-/ || $2 ~ /^KUBE-/) {print $2}'); do
      while read -r rule; do
        eval "iptables -t $t ${rule/-A /-D }" 2>/dev/null || true
      done < <(iptables -t "$t" -S 2>/dev/null | grep -E -- "-j $c( |$)" || true)
    done
    for c in $(iptables -t "$t" -S 2>/dev/null | awk '$1 == "-N" && ($2 ~ /^CNI-/ || $2 ~ /^KUBE-/) {print $2}'); do
      iptables -t "$t" -F "$c" 2>/dev/null || true
    done
    for c in $(iptables -t "$t" -S 2>/dev/null | awk '$1 == "-N" && ($2 ~ /^CNI-/ || $2 ~ /^KUBE-/) {print $2}'); do
      iptables -t "$t" -X "$c" 2>/dev/null || true
    done
  done
  # Tables iptables-nft created for us, when they are empty again (only built-in chains without rules).
  if command -v nft >/dev/null && [[ -f $state/host-nft-tables ]]; then
    local fam name
    while read -r _ fam name; do
      grep -qx "table $fam $name" "$state/host-nft-tables" && continue
      [[ $fam == ip || $fam == ip6 ]] || continue
      [[ $name == nat || $name == filter || $name == mangle ]] || continue
      if ! nft list table "$fam" "$name" 2>/dev/null | grep -vE '^\s*(table|chain|type|policy|\}|$)|^\s*type ' >/dev/null; then
        nft delete table "$fam" "$name" 2>/dev/null || true
      fi
    done < <(nft list tables 2>/dev/null)
    rm -f "$state/host-nft-tables"
  fi
}

restore_sysctls() {
  [[ -f $state/host-sysctls ]] || return 0
  local k v
  while IFS='=' read -r k v; do
    [[ -n $v ]] || continue
    [[ $(sysctl -n "$k" 2>/dev/null) == "$v" ]] || sysctl -qw "$k=$v" 2>/dev/null || true
  done <"$state/host-sysctls"
  rm -f "$state/host-sysctls"
}

down() {
  local t0=$SECONDS
  BIN="$(bin)"
  if [[ -f $run/pids/kubelet && -f $run/pids/kube-apiserver ]] && alive "$(cat "$run/pids/kubelet")" &&
    alive "$(cat "$run/pids/kube-apiserver")"; then
    # Let the kubelet tear the pods down through CNI (their veths, IPs and iptables rules go with them):
    # stop the controllers that would recreate them, then delete every pod.
    say "deleting all pods through the kubelet"
    stop kube-controller-manager
    kubectl_ delete pods --all --all-namespaces --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
      # Sandboxes stopped (CNI DEL ran): no pod left, no running task, no veth on the bridge.
      [[ -z $(kubectl_ get pods -A -o name 2>/dev/null) ]] &&
        [[ -z $(ctr_ tasks ls 2>/dev/null | awk 'NR > 1 && $3 == "RUNNING"') ]] &&
        [[ -z $(ip -o link show master "$BRIDGE" 2>/dev/null) ]] && break
      sleep 1
    done
  fi
  stop kubelet
  stop kube-scheduler
  stop kube-controller-manager
  stop kube-apiserver
  stop etcd
  kill_runtime_leftovers
  stop containerd
  kill_runtime_leftovers
  unmount_under "$state/kubelet" "$state/containerd" "$run"
  # Network namespaces containerd made (bind-mounted under its state dir, unmounted above) and the bridge.
  ip link del "$BRIDGE" 2>/dev/null || true
  remove_iptables
  remove_cgroups
  restore_sysctls
  rm -rf "$run" "$state/kubelet" "$state/containerd/root" "$state/etcd" "$state/cni/ipam" "$state/apiserver-certs"
  say "down after $((SECONDS - t0)) s"
}

status() {
  local n pid
  for n in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet; do
    if [[ -f $run/pids/$n ]] && alive "$(cat "$run/pids/$n")"; then
      printf '%-24s running (pid %s)\n' "$n" "$(cat "$run/pids/$n")"
    else
      printf '%-24s stopped\n' "$n"
    fi
  done
  if [[ -f $run/pids/kube-apiserver ]]; then
    BIN="$(bin)"
    kubectl_ get nodes -o wide 2>&1 || true
  fi
}

leftovers() { # prints what down should have removed; empty when clean
  local n
  for n in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet; do
    [[ -f $run/pids/$n ]] && echo "pid file: $n"
  done
  pgrep -af -- "$run/containerd.sock|$state/" 2>/dev/null | grep -v "pgrep\|node.sh\|e2e.sh" | sed 's/^/process: /' || true
  awk -v r="$run" -v s="$state" '$5 ~ "^" r || $5 ~ "^" s {print "mount: " $5}' /proc/self/mountinfo
  ip link show "$BRIDGE" >/dev/null 2>&1 && echo "interface: $BRIDGE"
  ip -o link show type veth 2>/dev/null | awk -F': ' '$2 ~ /^veth/ {print "interface: " $2}'
  iptables-save 2>/dev/null | grep -E "$CHAIN|CNI-|KUBE-" | sed 's/^/iptables: /' || true
  for h in /sys/fs/cgroup/*/kubepods; do [[ -d $h ]] && echo "cgroup: $h"; done
  true
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  leftovers) leftovers ;;
  pod-sysctl-defaults) shift; pod_sysctl_defaults "$@" ;;
  purge) down; rm -rf "$state"; say "removed $state" ;;
  images) ensure_packages; build_images ;;
  import) # import ARCHIVE NAME: an OCI archive into the node's containerd, under NAME
    [[ $# -eq 3 ]] || die "usage: hack/node.sh import ARCHIVE NAME"
    import_image "$2" "$3" ;;
  env) echo "export KUBECONFIG=$state/admin.kubeconfig PATH=$(bin):\$PATH" ;;
  *) die "usage: hack/node.sh up|down|status|env|images|import ARCHIVE NAME|pod-sysctl-defaults [NAME=VALUE...]|leftovers|purge" ;;
esac
