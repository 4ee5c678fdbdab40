#!/usr/bin/env bash
# A real single-node Slurm (22.05, Debian 12) for tests and CI: platform.md §2.1.
#
#   slurm/local_cluster.sh up      install the packages if missing, write slurm.conf, start munged, slurmctld, slurmd
#   slurm/local_cluster.sh down    stop them by pidfile (jobs are cancelled first); leaves no daemon running
#   slurm/local_cluster.sh status  daemons, sinfo, queue; exit 0 only when the node is up and accepting jobs
#   slurm/local_cluster.sh diagnose  node, partition, queue, config and daemon log tails (why a job pends)
#
# Needs root, a writable /run and fork/exec; no systemd, cgroups or slurmdbd. Idempotent: `up` on a running cluster
# and `down` on a stopped one do nothing. Env: SLURM_LOCAL_WIPE=1 makes `down` also wipe the controller state (job ids
# restart from 1 on the next `up`: run dirs and ports derived from job ids repeat, so it is off by default).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
RUN_SLURM=/run/slurm
CTLD_PID=$RUN_SLURM/slurmctld.pid
SLURMD_PID=$RUN_SLURM/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
STATE=/var/lib/slurm/slurmctld
MARK="# ctrlgen local_cluster.sh"

log() { echo "local_cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pid_alive() {  # pidfile -> 0 when the process named in it is alive
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

host_cpus() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }  # nproc obeys OMP_NUM_THREADS

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (daemons, /etc/slurm, /run)"; }

install_packages() {
  local missing=()
  for p in slurmctld slurmd slurm-client munge; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get (Debian/Ubuntu only)"
  log "installing ${missing[*]} (apt)"
  apt-get update -qq >/dev/null
  # policy-rc.d denies the service starts in containers: expected, we start the daemons ourselves
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
    >/dev/null 2>&1 || die "apt-get install slurmctld slurmd slurm-client munge failed"
}

write_conf() {
  local node cpus mem
  node=$(hostname -s)
  if ! getent hosts "$node" >/dev/null; then
    log "hostname $node does not resolve: adding it to /etc/hosts"
    echo "127.0.0.1 $node" >>/etc/hosts
  fi
  mem=$(awk '/MemTotal/ {print int($2/1024*0.9)}' /proc/meminfo)
  # the node as slurmd itself detects it (CPUs, boards/sockets/cores/threads): a line that disagrees with what slurmd
  # registers is fatal to slurmctld or leaves jobs pending; CPUs are allocated one logical CPU each (CR_CPU).
  # Not plain `nproc`: it obeys OMP_NUM_THREADS, and the test suite runs with OMP_NUM_THREADS=1 (CPUs=1: a 2-task job
  # then pends forever with reason PartitionConfig)
  local hw layout
  hw=$(slurmd -C 2>/dev/null | head -n 1 || true)
  cpus=$(grep -oE '\bCPUs=[0-9]+' <<<"$hw" | cut -d= -f2 || true)
  [[ -n $cpus ]] || cpus=$(host_cpus)
  layout=$(grep -oE '(Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' <<<"$hw" | tr '\n' ' ' || true)
  local tmp
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$MARK (platform.md §2.1): single node, no cgroups, no accounting
ClusterName=ci
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=${STATE}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# tests: a requeued/cancelled job's leftovers are killed 5 s after SIGTERM (default 30 s)
KillWait=5
# all traffic on loopback: the hostname may resolve to an address the daemons cannot reach each other on
NodeName=${node} NodeAddr=127.0.0.1 NodeHostname=${node} CPUs=${cpus} ${layout}RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if [[ -f $CONF ]] && ! grep -q "^$MARK" "$CONF"; then
    cp "$CONF" "$CONF.ctrlgen-backup"
    log "existing $CONF saved as $CONF.ctrlgen-backup"
  fi
  if ! cmp -s "$tmp" "$CONF"; then
    install -m 0644 "$tmp" "$CONF"
    if pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; then  # config changed under a running daemon: restart
      log "slurm.conf changed: restarting slurmctld/slurmd"    # both (a slurmd on the old file registers wrong)
      stop_daemon slurmd "$SLURMD_PID"
      stop_daemon slurmctld "$CTLD_PID"
    fi
  fi
  rm -f "$tmp"
}

wait_gone() {  # pid timeout_s
  local pid=$1 n=$(($2 * 10))
  while kill -0 "$pid" 2>/dev/null && ((n-- > 0)); do sleep 0.1; done
  ! kill -0 "$pid" 2>/dev/null
}

