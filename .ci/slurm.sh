#!/usr/bin/env bash
# A one-node Slurm on this machine, for the `slurm` tests (pytest -m slurm) and for
# trying `python -m chainer_vfbn.table run --executor slurm` before a real cluster.
#
#   sudo .ci/slurm.sh start    install slurm-wlm and munge when missing (apt-get),
#                              write /etc/slurm/slurm.conf (this host, its CPUs, one
#                              partition "debug"), start munged, slurmctld and slurmd,
#                              wait until sinfo shows the node idle
#   sudo .ci/slurm.sh stop     stop the daemons this script started (by the process
#                              ids it recorded in $STATE/pids)
#   .ci/slurm.sh status        whether they run
#
# Needs root (the packages, /etc/slurm, jobs run as root). No cgroups, no accounting
# database (sacct does not work; squeue does). A requeued job waits AuthInfo's
# cred_expire seconds before it may start again (Slurm's default 120; 10 here, so the
# requeue test is quick). Logs: $STATE/*.log. Exits non-zero with the reason when the
# cluster cannot start.
set -euo pipefail
STATE=${SLURM_CI_STATE:-/var/lib/chainer-vfbn-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by chainer-vfbn .ci/slurm.sh"
HOST=$(hostname -s)

die() { echo ".ci/slurm.sh: $*" >&2; exit 1; }

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

running_pids() {
  [ -f "$STATE/pids" ] || return 0
  while read -r name pid; do alive "$pid" && echo "$name $pid"; done < "$STATE/pids"
  return 0
}

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
  echo "== installing slurm-wlm and munge (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) \
    > "$STATE/apt.log" 2>&1 || die "apt-get install slurm-wlm munge failed (see $STATE/apt.log)"
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; move it away first"
  fi
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd
  cat > "$CONF" <<EOF
$MARK: a one-node cluster for the tests
ClusterName=vfbnci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after 10 s (default 120)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=30
MinJobAge=300
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  setsid munged --foreground --force > "$STATE/munged.log" 2>&1 &
  echo "munged $!" >> "$STATE/pids"
}

start() {
  [ "$(id -u)" = 0 ] || die "start needs root (packages, /etc/slurm, daemons)"
  mkdir -p "$STATE"
  if [ -n "$(running_pids)" ]; then
    echo "== already running: $(running_pids | tr '\n' ' ')"
    return 0
  fi
  install
  write_conf
  : > "$STATE/pids"
  start_munge
  for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
  [ -S /run/munge/munge.socket.2 ] || { stop_daemons; die "munged did not start: $(tail -n 3 "$STATE/munged.log")"; }
  # -c: forget the jobs of an earlier start; -D: stay in the foreground (we keep the pid)
  setsid slurmctld -D -c -f "$CONF" > "$STATE/slurmctld.out" 2>&1 &
  echo "slurmctld $!" >> "$STATE/pids"
  setsid slurmd -D -f "$CONF" > "$STATE/slurmd.out" 2>&1 &
  echo "slurmd $!" >> "$STATE/pids"
  local state=""
  for _ in $(seq 60); do
    state=$(sinfo -h -o %t 2>/dev/null | head -n 1 || true)
    [ "$state" = idle ] && break
    sleep 0.5
  done
  if [ "$state" != idle ]; then
    local why
    why=$(tail -n 2 "$STATE/slurmctld.log" "$STATE/slurmd.log" 2>/dev/null | tr '\n' ' ')
    stop_daemons
    die "the node did not become idle within 30 s (sinfo: '${state:-no answer}'); logs: $why"
  fi
  echo "== one-node Slurm up: $(sinfo -h -o '%P %D %c CPUs %t' | head -n 1) ($(sinfo -V))"
}

stop_daemons() {
  [ -f "$STATE/pids" ] || return 0
  # slurmd, slurmctld, then munged: the reverse of their start
  tac "$STATE/pids" | while read -r name pid; do
    if alive "$pid"; then
      kill "$pid"
      for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
      alive "$pid" && kill -9 "$pid"
      echo "== stopped $name ($pid)"
    fi
  done
  rm -f "$STATE/pids"
}

case "${1:-}" in
  start) start ;;
  stop) stop_daemons ;;
  status)
    if [ -n "$(running_pids)" ]; then running_pids; sinfo; else echo "not running"; exit 1; fi ;;
  *) echo "usage: .ci/slurm.sh start|stop|status" >&2; exit 2 ;;
esac
