#!/usr/bin/env bash
# End-to-end proof on a real node: the operator changes what the kernel does.
#
#   hack/e2e.sh [--keep]
#
# Environment: KEEPALIVE_E2E_HELM_ARGS (extra helm flags, e.g. "--set agent.countConnections=socket-fds"),
# KEEPALIVE_IMAGE_PROFILE (hack/image.sh: release, or dev to build quicker), KEEPALIVE_E2E_AGENT_DAC_READ_SEARCH=1
# (see below).
#
# 1. hack/node.sh up (etcd, apiserver, controller-manager, scheduler, kubelet, containerd; see there);
# 2. the operator image (hack/image.sh; KEEPALIVE_IMAGE_PROFILE=dev for a quicker build) imported into containerd,
#    `helm install` of charts/keepalive-operator into keepalive-system (Pod Security "restricted"), the agent in
#    keepalive-system-agent ("privileged"); the operator and agent pods become Ready;
# 3. a KeepalivePolicy time 20 / interval 5 / probes 3 for the namespace e2e-keepalive, a server pod (namespace
#    e2e-plain, no policy) and the client Deployment (2 pods, each holding 2 connections with SO_KEEPALIVE and
#    1 without);
# 4. checks: the pods' sysctls; the values in their network namespaces; the agent's KeepaliveNodeReport;
#    `kubectl get kap` conformant + live + coverage; on the wire (tcpdump on the host's veths, from before the
#    clients connect): the first probe after 20 s of idle, an answered probe followed by the next after 20 s,
#    then, with the server's answers dropped, probes every 5 s and the reset after 3; `ss -o` timers in the
#    pod's namespace; a client without the policy keeps the 7200 s default and sends no probe; the chart's
#    injection mode `auto` is admissionPolicy on 1.37: a MutatingAdmissionPolicy and binding by the operator, no
#    webhook configuration, and a pod created while the operator is scaled to 0 gets the policy's sysctls (its
#    kernel holds them) and conforms; after `helm upgrade --set injection.mode=webhook` the operator has removed the
#    admission policy and a pod created while it is scaled to 0 is reported NotMutated (at the end, back in
#    admissionPolicy mode, `helm uninstall` leaves no admission policy: the garbage collector removes it with the
#    operator's ClusterRole, its owner); a static pod
#    (a manifest in the kubelet's staticPodPath) reported by its config hash and counted live-verified; pods
#    created in a loop through a `kubectl rollout restart` of the operator's 2 replicas: none rejected, none
#    without its sysctls (the replicas drain on SIGTERM); the node's kubelet is the newest version of
#    hack/versions.env (1.37) with the DefaultPodSysctls gate on: restarted with defaultPodSysctls 240/30/4, pods of
#    a namespace with an Audit policy of those values get them from the kubelet alone (nothing in their spec) and
#    count conformant and live-verified, not NotMutated; a pod-spec value still wins over the node default;
#    per connection: the agent reads every socket with a BPF iterator; the clients' plain connection makes them
#    ConnectionsUnprotected; a pod holding one connection of each kind (Go's default keepalive, its own idle of
#    7200 s, SO_KEEPALIVE only, none, TCP_USER_TIMEOUT) under a policy with idleTimeoutSeconds 350 is reported
#    group by group as `ss -tieo` shows its sockets, classified protected 2 / protectedByApp 1 / armedTooLate 1 /
#    unarmed 1, and the wire shows each first probe at the reported idle time;
# 5. a PASS/FAIL summary, and hack/node.sh down (unless --keep).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
keep=false
[[ ${1:-} == --keep ]] && keep=true

t_start=$SECONDS
say() { printf '[e2e %s] %s\n' "$(date -u +%T)" "$*" >&2; }
results=()
failed=0
pass() { results+=("PASS  $*"); say "PASS $*"; }
fail() { results+=("FAIL  $*"); say "FAIL $*"; failed=$((failed + 1)); }
check() { # check NAME CMD...: PASS when the command succeeds
  local name="$1"; shift
  if "$@"; then pass "$name"; else fail "$name"; fi
}

summary() {
  local rc=$?
  set +e
  if [[ -n ${tcpdump_pid:-} ]]; then kill "$tcpdump_pid" 2>/dev/null; wait "$tcpdump_pid" 2>/dev/null; fi
  if [[ -n ${tcpdump2_pid:-} ]]; then kill "$tcpdump2_pid" 2>/dev/null; wait "$tcpdump2_pid" 2>/dev/null; fi
  if [[ -n ${drop_rule:-} ]]; then nsenter -t "$server_pid" -n iptables -D $drop_rule 2>/dev/null; fi
  ((rc != 0)) && fail "ABORTED (exit $rc) during: ${stage:-?}"
  local e2e_s=$((SECONDS - t_start))
  if ! $keep; then
    say "tearing the node down (hack/node.sh down; --keep keeps it)"
    local t=$SECONDS left
    "$here/node.sh" down
    left="$("$here/node.sh" leftovers)"
    if [[ -z $left ]]; then pass "node down in $((SECONDS - t)) s: no process, mount, interface, iptables rule or cgroup left"
    else fail "node down left: $(tr '\n' ';' <<<"$left")"; fi
  fi
  echo
  echo "================ e2e summary ================"
  printf '%s\n' "${results[@]}"
  echo "e2e $e2e_s s (node up ${node_up_s:-?} s), total $((SECONDS - t_start)) s; $(printf '%s\n' "${results[@]}" | grep -c '^PASS') passed, $failed failed"
  if ((failed == 0)); then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
  echo "============================================="
  ((failed == 0))
  exit $?
}
trap summary EXIT

stage="node up"
t=$SECONDS
"$here/node.sh" up
node_up_s=$((SECONDS - t))
pass "node up (Ready after ${node_up_s} s)"
eval "$("$here/node.sh" env)"
state="${KEEPALIVE_NODE_DIR:-/var/lib/keepalive-node}"
run="${KEEPALIVE_NODE_RUN:-/run/keepalive-node}"
WORKLOAD_IMAGE=localhost/keepalive-e2e/workload:1
NS=e2e-keepalive
PLAIN_NS=e2e-plain
REL_NS=keepalive-system
NODE_NAME="$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')"
read -r NEWEST_KUBE _ < <("$here/tools.sh" versions)
kubelet_version="$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.nodeInfo.kubeletVersion}')"
[[ $kubelet_version == "${KUBE_VERSION:-$NEWEST_KUBE}" ]] \
  && pass "node runs kubelet $kubelet_version (the newest of hack/versions.env)" \
  || fail "node runs kubelet '$kubelet_version', want ${KUBE_VERSION:-$NEWEST_KUBE}"
# The agent's own namespace (the chart's default: the release namespace + "-agent"), Pod Security "privileged".
AGENT_NS=keepalive-system-agent

# pid of the first process of a pod's container (via containerd's task list)
pod_pid() { # NAMESPACE POD
  local cid
  cid="$(kubectl get pod -n "$1" "$2" -o jsonpath='{.status.containerStatuses[0].containerID}')"
  cid="${cid#containerd://}"
  ctr --address "$run/containerd.sock" -n k8s.io tasks ls | awk -v c="$cid" '$1 == c {print $2}'
}
in_pod() { local pid; pid="$(pod_pid "$1" "$2")"; shift 2; nsenter -t "$pid" -n "$@"; }