stop_daemon() {  # name pidfile
  local name=$1 pidfile=$2 pid
  [[ -s $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 10; then
      log "$name ($pid) ignored SIGTERM: SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
      wait_gone "$pid" 5 || die "$name ($pid) survives SIGKILL"
    fi
  fi
  rm -f "$pidfile"
}

diagnose() {  # what a pending or refused job needs to be understood, on stderr
  {
    echo "== nproc: $(host_cpus); slurmd -C: $(slurmd -C 2>&1 | head -n 1)"
    echo "== $CONF"; grep -v '^#' "$CONF" || true
    echo "== scontrol show node"; scontrol show node 2>&1 || true
    echo "== scontrol show partition"; scontrol show partition 2>&1 || true
    echo "== squeue"; squeue -o '%i %T %r %C %D %l' 2>&1 || true
    echo "== slurmctld.log"; tail -n 30 /var/log/slurm/slurmctld.log 2>&1 || true
    echo "== slurmd.log"; tail -n 30 /var/log/slurm/slurmd.log 2>&1 || true
  } >&2
}

smoke() {  # one two-task job step on the node: the shape the slurm tier's jobs ask for
  local n
  n=$(( $(host_cpus) >= 2 ? 2 : 1 ))
  if ! timeout 90 srun --nodes=1 --ntasks="$n" --cpus-per-task=1 --time=1 --immediate=60 --job-name=ct-smoke true \
       >/dev/null 2>&1; then
    diagnose
    die "a ${n}-task srun step did not run within 60 s on the fresh cluster (diagnostics above)"
  fi
}

node_ready() { sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc|comp)'; }

up() {
  need_root
  install_packages
  mkdir -p /run/munge "$RUN_SLURM" /var/lib/slurm/slurmd "$STATE" /var/log/slurm
  chown munge: /run/munge
  chown slurm: "$RUN_SLURM" "$STATE" /var/log/slurm
  write_conf
  if ! pid_alive "$MUNGE_PID"; then
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key missing (reinstall munge)"
    runuser -u munge -- /usr/sbin/munged
  fi
  local n=50
  until munge -n 2>/dev/null | unmunge >/dev/null 2>&1; do
    ((n-- > 0)) || die "munged does not answer (munge -n | unmunge)"
    sleep 0.1
  done
  pid_alive "$CTLD_PID" || /usr/sbin/slurmctld
  pid_alive "$SLURMD_PID" || /usr/sbin/slurmd
  n=150
  until node_ready; do
    ((n-- > 0)) || { sinfo >&2 || true; tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
                     die "node not idle after 15 s"; }
    # a node left DOWN/DRAINED by an earlier unclean stop: return it to service
    if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(down|drain|drng|fail|inval)'; then
      scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.1
  done
  smoke
  log "up: $(sinfo -h -o '%P %a %t %N' | head -n 1)"
}

down() {
  need_root
  if pid_alive "$CTLD_PID" && command -v squeue >/dev/null; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      log "cancelling jobs: $(echo $jobs)"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      local n=100  # KillWait=5: steps get SIGTERM, then SIGKILL
      while [[ -n $(squeue -h -o %i 2>/dev/null) ]] && ((n-- > 0)); do sleep 0.1; done
    fi
  fi
  # both Slurm daemons at once (each takes ~2 s to exit), munged last (they authenticate through it until then)
  stop_daemon slurmd "$SLURMD_PID" &
  stop_daemon slurmctld "$CTLD_PID" &
  wait
  for f in "$SLURMD_PID" "$CTLD_PID"; do ! pid_alive "$f" || die "a Slurm daemon survived: $(cat "$f")"; done
  stop_daemon munged "$MUNGE_PID"
  if [[ ${SLURM_LOCAL_WIPE:-0} == 1 ]]; then
    rm -rf "${STATE:?}"/* /var/lib/slurm/slurmd/*
    log "controller state wiped (job ids restart)"
  fi
  log "down"
}

status() {
  local rc=0 name pidfile
  for name in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
    pidfile=${name#*:}
    if pid_alive "$pidfile"; then
      echo "${name%%:*}: running (pid $(cat "$pidfile"))"
    else
      echo "${name%%:*}: stopped"; rc=1
    fi
  done
  if ((rc == 0)); then
    sinfo || rc=1
    squeue || true
    node_ready || rc=1
  fi
  return $rc
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  diagnose) diagnose ;;
  *) echo "usage: $0 up|down|status|diagnose" >&2; exit 2 ;;
esac
