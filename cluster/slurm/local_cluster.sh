#!/usr/bin/env bash
# A throwaway single-machine SLURM 22.05 cluster on loopback (slurmctld + N slurmd + munge), for
# tests and for trying the batch scripts without a real cluster. Debian packages.
#   local_cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge (root)
#   local_cluster.sh start     # write slurm.conf, start munged, slurmctld, slurmd; wait until idle
#   local_cluster.sh stop      # stop what start started (by PID)
# Env: LOCAL_SLURM_DIR (default /tmp/coupling_dist_slurm), LOCAL_SLURM_NODES (default 1),
#      LOCAL_SLURM_CPUS (per node, default: nproc), LOCAL_SLURM_PORT (default 17817).
# Clients need: export SLURM_CONF=$LOCAL_SLURM_DIR/slurm.conf
set -euo pipefail
D=${LOCAL_SLURM_DIR:-/tmp/coupling_dist_slurm}
N=${LOCAL_SLURM_NODES:-1}
CPUS=${LOCAL_SLURM_CPUS:-$(nproc)}
P=${LOCAL_SLURM_PORT:-17817}
export SLURM_CONF=$D/slurm.conf

nodes() { if [ "$N" -eq 1 ]; then echo localhost; else seq -f 'n%g' 1 "$N"; fi; }

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return 0
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  # Loopback only: NoInAddrAny + an explicit srun port range; no systemd, no cgroups.
  cat > "$SLURM_CONF" <<CONF
ClusterName=coupling
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$P
SlurmdPort=$((P+1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SrunPortRange=$((P+100))-$((P+199))
MailProg=/bin/true
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
Waittime=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
CONF
  local i=0 n
  for n in $(nodes); do
    i=$((i+1)); mkdir -p "$D/spool/$n"
    if [ "$N" -eq 1 ]; then
      echo "NodeName=$n NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4000 State=UNKNOWN" >> "$SLURM_CONF"
    else
      echo "NodeName=$n NodeAddr=127.0.0.1 NodeHostname=localhost Port=$((P+10+i)) CPUs=$CPUS RealMemory=4000 State=UNKNOWN" >> "$SLURM_CONF"
    fi
  done
  echo "PartitionName=debug Nodes=$(nodes | paste -sd,) Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >> "$SLURM_CONF"
}

start() {
  stop 2>/dev/null || true
  rm -rf "$D"; mkdir -p "$D"/{state,spool,log,run,munge/private}
  write_conf
  chmod 755 "$D/munge"; chmod 700 "$D/munge/private"
  dd if=/dev/urandom of="$D/munge/private/munge.key" bs=1024 count=1 status=none
  chmod 400 "$D/munge/private/munge.key"
  munged -F --socket="$D/munge/munge.socket" --key-file="$D/munge/private/munge.key" \
    --log-file="$D/munge/private/munged.log" --pid-file="$D/munge/munged.pid" \
    --seed-file="$D/munge/private/munged.seed" > "$D/log/munged.out" 2>&1 &
  echo $! > "$D/run/munged.bgpid"
  for _ in $(seq 100); do [ -S "$D/munge/munge.socket" ] && break; sleep 0.05; done
  slurmctld -D -c -f "$SLURM_CONF" > "$D/log/slurmctld.out" 2>&1 &
  echo $! > "$D/run/slurmctld.bgpid"
  for n in $(nodes); do
    slurmd -D -N "$n" -f "$SLURM_CONF" > "$D/log/slurmd-$n.out" 2>&1 &
    echo $! > "$D/run/slurmd-$n.bgpid"
  done
  for _ in $(seq 150); do
    [ "$(sinfo -h -N -o %T 2>/dev/null | grep -c '^idle')" = "$N" ] && { echo "SLURM_CONF=$SLURM_CONF"; return 0; }
    sleep 0.2
  done
  echo "local SLURM did not become idle; logs in $D/log" >&2; return 1
}

stop() {
  local p pids=""
  if [ -f "$D/run/slurmctld.bgpid" ] && kill -0 "$(cat "$D/run/slurmctld.bgpid")" 2>/dev/null; then
    timeout 5 scancel --quiet --user="$(id -u)" 2>/dev/null || true
    for _ in $(seq 100); do timeout 2 squeue -h -t R,CG,S -o %i 2>/dev/null | grep -q . || break; sleep 0.1; done
  fi
  for f in "$D"/run/slurmd-*.bgpid "$D/run/slurmctld.bgpid" "$D/run/munged.bgpid"; do
    [ -f "$f" ] && pids="$pids $(cat "$f")"
  done
  [ -n "$pids" ] && kill $pids 2>/dev/null || true
  for p in $pids; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  rm -f "$D"/run/*.bgpid
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