# --- operator image and chart --------------------------------------------------------------------------------------
stage="operator image"
t=$SECONDS
archive="$("$here/image.sh")"
version="$(tar -xOf "$archive" index.json | sed -n 's/.*"org.opencontainers.image.ref.name":"[^"]*:\([^"]*\)".*/\1/p')"
[[ -n $version ]] || version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' "$root/charts/keepalive-operator/Chart.yaml")"
"$here/node.sh" import "$archive" "localhost/keepalive-operator:$version"
pass "operator image built and imported as localhost/keepalive-operator:$version ($((SECONDS - t)) s)"

stage="helm install"
t=$SECONDS
kubectl create namespace "$REL_NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# Helm cannot manage the release namespace: it enforces Pod Security "restricted" before the install, as the README
# says. The agent (hostPID, two capabilities) runs in a namespace of its own, which the chart creates "privileged".
kubectl label namespace "$REL_NS" --overwrite pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/audit=restricted pod-security.kubernetes.io/warn=restricted >/dev/null
helm upgrade --install keepalive "$root/charts/keepalive-operator" -n "$REL_NS" \
  --set image.repository=localhost/keepalive-operator --set image.tag="$version" --set image.pullPolicy=Never \
  --set operator.logFormat=text --set agent.logFormat=text ${KEEPALIVE_E2E_HELM_ARGS:-} \
  --wait --timeout 180s >/dev/null
kubectl get pods -n "$REL_NS" -o wide
if kubectl rollout status -n "$REL_NS" deployment/keepalive-keepalive-operator --timeout=60s >/dev/null 2>&1 ||
  kubectl rollout status -n "$REL_NS" deployment -l app.kubernetes.io/component=operator --timeout=60s >/dev/null; then
  pass "helm install: operator Deployment Ready ($((SECONDS - t)) s)"
else fail "helm install: operator Deployment Ready"; fi
operator_deploy="$(kubectl get deploy -n "$REL_NS" -l app.kubernetes.io/component=operator -o name)"
check "helm install: agent DaemonSet Ready (namespace $AGENT_NS)" kubectl rollout status -n "$AGENT_NS" daemonset -l app.kubernetes.io/component=agent --timeout=60s
kubectl get pods -n "$AGENT_NS" -o wide
# Pod Security: the operator's namespace enforces "restricted" (its pods were admitted under it), the agent's
# "privileged"; no agent in the release namespace.
psa_level() { kubectl get namespace "$1" -o jsonpath='{.metadata.labels.pod-security\.kubernetes\.io/enforce}'; }
if [[ $(psa_level "$REL_NS") == restricted ]] &&
  [[ $(kubectl get pods -n "$REL_NS" -l app.kubernetes.io/component=operator -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | sort -u) == True ]]
then pass "Pod Security: namespace $REL_NS enforces restricted, the operator's pods run and are Ready there"
else fail "Pod Security: namespace $REL_NS enforces restricted, the operator's pods run and are Ready there"; fi
if [[ $(psa_level "$AGENT_NS") == privileged ]] &&
  [[ $(kubectl get pods -n "$AGENT_NS" -l app.kubernetes.io/component=agent -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | sort -u) == True ]] &&
  [[ -z $(kubectl get pods -n "$REL_NS" -l app.kubernetes.io/component=agent -o name) ]]
then pass "Pod Security: namespace $AGENT_NS enforces privileged, the agent's pods run and are Ready there (none in $REL_NS)"
else fail "Pod Security: namespace $AGENT_NS enforces privileged, the agent's pods run and are Ready there (none in $REL_NS)"; fi

# With agent.countConnections=socket-fds the agent lists /proc/<pid>/fd of each pod's processes; with only
# SYS_PTRACE and SYS_ADMIN it cannot for pods that run as another uid (the directory is 0500, owned by the pod's
# uid) and falls back to a sock_diag dump. KEEPALIVE_E2E_AGENT_DAC_READ_SEARCH=1 adds DAC_READ_SEARCH to the
# installed DaemonSet so that the descriptors path itself is exercised.
ds="$(kubectl get ds -n "$AGENT_NS" -l app.kubernetes.io/component=agent -o name)"
if [[ ${KEEPALIVE_E2E_AGENT_DAC_READ_SEARCH:-0} == 1 ]] &&
  ! kubectl get -n "$AGENT_NS" "$ds" -o jsonpath='{.spec.template.spec.containers[0].securityContext.capabilities.add}' | grep DAC_READ_SEARCH >/dev/null; then
  say "WORKAROUND: adding DAC_READ_SEARCH to the agent's capabilities"
  kubectl patch -n "$AGENT_NS" "$ds" --type=json \
    -p '[{"op":"add","path":"/spec/template/spec/containers/0/securityContext/capabilities/add/-","value":"DAC_READ_SEARCH"}]' >/dev/null
  kubectl rollout status -n "$AGENT_NS" "$ds" --timeout=60s >/dev/null
  results+=("NOTE  agent DaemonSet patched: capabilities + DAC_READ_SEARCH (KEEPALIVE_E2E_AGENT_DAC_READ_SEARCH=1)")
fi

# --- policy and workload ---------------------------------------------------------------------------------------------
stage="policy and workload"
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $NS
  labels: {keepalive-e2e: "on"}
---
apiVersion: v1
kind: Namespace
metadata:
  name: $PLAIN_NS
---
apiVersion: keepalive.dev/v1alpha1
kind: KeepalivePolicy
metadata:
  name: e2e-fast
spec:
  mode: Enforce
  namespaceSelector:
    matchLabels: {keepalive-e2e: "on"}
  keepalive: {time: 20, interval: 5, probes: 3}
EOF
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: $PLAIN_NS
  labels: {app: keepalive-server}
spec:
  containers:
    - name: server
      image: $WORKLOAD_IMAGE
      imagePullPolicy: Never
      args: [server, --listen, ":7000"]
      ports: [{containerPort: 7000}]
EOF
kubectl wait -n "$PLAIN_NS" pod/server --for=condition=Ready --timeout=60s >/dev/null
server_ip="$(kubectl get pod -n "$PLAIN_NS" server -o jsonpath='{.status.podIP}')"
server_pid="$(pod_pid "$PLAIN_NS" server)"
say "server pod at $server_ip"

# On the wire: every packet of port 7000 as it enters the host from a pod's veth (each packet once).
capture="$state/e2e-capture.txt"
: >"$capture"
tcpdump -i any -Q in -nn -tt -l 'tcp port 7000' >"$capture" 2>"$state/e2e-tcpdump.log" &
tcpdump_pid=$!
sleep 2

client_manifest() { # NAMESPACE NAME REPLICAS
  cat <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $2
  namespace: $1
spec:
  replicas: $3
  selector:
    matchLabels: {app: $2}
  template:
    metadata:
      labels: {app: $2}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: client
          image: $WORKLOAD_IMAGE
          imagePullPolicy: Never
          args: [client, --peer, "$server_ip:7000", --keepalive, "2", --plain, "1"]
EOF
}
client_manifest "$NS" clients 2 | kubectl apply -f - >/dev/null
client_manifest "$PLAIN_NS" plain-client 1 | kubectl apply -f - >/dev/null
kubectl rollout status -n "$NS" deployment/clients --timeout=90s >/dev/null
kubectl rollout status -n "$PLAIN_NS" deployment/plain-client --timeout=90s >/dev/null
t_clients=$SECONDS
mapfile -t clients < <(kubectl get pods -n "$NS" -l app=clients -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
plain_pod="$(kubectl get pods -n "$PLAIN_NS" -l app=plain-client -o jsonpath='{.items[0].metadata.name}')"
say "clients: ${clients[*]}; without policy: $plain_pod"

# --- pod spec and kernel values ---------------------------------------------------------------------------------------
stage="sysctls"
spec_sysctls() { kubectl get pod -n "$1" "$2" -o jsonpath='{range .spec.securityContext.sysctls[*]}{.name}={.value} {end}'; }
for p in "${clients[@]}"; do
  s="$(spec_sysctls "$NS" "$p")"
  echo "  $NS/$p spec sysctls: $s"
  [[ $s == *"net.ipv4.tcp_keepalive_time=20"* && $s == *"net.ipv4.tcp_keepalive_intvl=5"* && $s == *"net.ipv4.tcp_keepalive_probes=3"* ]] \
    && pass "pod $p: sysctls injected at admission ($s)" || fail "pod $p: sysctls injected (got '$s')"
  k="$(in_pod "$NS" "$p" sh -c 'echo $(cat /proc/sys/net/ipv4/tcp_keepalive_time /proc/sys/net/ipv4/tcp_keepalive_intvl /proc/sys/net/ipv4/tcp_keepalive_probes)')"
  [[ $k == "20 5 3" ]] && pass "pod $p: kernel holds time/intvl/probes = $k in its netns" || fail "pod $p: kernel values '$k', want '20 5 3'"
done
s="$(spec_sysctls "$PLAIN_NS" "$plain_pod")"
k="$(in_pod "$PLAIN_NS" "$plain_pod" sh -c 'echo $(cat /proc/sys/net/ipv4/tcp_keepalive_time /proc/sys/net/ipv4/tcp_keepalive_intvl /proc/sys/net/ipv4/tcp_keepalive_probes)')"
[[ -z $s && $k == "7200 75 9" ]] && pass "pod without policy ($plain_pod): no sysctls in spec, kernel default $k" \
  || fail "pod without policy: spec '$s', kernel '$k' (want none, 7200 75 9)"

# --- ss timers ----------------------------------------------------------------------------------------------------------
stage="ss timers"
c0="${clients[0]}"
ss_out="$(in_pod "$NS" "$c0" ss -tno state established "( dport = :7000 )")"
echo "$ss_out" | sed 's/^/  ss (policy) | /'
n_ka="$(grep -c 'timer:(keepalive' <<<"$ss_out" || true)"
n_plain="$(grep -vc 'timer:\|^Recv-Q\|^State' <<<"$ss_out" || true)"
max_timer="$(grep -o 'timer:(keepalive,[0-9.]*sec' <<<"$ss_out" | grep -o '[0-9.]*sec' | tr -d sec | sort -n | tail -1)"
if ((n_ka == 2 && n_plain == 1)) && [[ -n $max_timer ]] && awk -v t="$max_timer" 'BEGIN {exit !(t <= 20)}'; then
  pass "ss -o in $c0: 2 connections with keepalive timers ≤ 20 s (max ${max_timer} s), 1 without timer"
else fail "ss -o in $c0: $n_ka keepalive timers (max '${max_timer}'), $n_plain without"; fi
ss_plain="$(in_pod "$PLAIN_NS" "$plain_pod" ss -tno state established "( dport = :7000 )")"
echo "$ss_plain" | sed 's/^/  ss (no policy) | /'
if grep -q 'timer:(keepalive,1[12][0-9]min' <<<"$ss_plain"; then
  pass "ss -o in $plain_pod: keepalive timer counts down from the 7200 s default ($(grep -o 'keepalive,[0-9]*min' <<<"$ss_plain" | sed -n 1p))"
else fail "ss -o in $plain_pod: no ~120 min keepalive timer"; fi

# The connection followed on the wire: one keepalive connection of the first client.
c0_ip="$(kubectl get pod -n "$NS" "$c0" -o jsonpath='{.status.podIP}')"
c0_port="$(grep 'timer:(keepalive' <<<"$ss_out" | awk '{print $3}' | sed -n 1p)"; c0_port="${c0_port##*:}"
plain_port="$(grep -v 'timer:\|^Recv-Q\|^State' <<<"$ss_out" | awk 'NF {print $3}' | sed -n 1p)"; plain_port="${plain_port##*:}"
say "following $c0_ip:$c0_port -> $server_ip:7000 (keepalive) and $c0_ip:$plain_port (plain) on the wire"

# client->server packets of the connection, one per line: "<time> <flags> <length>", and server->client likewise
wire() { # SRC DST
  awk -v s="$1" -v d="$2:" '$5 == s && $7 == d {
      f = ""; for (i = 8; i <= NF; i++) if ($i == "Flags") f = $(i + 1)
      l = $NF; print $1, f, l }' "$capture"
}
# keepalive probes: client->server, ACK only, no payload, after the handshake's ACK
probes() { wire "$c0_ip.$c0_port" "$server_ip.7000" | awk '$2 == "[.]," && $3 == 0' | awk 'NR > 1 {print $1}'; }

# --- on the wire -----------------------------------------------------------------------------------------------------
stage="wire"
# Phase 1 (server answers): wait for the second probe, then drop the server's side of this connection.
deadline=$((SECONDS + 90))
until (($(probes | wc -l) >= 2)) || ((SECONDS > deadline)); do sleep 0.5; done
drop_rule="INPUT -s $c0_ip -p tcp --sport $c0_port --dport 7000 -j DROP"
nsenter -t "$server_pid" -n iptables -I $drop_rule
say "dropping what $c0_ip:$c0_port sends to the server (in the server pod's netns): probes go unanswered"
# Phase 2: 3 unanswered probes 5 s apart, then the reset.
deadline=$((SECONDS + 60))
until wire "$c0_ip.$c0_port" "$server_ip.7000" | grep '\[R' >/dev/null; do ((SECONDS < deadline)) || break; sleep 0.5; done
nsenter -t "$server_pid" -n iptables -D $drop_rule && drop_rule=""
sleep 1
kill "$tcpdump_pid" 2>/dev/null; wait "$tcpdump_pid" 2>/dev/null || true; tcpdump_pid=""

echo "  capture of $c0_ip:$c0_port <-> $server_ip:7000 (tcpdump -i any -Q in; relative to the handshake):"
all="$( (wire "$c0_ip.$c0_port" "$server_ip.7000" | sed 's/^/c>s /'; wire "$server_ip.7000" "$c0_ip.$c0_port" | sed 's/^/s>c /') \
  | awk '{print $2, $1, $3, $4}' | sort -n)"
t0="$(awk '$2 == "c>s" && $3 == "[.]," && $4 == 0 {print $1; exit}' <<<"$all")"
awk -v t0="$t0" '{printf "    %+9.3f s  %s  Flags %s length %s\n", $1 - t0, $2, $3, $4}' <<<"$all"
if python3 - "$t0" <<EOF
import sys
t0 = float(sys.argv[1])
ev = [l.split() for l in """$all""".strip().splitlines()]
ev = [(float(t), d, f) for t, d, f, n in ev]
# after the handshake ACK: client probes, each answered or not by the server before the next probe
after = [e for e in ev if e[0] > t0]
probes = [e[0] for e in after if e[1] == "c>s" and e[2] == "[.],"]
answers = [e[0] for e in after if e[1] == "s>c" and e[2] == "[.],"]
rst = [e for e in after if e[1] == "c>s" and e[2].startswith("[R")]
ok = True
def say(m): print("    " + m)
if len(probes) < 5:
    say(f"only {len(probes)} probes captured"); sys.exit(1)
answer_of = {}
for i, p in enumerate(probes):
    nxt = probes[i + 1] if i + 1 < len(probes) else float("inf")
    a = [x for x in answers if p <= x < nxt]
    if a: answer_of[i] = a[0]
# The first probe's timer is armed for 20 s at the handshake. The kernel's timer wheel never fires early but
# rounds a 20 s timer up to its level's granularity: 512 jiffies, 2.048 s at HZ=250 (0.512 s at HZ=1000).
# Later probes come from shorter re-armed timers (idle left after the 5 s interval check), 0.256 s granularity.
import gzip
hz = 250
try:
    for line in gzip.open("/proc/config.gz", "rt"):
        if line.startswith("CONFIG_HZ="): hz = int(line.split("=")[1])
except OSError:
    pass
def slack(seconds):
    j, n = seconds * hz, 0
    while n < 8 and j >= (63 << (n * 3)): n += 1
    return 8 ** n / hz
first = probes[0] - t0
hi = 20 + slack(20)
say(f"first probe {first:.2f} s after the handshake (want 20 to {hi:.2f}: a 20 s kernel timer at HZ={hz} fires up to {slack(20):.3f} s late)")
ok &= 19.95 <= first <= hi + 0.1
idle = [round(probes[i + 1] - answer_of[i], 2) for i in range(len(probes) - 1) if i in answer_of]
say(f"{len(idle)} answered probes; next probe after {idle} s of idle (want 20 ± 1)")
ok &= len(idle) >= 1 and all(abs(g - 20) <= 1 for g in idle)
unanswered = [p for i, p in enumerate(probes) if i not in answer_of]
gaps = [round(b - a, 2) for a, b in zip(unanswered, unanswered[1:])]
say(f"unanswered probes: {len(unanswered)}, then gaps {gaps} s (want 3 probes, 5 ± 1 s apart)")
ok &= len(unanswered) == 3 and all(abs(g - 5) <= 1 for g in gaps)
if rst:
    r = rst[0][0] - unanswered[-1]
    say(f"reset {r:.2f} s after the last probe (want 5 ± 1: probes=3 exhausted)"); ok &= abs(r - 5) <= 1
else:
    say("no reset seen"); ok = False
sys.exit(0 if ok else 1)
EOF
then pass "on the wire: first probe after 20 s idle (+ timer slack), next after 20 ± 1 s idle when answered, unanswered every 5 ± 1 s, reset after 3"
else fail "on the wire: keepalive timing (see the capture above)"; fi
n_plain_probes="$(wire "$c0_ip.$plain_port" "$server_ip.7000" | awk '$2 == "[.]," && $3 == 0' | awk 'NR > 1' | wc -l)"
plain_ip="$(kubectl get pod -n "$PLAIN_NS" "$plain_pod" -o jsonpath='{.status.podIP}')"
n_nopolicy="$(awk -v s="$plain_ip" 'index($5, s ".") == 1 && $7 == "'"$server_ip"'.7000:" && /Flags \[\.\]/ && $NF == 0' "$capture" | wc -l)"
# The pod without policy: 3 handshake ACKs (one per connection), then nothing for 7200 s.
((n_plain_probes == 0)) && pass "on the wire: the connection without SO_KEEPALIVE sent no probe" \
  || fail "on the wire: $n_plain_probes probes on the connection without SO_KEEPALIVE"
((n_nopolicy <= 3)) && pass "on the wire: the pod without policy sent no probe in $((SECONDS - t_clients)) s (7200 s default)" \
  || fail "on the wire: the pod without policy sent $((n_nopolicy - 3)) probes"

# --- agent report and policy status ----------------------------------------------------------------------------------
stage="agent and policy status"
deadline=$((SECONDS + 60))
# Each client holds 2 connections with SO_KEEPALIVE and 1 without: the kernel holds the policy's values (live 2),
# but the plain connection will never probe, so the agent's per-socket reading makes both ConnectionsUnprotected.
kap_row() { kubectl get kap e2e-fast -o jsonpath='{.status.matchedPods} {.status.conformantPods} {.status.liveVerifiedPods} {.status.connectionCoverage} {.status.protectedConnections} {.status.violationCounts.ConnectionsUnprotected}'; }
until [[ $(kap_row 2>/dev/null) == "2 0 2 4/6 4/6 2" ]]; do
  ((SECONDS < deadline)) || break
  sleep 2
done
kubectl get kap
kubectl get kanr
kubectl get kanr -o yaml | sed -n '/^  spec:/,/^  status:/p' | sed -n 1,60p | sed 's/^/  kanr | /'
kap="$(kap_row)"
[[ $kap == "2 0 2 4/6 4/6 2" ]] \
  && pass "kubectl get kap: matched 2, live 2, coverage 4/6, protected 4/6; both ConnectionsUnprotected (their plain connection)" \
  || fail "kubectl get kap: matched/conformant/live/coverage/protected/unprotected = '$kap', want '2 0 2 4/6 4/6 2'"
message="$(kubectl get kap e2e-fast -o jsonpath='{.status.violations[0].message}')"
echo "  violation: $message"
[[ $message == "1 of 3 connections will not send a keepalive probe before the policy's keepalive time of 20 s (no idleTimeoutSeconds set): 1 connection to $server_ip:7000 from keepalive-workl has no SO_KEEPALIVE"* ]] \
  && pass "ConnectionsUnprotected names the destination and process of the connection without SO_KEEPALIVE" \
  || fail "ConnectionsUnprotected message: '$message'"
kanr="$(kubectl get kanr -o json)"
client_uids="$(kubectl get pods -n "$NS" -l app=clients -o jsonpath='{range .items[*]}{.metadata.uid}{" "}{end}')"
node_uid="$(kubectl get node "$NODE_NAME" -o jsonpath='{.metadata.uid}')"
if python3 - "$kanr" "$client_uids" "$NODE_NAME" "$node_uid" <<'EOF'
import json, sys
doc = json.loads(sys.argv[1]); uids = sys.argv[2].split(); node, node_uid = sys.argv[3], sys.argv[4]
# The agent reads no pods: its entries are by pod UID, joined to pods by the controller.
report = next(i for i in doc["items"] if i["metadata"]["name"] == node)
entries = {p["uid"]: p for p in report["spec"].get("pods", [])}
ok = all(entries.get(u, {}).get("sysctls") == {"time": 20, "interval": 5, "probes": 3} for u in uids)
owners = [(o["kind"], o["uid"]) for o in report["metadata"].get("ownerReferences", [])]
print(f"  report {node}: {len(entries)} pod entries, owner {owners}")
sys.exit(0 if ok and owners == [("Node", node_uid)] else 1)
EOF
then pass "KeepaliveNodeReport: live time/interval/probes 20/5/3 for both client pods by UID; owned by the Node (its UID)"
else fail "KeepaliveNodeReport: live 20/5/3 for both client pods by UID, or the Node ownerReference, not found"; fi

# --- per connection: each kind of client socket judged against a load balancer's idle timeout ------------------------
stage="per connection"
CONN_NS=e2e-connections
capture2="$state/e2e-capture-7003.txt"
: >"$capture2"
tcpdump -i any -Q in -nn -tt -l 'tcp port 7003' >"$capture2" 2>"$state/e2e-tcpdump-7003.log" &
tcpdump2_pid=$!
sleep 2
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $CONN_NS
  labels: {keepalive-e2e: "connections"}
---
apiVersion: keepalive.dev/v1alpha1
kind: KeepalivePolicy
metadata:
  name: e2e-lb
spec:
  namespaceSelector:
    matchLabels: {keepalive-e2e: "connections"}
  keepalive: {time: 20, interval: 5, probes: 3}
  idleTimeoutSeconds: 350
---
apiVersion: v1
kind: Pod
metadata: {name: conn-server, namespace: $PLAIN_NS}
spec:
  containers:
    - {name: server, image: $WORKLOAD_IMAGE, imagePullPolicy: Never, args: [server, --listen, ":7003"]}
EOF
kubectl wait -n "$PLAIN_NS" pod/conn-server --for=condition=Ready --timeout=60s >/dev/null
conn_server_ip="$(kubectl get pod -n "$PLAIN_NS" conn-server -o jsonpath='{.status.podIP}')"
# The new policy reaches admission once the operator has recompiled the admission policy (or the webhook's cache has
# it): a server-side dry run shows when a pod created now gets its values.
deadline=$((SECONDS + 90))
until kubectl run lb-probe -n "$CONN_NS" --image="$WORKLOAD_IMAGE" --restart=Never --dry-run=server \
  -o jsonpath='{.spec.securityContext.sysctls[*].value}' 2>/dev/null | grep -x '20 5 3' >/dev/null; do
  ((SECONDS < deadline)) || break
  sleep 1
done
# One connection of each kind: go-default (Go's runtime: 15 s / 15 s / 9), own-idle-7200, sysctl (SO_KEEPALIVE
# only), none, user-timeout (SO_KEEPALIVE + TCP_USER_TIMEOUT 30 s).
kubectl run classes -n "$CONN_NS" --image="$WORKLOAD_IMAGE" --image-pull-policy=Never --restart=Never \
  -- classes --peer "$conn_server_ip:7003" >/dev/null
kubectl wait -n "$CONN_NS" pod/classes --for=condition=Ready --timeout=60s >/dev/null
t_classes=$SECONDS
classes_uid="$(kubectl get pod -n "$CONN_NS" classes -o jsonpath='{.metadata.uid}')"
# The report: five groups once the agent has read the pod's connections (a new pod's first entry, or the next
# heartbeat).
entry_groups() {
  kubectl get kanr "$NODE_NAME" -o json | python3 -c '
import json, sys
doc = json.load(sys.stdin); uid = sys.argv[1]
e = next((p for p in doc["spec"].get("pods", []) if p["uid"] == uid), {})
for g in sorted(e.get("sockets", {}).get("groups", []), key=lambda g: (g["keepalive"], g["idleSeconds"], g.get("userTimeoutMs", 0))):
    print(g["connections"], g["keepalive"], g["idleFrom"], g["idleSeconds"], g["intervalSeconds"], g["probes"], g.get("userTimeoutMs", 0))
' "$classes_uid"
}
want_groups="1 False Sysctl 0 0 0 0
1 True Socket 15 15 9 0
1 True Sysctl 20 5 3 0
1 True Sysctl 20 5 3 30000
1 True Socket 7200 5 3 0"
deadline=$((SECONDS + 100))
until [[ $(entry_groups 2>/dev/null) == "$want_groups" ]]; do ((SECONDS < deadline)) || break; sleep 2; done
groups="$(entry_groups)"
echo "$groups" | sed 's/^/  report groups (connections keepalive idleFrom idle interval probes userTimeoutMs) | /'
reading="$(kubectl get kanr "$NODE_NAME" -o jsonpath='{.spec.connectionReading.method}')"
[[ $groups == "$want_groups" && $reading == PerSocket ]] \
  && pass "agent reads per socket (BPF): Go default 15/15/9 from the socket, own idle 7200, SO_KEEPALIVE only 20/5/3 from the sysctls, TCP_USER_TIMEOUT 30000 ms, one without SO_KEEPALIVE" \
  || fail "agent per-socket groups for pod classes (reading '$reading'): got '$groups'"
# ss in the pod's namespace: the same sockets, armed or not, each keepalive timer within its reported idle time.
ss_classes="$(in_pod "$CONN_NS" classes ss -tieo state established "( dport = :7003 )")"
echo "$ss_classes" | grep -v '^\s' | sed 's/^/  ss -tieo (classes) | /'
if python3 - "$ss_classes" "$groups" <<'PY_SS'
import re, sys
ss, groups = sys.argv[1], sys.argv[2]
def seconds(t):
    s = 0.0
    for n, u in re.findall(r"([0-9.]+)(min|sec|ms)", t):
        s += float(n) * {"min": 60, "sec": 1, "ms": 0.001}[u]
    return s
lines = [l for l in ss.splitlines() if "7003" in l]
timers = sorted(seconds(m) for l in lines for m in re.findall(r"timer:\(keepalive,([^,]+),", l))
unarmed = sum(1 for l in lines if "timer:(keepalive" not in l)
idles = sorted(int(g.split()[3]) for g in groups.splitlines() if g.split()[1] == "True")
print(f"  ss: {len(timers)} keepalive timers {timers}, {unarmed} without; report: armed idles {idles}")
ok = len(lines) == 5 and unarmed == 1 and len(timers) == len(idles) and all(t <= i + 0.5 for t, i in zip(timers, idles))
ok = ok and timers[-1] > 7000
sys.exit(0 if ok else 1)
PY_SS
then pass "ss -tieo in the pod agrees: 4 keepalive timers, each within the reported idle (15, 20, 20, 7200), 1 socket without"
else fail "ss -tieo in the pod disagrees with the agent's report"; fi
# The policy status: classes against the 350 s idle timeout.
lb_row() { kubectl get kap e2e-lb -o jsonpath='{.status.connections.protected} {.status.connections.protectedByApp} {.status.connections.armedTooLate} {.status.connections.unarmed} {.status.connections.userTimeout} {.status.protectedConnections} {.status.violationCounts.ConnectionsUnprotected}'; }
deadline=$((SECONDS + 60))
until [[ $(lb_row 2>/dev/null) == "2 1 1 1 1 3/5 1" ]]; do ((SECONDS < deadline)) || break; sleep 2; done
kubectl get kap e2e-lb
lb="$(lb_row)"
[[ $lb == "2 1 1 1 1 3/5 1" ]] \
  && pass "policy e2e-lb (idle timeout 350 s): protected 2, protectedByApp 1 (Go), armedTooLate 1 (7200 s), unarmed 1, userTimeout 1; PROTECTED 3/5" \
  || fail "policy e2e-lb classes protected/byApp/tooLate/unarmed/userTimeout/PROTECTED/unprotected pods = '$lb', want '2 1 1 1 1 3/5 1'"
message="$(kubectl get kap e2e-lb -o jsonpath='{.status.violations[0].reason}: {.status.violations[0].message}')"
echo "  violation: $message"
[[ $message == "ConnectionsUnprotected: 2 of 5 connections will not send a keepalive probe before the 350 s idle timeout: 1 connection to $conn_server_ip:7003 from keepalive-workl has no SO_KEEPALIVE; 1 connection to $conn_server_ip:7003 from keepalive-workl probes first after 7200 s"* ]] \
  && pass "ConnectionsUnprotected names both unprotected connections: no SO_KEEPALIVE, and a first probe after 7200 s" \
  || fail "e2e-lb violation message: '$message'"
# On the wire: the first probe of each armed connection at its reported idle time; none on the other two.
sleep $((t_classes + 24 - SECONDS > 0 ? t_classes + 24 - SECONDS : 0))
kill "$tcpdump2_pid" 2>/dev/null; wait "$tcpdump2_pid" 2>/dev/null || true
if python3 - "$capture2" "$conn_server_ip" "$groups" <<'PY_WIRE'
import sys, collections
capture, server, groups = sys.argv[1], sys.argv[2] + ".7003", sys.argv[3]
flows = collections.defaultdict(list)  # client -> [(time, flags, length)]
for line in open(capture):
    f = line.split()
    try:
        i = f.index(">")
    except ValueError:
        continue
    src, dst = f[i - 1], f[i + 1].rstrip(":")
    if dst != server:
        continue
    flags = f[f.index("Flags") + 1] if "Flags" in f else ""
    length = int(f[-1]) if f[-1].isdigit() else -1
    flows[src].append((float(f[0]), flags, length))
delays = []
silent = 0
for src, packets in flows.items():
    syn = [t for t, fl, _ in packets if fl.startswith("[S")]
    if not syn:
        continue
    acks = [t for t, fl, l in packets if fl == "[.]," and l == 0]
    # acks[0] ends the handshake; a keepalive probe is the next bare ACK.
    if len(acks) >= 2:
        delays.append(round(acks[1] - acks[0], 2))
    else:
        silent += 1
delays.sort()
idles = sorted(int(g.split()[3]) for g in groups.splitlines() if g.split()[1] == "True" and int(g.split()[3]) < 350)
print(f"  wire: first probe after {delays} s of idle on {len(delays)} connections, {silent} silent; reported idles below 350 s: {idles}")
ok = len(delays) == len(idles) == 3 and silent == 2 and all(i <= d <= i + 1.5 for d, i in zip(delays, idles))
sys.exit(0 if ok else 1)
PY_WIRE
then pass "on the wire: first probes at the reported idle times (15 s Go default, 20 s from the sysctl twice); none from the 7200 s and the unarmed connection"
else fail "on the wire: first probes do not match the reported idle times (capture $capture2)"; fi
kubectl delete namespace "$CONN_NS" --wait=false >/dev/null
kubectl delete pod -n "$PLAIN_NS" conn-server --wait=false >/dev/null
kubectl delete keepalivepolicy e2e-lb >/dev/null

# --- injection mode: the chart's `auto` on 1.37 compiles the policies into a MutatingAdmissionPolicy ----------------
stage="injection mode"
fullname=keepalive-keepalive-operator
map_name="$fullname-policies"
map_label="$(kubectl get mutatingadmissionpolicy "$map_name" -o jsonpath='{.metadata.labels.app\.kubernetes\.io/managed-by}' 2>/dev/null || true)"
binding_policy="$(kubectl get mutatingadmissionpolicybinding "$map_name" -o jsonpath='{.spec.policyName}' 2>/dev/null || true)"
mwc="$(kubectl get mutatingwebhookconfigurations -o name)"
kubectl get mutatingadmissionpolicies
if [[ $map_label == keepalive-operator && $binding_policy == "$map_name" && $mwc != *"/$fullname"* ]]; then
  pass "injection mode auto on 1.37: MutatingAdmissionPolicy $map_name and its binding by the operator, no MutatingWebhookConfiguration"
else fail "injection mode auto: MAP label '$map_label', binding policy '$binding_policy', webhook configurations '${mwc//$'\n'/ }'"; fi
injected_reason="$(kubectl get kap e2e-fast -o jsonpath='{.status.conditions[?(@.type=="Injected")].reason}')"
[[ $injected_reason == AdmissionPolicy ]] && pass "kubectl get kap e2e-fast: condition Injected, reason AdmissionPolicy" \
  || fail "condition Injected reason '$injected_reason', want AdmissionPolicy"

# --- pods created while the operator is down ------------------------------------------------------------------------------
# Scales the operator to 0, creates pod $1 in $NS, scales it back.
late_pod() {
  replicas="$(kubectl get -n "$REL_NS" "$operator_deploy" -o jsonpath='{.spec.replicas}')"
  kubectl scale -n "$REL_NS" "$operator_deploy" --replicas=0 >/dev/null
  kubectl wait -n "$REL_NS" pod -l app.kubernetes.io/component=operator --for=delete --timeout=60s >/dev/null 2>&1 || true
  t=$SECONDS
  if kubectl run "$1" -n "$NS" --image="$WORKLOAD_IMAGE" --image-pull-policy=Never --restart=Never \
    -- client --peer "$server_ip:7000" --keepalive 1 --plain 0 >/dev/null; then
    pass "operator at 0 replicas: pod '$1' created anyway in $((SECONDS - t)) s (failurePolicy Ignore)"
  else fail "operator at 0 replicas: pod '$1' not created"; fi
}
operator_back() {
  kubectl scale -n "$REL_NS" "$operator_deploy" --replicas="$replicas" >/dev/null
  kubectl rollout status -n "$REL_NS" "$operator_deploy" --timeout=90s >/dev/null
}
violation_of() { kubectl get kap e2e-fast -o jsonpath='{range .status.violations[*]}{.name}={.reason}{"\n"}{end}' | sed -n "s/^$1=//p"; }
stage="operator scaled to 0 (admissionPolicy)"
late_pod late
s="$(spec_sysctls "$NS" late)"
kubectl wait -n "$NS" pod/late --for=condition=Ready --timeout=60s >/dev/null 2>&1 || true
k="$(in_pod "$NS" late sh -c 'echo $(cat /proc/sys/net/ipv4/tcp_keepalive_time /proc/sys/net/ipv4/tcp_keepalive_intvl /proc/sys/net/ipv4/tcp_keepalive_probes)' 2>/dev/null || true)"
[[ $s == *"net.ipv4.tcp_keepalive_time=20"* && $s == *"net.ipv4.tcp_keepalive_intvl=5"* && $s == *"net.ipv4.tcp_keepalive_probes=3"* && $k == "20 5 3" ]] \
  && pass "pod 'late' got the policy's sysctls from the apiserver with no operator running ($s); its kernel holds $k" \
  || fail "pod 'late': spec sysctls '$s', kernel '$k' (want 20/5/3 in both)"
operator_back
deadline=$((SECONDS + 60))
until kubectl get kap e2e-fast -o jsonpath='{.status.liveVerifiedPods}' | grep -x 3 >/dev/null; do
  ((SECONDS < deadline)) || break
  sleep 2
done
v="$(violation_of late)"
[[ -z $v ]] && kubectl get kap e2e-fast -o jsonpath='{.status.liveVerifiedPods}' | grep -x 3 >/dev/null \
  && pass "operator back: pod 'late' conforms and is live-verified (3 live), no NotMutated" \
  || fail "operator back: 'late' violation '$v', live $(kubectl get kap e2e-fast -o jsonpath='{.status.liveVerifiedPods}')"
kubectl delete pod -n "$NS" late --wait=true >/dev/null
# Back to the two clients before the static pod is counted.
deadline=$((SECONDS + 60))
until kubectl get kap e2e-fast -o jsonpath='{.status.liveVerifiedPods}' | grep -x 2 >/dev/null; do
  ((SECONDS < deadline)) || break
  sleep 2
done

# The same in webhook mode (helm upgrade --set injection.mode=webhook): the operator removes the admission policy,
# the chart registers the webhook, and a pod created while no replica answers is reported NotMutated.
stage="webhook mode"
t=$SECONDS
helm upgrade keepalive "$root/charts/keepalive-operator" -n "$REL_NS" --reuse-values --set injection.mode=webhook \
  --wait --timeout 180s >/dev/null
kubectl rollout status -n "$REL_NS" "$operator_deploy" --timeout=90s >/dev/null
deadline=$((SECONDS + 60))
while kubectl get mutatingadmissionpolicy "$map_name" >/dev/null 2>&1; do
  ((SECONDS < deadline)) || break
  sleep 1
done
if ! kubectl get mutatingadmissionpolicy "$map_name" >/dev/null 2>&1 && ! kubectl get mutatingadmissionpolicybinding "$map_name" >/dev/null 2>&1 &&
  kubectl get mutatingwebhookconfiguration "$fullname" >/dev/null 2>&1; then
  pass "helm upgrade to injection.mode=webhook: webhook registered, admission policy and binding removed by the operator ($((SECONDS - t)) s)"
else fail "helm upgrade to webhook mode: MAP/binding still there or no MutatingWebhookConfiguration $fullname"; fi
late_pod late-webhook
s="$(spec_sysctls "$NS" late-webhook)"
[[ -z $s ]] && pass "webhook mode: pod 'late-webhook' has no injected sysctls" || fail "pod 'late-webhook' has sysctls '$s'"
operator_back
deadline=$((SECONDS + 60))
until [[ $(violation_of late-webhook) == NotMutated ]]; do
  ((SECONDS < deadline)) || break
  sleep 2
done
kubectl get kap e2e-fast
kubectl get kap e2e-fast -o jsonpath='{range .status.violations[*]}  violation: {.namespace}/{.name} {.reason}: {.message}{"\n"}{end}'
[[ $(violation_of late-webhook) == NotMutated ]] && pass "operator back: policy status lists pod 'late-webhook' as NotMutated" \
  || fail "operator back: 'late-webhook' not NotMutated in the policy status"
kubectl delete pod -n "$NS" late-webhook --wait=true >/dev/null

# --- a static pod: verified through its mirror pod's config hash --------------------------------------------------------
stage="static pod"
static_dir="$state/kubelet/manifests"
cat >"$static_dir/e2e-static.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: e2e-static
  namespace: $NS
spec:
  securityContext:
    sysctls:
      - {name: net.ipv4.tcp_keepalive_time, value: "20"}
      - {name: net.ipv4.tcp_keepalive_intvl, value: "5"}
      - {name: net.ipv4.tcp_keepalive_probes, value: "3"}
  containers:
    - name: server
      image: $WORKLOAD_IMAGE
      imagePullPolicy: Never
      args: [server, --listen, ":7001"]
EOF
static_pod="e2e-static-$NODE_NAME"
deadline=$((SECONDS + 90))
until [[ $(kubectl get pod -n "$NS" "$static_pod" -o jsonpath='{.status.phase}' 2>/dev/null) == Running ]]; do
  ((SECONDS < deadline)) || break
  sleep 2
done
mirror_hash="$(kubectl get pod -n "$NS" "$static_pod" -o jsonpath='{.metadata.annotations.kubernetes\.io/config\.mirror}' 2>/dev/null || true)"
mirror_uid="$(kubectl get pod -n "$NS" "$static_pod" -o jsonpath='{.metadata.uid}' 2>/dev/null || true)"
say "static pod $static_pod: mirror pod UID $mirror_uid, config hash $mirror_hash"
deadline=$((SECONDS + 90))
until kubectl get kap e2e-fast -o jsonpath='{.status.liveVerifiedPods}' | grep -x 3 >/dev/null; do
  ((SECONDS < deadline)) || break
  sleep 2
done
in_report="$(kubectl get kanr "$NODE_NAME" -o jsonpath='{range .spec.pods[*]}{.uid}={.sysctls.time}{"\n"}{end}' | grep -x "$mirror_hash=20" || true)"
static_violation="$(kubectl get kap e2e-fast -o jsonpath='{range .status.violations[*]}{.name}={.reason}{"\n"}{end}' | grep "^$static_pod=" || true)"
if [[ -n $mirror_hash && -n $in_report && -z $static_violation ]] &&
  kubectl get kap e2e-fast -o jsonpath='{.status.liveVerifiedPods}' | grep -x 3 >/dev/null; then
  pass "static pod: the agent reports it by its config hash ($mirror_hash), the policy counts it live-verified (3 live)"
else fail "static pod: hash '$mirror_hash' in report '$in_report', violation '$static_violation', live $(kubectl get kap e2e-fast -o jsonpath='{.status.liveVerifiedPods}')"; fi
rm -f "$static_dir/e2e-static.yaml"

# --- pod creation through a rolling restart of the operator -------------------------------------------------------------
stage="rollout restart"
RNS=e2e-rollout
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $RNS
  labels: {e2e: rollout}
---
apiVersion: keepalive.dev/v1alpha1
kind: KeepalivePolicy
metadata:
  name: e2e-rollout
spec:
  namespaceSelector: {matchLabels: {e2e: rollout}}
  keepalive: {time: 240, interval: 15, probes: 4}
EOF
rollout_pod() { # rollout_pod NAME: a pod that stays Pending (no node matches it)
  printf 'apiVersion: v1\nkind: Pod\nmetadata: {name: %s}\nspec: {nodeSelector: {keepalive.dev/nowhere: "true"}, containers: [{name: c, image: %s}]}\n' \
    "$1" "$WORKLOAD_IMAGE"
}
# The policy reaches both replicas' caches before the loop starts.
deadline=$((SECONDS + 30))
until [[ $(rollout_pod probe | kubectl create -n "$RNS" --dry-run=server -o jsonpath='{.spec.securityContext.sysctls[0].value}' -f - 2>/dev/null) == 240 ]]; do
  ((SECONDS < deadline)) || break
  sleep 1
done
# Pods created one after another while the operator's 2 replicas are replaced: each create goes through the
# webhook of whichever replica the apiserver picks.
rollout_dir="$(mktemp -d)"
(
  i=0 rejected=0
  while [[ ! -e $rollout_dir/done ]] || ((i < 200)); do
    rollout_pod "r$i" | kubectl create -n "$RNS" -f - >/dev/null 2>>"$rollout_dir/errors" || rejected=$((rejected + 1))
    i=$((i + 1))
  done
  echo "$i $rejected" >"$rollout_dir/count"
) &
creator=$!
sleep 2
t=$SECONDS
kubectl rollout restart -n "$REL_NS" "$operator_deploy" >/dev/null
if kubectl rollout status -n "$REL_NS" "$operator_deploy" --timeout=240s >/dev/null; then
  pass "kubectl rollout restart of the operator (2 replicas) completed in $((SECONDS - t)) s while pods were created"
else fail "kubectl rollout restart of the operator did not complete"; fi
touch "$rollout_dir/done"
wait "$creator" || true
created=0 rejected=unknown
[[ -f $rollout_dir/count ]] && read -r created rejected <"$rollout_dir/count"
listed="$(kubectl get pods -n "$RNS" -o name | wc -l)"
without="$(kubectl get pods -n "$RNS" -o jsonpath='{range .items[*]}{.metadata.name}={.spec.securityContext.sysctls[*].name}{"\n"}{end}' |
  awk -F= '!/tcp_keepalive_time/ || !/tcp_keepalive_intvl/ || !/tcp_keepalive_probes/ {n++} END {print n + 0}')"
echo "  created $created pods, rejected $rejected, listed $listed, without their sysctls $without"
if [[ $rejected == 0 && $listed == "$created" && $created -ge 200 ]]; then
  pass "rollout restart: $created pods created, 0 rejected"
else
  fail "rollout restart: $rejected of $created pods rejected ($listed listed)"
  sed -n 1,20p "$rollout_dir/errors"
fi
[[ $without == 0 && $listed -ge 200 ]] && pass "rollout restart: all $listed pods carry the policy's sysctls" \
  || fail "rollout restart: $without of $listed pods created without their sysctls"
kubectl delete namespace "$RNS" --wait=false >/dev/null
kubectl delete keepalivepolicy e2e-rollout >/dev/null
rm -rf "$rollout_dir"

# --- the kubelet's defaultPodSysctls (Kubernetes 1.37, KEP-5996) ------------------------------------------------------
stage="kubelet defaultPodSysctls"
DNS=e2e-node-defaults
t=$SECONDS
if grep -qx '  DefaultPodSysctls: true' "$state/kubelet/config.yaml" &&
  "$here/node.sh" pod-sysctl-defaults net.ipv4.tcp_keepalive_time=240 net.ipv4.tcp_keepalive_intvl=30 \
    net.ipv4.tcp_keepalive_probes=4; then
  pass "kubelet restarted with the DefaultPodSysctls gate and defaultPodSysctls 240/30/4 ($((SECONDS - t)) s)"
else fail "kubelet with DefaultPodSysctls and defaultPodSysctls 240/30/4"; fi
# An Audit policy whose values the node already gives every pod; pods there carry nothing in their spec.
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $DNS
  labels: {e2e: node-defaults}
---
apiVersion: keepalive.dev/v1alpha1
kind: KeepalivePolicy
metadata:
  name: e2e-node-defaults
spec:
  mode: Audit
  namespaceSelector: {matchLabels: {e2e: node-defaults}}
  keepalive: {time: 240, interval: 30, probes: 4}
EOF
nd_pod() { # nd_pod NAMESPACE NAME [SYSCTL=VALUE]: a workload server pod, with one sysctl of its own if given
  local sysctls=""
  [[ -n ${3:-} ]] && sysctls="  securityContext: {sysctls: [{name: ${3%%=*}, value: \"${3#*=}\"}]}"
  kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $2, namespace: $1}
spec:
$sysctls
  containers:
    - {name: server, image: $WORKLOAD_IMAGE, imagePullPolicy: Never, args: [server, --listen, ":7002"]}
EOF
}
nd_pod "$DNS" nd-0
nd_pod "$DNS" nd-1
nd_pod "$PLAIN_NS" nd-own net.ipv4.tcp_keepalive_time=45
kubectl wait -n "$DNS" pod/nd-0 pod/nd-1 --for=condition=Ready --timeout=60s >/dev/null || true
kubectl wait -n "$PLAIN_NS" pod/nd-own --for=condition=Ready --timeout=60s >/dev/null || true
kernel_values() { in_pod "$1" "$2" sh -c 'echo $(cat /proc/sys/net/ipv4/tcp_keepalive_time /proc/sys/net/ipv4/tcp_keepalive_intvl /proc/sys/net/ipv4/tcp_keepalive_probes)'; }
for p in nd-0 nd-1; do
  s="$(spec_sysctls "$DNS" "$p")"
  k="$(kernel_values "$DNS" "$p" || true)"
  [[ -z $s && $k == "240 30 4" ]] \
    && pass "pod $DNS/$p: no sysctls in its spec (Audit), kernel holds $k from the kubelet's defaultPodSysctls" \
    || fail "pod $DNS/$p: spec '$s', kernel '$k' (want none, 240 30 4)"
done
k="$(kernel_values "$PLAIN_NS" nd-own || true)"
[[ $(spec_sysctls "$PLAIN_NS" nd-own) == "net.ipv4.tcp_keepalive_time=45 " && $k == "45 30 4" ]] \
  && pass "pod-spec value wins over the node default: nd-own (time 45 in its spec) holds $k" \
  || fail "pod-spec value over the node default: nd-own holds '$k', want '45 30 4'"
nd_status() { kubectl get kap e2e-node-defaults -o jsonpath='{.status.matchedPods} {.status.conformantPods} {.status.liveVerifiedPods}|{.status.violations[*].reason}'; }
deadline=$((SECONDS + 90))
until [[ $(nd_status 2>/dev/null) == "2 2 2|" ]]; do
  ((SECONDS < deadline)) || break
  sleep 2
done
kubectl get kap e2e-node-defaults
kubectl get kap e2e-node-defaults -o jsonpath='{range .status.violations[*]}  violation: {.namespace}/{.name} {.reason}: {.message}{"\n"}{end}'
nd="$(nd_status)"
[[ $nd == "2 2 2|" ]] \
  && pass "Audit policy over kubelet defaults: matched 2, conformant 2, live-verified 2, no NotMutated" \
  || fail "Audit policy over kubelet defaults: matched conformant live|violations = '$nd', want '2 2 2|'"
kubectl delete namespace "$DNS" --wait=false >/dev/null
kubectl delete pod -n "$PLAIN_NS" nd-own --wait=false >/dev/null
kubectl delete keepalivepolicy e2e-node-defaults >/dev/null

# --- helm uninstall in admissionPolicy mode: the garbage collector removes what the operator created ----------------
# The operator's objects are owned by its ClusterRole; uninstalling deletes the ClusterRole (and the operator with
# it), and kube-controller-manager's garbage collector deletes the admission policy and binding. A policy nobody
# updates any more must not keep mutating pods.
stage="helm uninstall"
t=$SECONDS
helm upgrade keepalive "$root/charts/keepalive-operator" -n "$REL_NS" --reuse-values --set injection.mode=auto \
  --wait --timeout 180s >/dev/null
deadline=$((SECONDS + 60))
until kubectl get mutatingadmissionpolicybinding "$map_name" >/dev/null 2>&1; do
  ((SECONDS < deadline)) || break
  sleep 1
done
owner="$(kubectl get mutatingadmissionpolicy "$map_name" -o jsonpath='{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}' 2>/dev/null || true)"
helm uninstall keepalive -n "$REL_NS" --wait --timeout 120s >/dev/null
deadline=$((SECONDS + 90))
while kubectl get mutatingadmissionpolicy "$map_name" >/dev/null 2>&1 || kubectl get mutatingadmissionpolicybinding "$map_name" >/dev/null 2>&1; do
  ((SECONDS < deadline)) || break
  sleep 2
done
if [[ $owner == "ClusterRole/$fullname" ]] && ! kubectl get mutatingadmissionpolicy "$map_name" >/dev/null 2>&1 &&
  ! kubectl get mutatingadmissionpolicybinding "$map_name" >/dev/null 2>&1; then
  pass "helm uninstall (admissionPolicy mode): admission policy and binding, owned by ClusterRole/$fullname, garbage-collected ($((SECONDS - t)) s)"
else fail "helm uninstall: owner '$owner'; admission policy or binding $map_name still there"; fi

stage="done"
say "e2e took $((SECONDS - t_start)) s"
