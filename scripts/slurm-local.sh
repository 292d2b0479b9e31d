#!/usr/bin/env bash
# slurm-local.sh - a REAL single-node SLURM cluster on localhost, for tests and CI.
#
#   bash scripts/slurm-local.sh start    # install (if missing), configure, start; idempotent
#   bash scripts/slurm-local.sh status   # daemons, sinfo, sacct check; exit 0 only if usable
#   bash scripts/slurm-local.sh stop     # stop the daemons (by recorded PID)
#   bash scripts/slurm-local.sh stop --purge   # ... and delete all state (jobs, accounting DB)
#
# `start` installs Debian's SLURM (slurm-wlm, slurmdbd, munge, mariadb-server) when
# missing, writes a minimal config, starts munged, MariaDB, slurmdbd, slurmctld and
# slurmd as plain background daemons (no systemd), links /etc/slurm/slurm.conf and
# waits until `sinfo` shows the node idle and `sacct` answers. Re-running only starts
# what is not running; a config change restarts the affected daemons. Needs root.
#
# The test suite (tests/test_slurm.py, `pytest -m slurm`) needs this cluster; it is
# skipped when `sinfo` does not work. Nothing here is used on a real cluster.
#
# Knobs (environment):
#   SLURM_LOCAL_ROOT       state/config/log dir        (default /tmp/local-slurm)
#   SLURM_LOCAL_CPUS       CPUs to advertise; > real count oversubscribes (default: real, at least 4)
#   SLURM_LOCAL_PARTITION  partition name                (default debug)
#   SLURM_LOCAL_DB_PORT    MariaDB TCP port on 127.0.0.1 (default 3307)
#   SLURM_LOCAL_KILLWAIT   seconds between SIGTERM and SIGKILL at a time limit (default 5)
#   SLURM_LOCAL_GPUS       fake GPUs to advertise as GRES gpu (no device behind them), so
#                          jobs asking for `gpu: 1` (--gpus=1) get scheduled (default 1; 0 = none)
set -euo pipefail

ROOT=${SLURM_LOCAL_ROOT:-/tmp/local-slurm}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
KILLWAIT=${SLURM_LOCAL_KILLWAIT:-5}
GPUS=${SLURM_LOCAL_GPUS:-1}
CLUSTER=localcluster
NODE=localhost
MUNGE_SOCK=$ROOT/munge/munge.socket.2
DB_SOCK=$ROOT/run/mysqld.sock
DB_PASS=slurmci   # local-only, bound to 127.0.0.1
PKGS="slurm-wlm slurmctld slurmd slurm-client slurmdbd munge mariadb-server"

log() { printf '[slurm-local %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "ERROR: $*"; exit 1; }
T0=$(date +%s%N)
elapsed() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '%d.%03ds' $((ms / 1000)) $((ms % 1000)); }

# alive PIDFILE COMM: true if the pid in PIDFILE runs and its comm matches COMM
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -d "/proc/$pid" ] && grep -qx "$2" "/proc/$pid/comm" 2>/dev/null
}
# kill_pidfile PIDFILE COMM: SIGTERM the recorded pid (only if its comm matches), wait, SIGKILL
kill_pidfile() {
  local pidf=$1 comm=$2 pid
  if alive "$pidf" "$comm"; then
    pid=$(cat "$pidf"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.5; fi
    log "stopped $comm ($pid)"
  fi
  rm -f "$pidf"
}
wait_for() { # wait_for SECONDS DESCRIPTION CMD...
  local t=$1 what=$2; shift 2
  local end=$(( $(date +%s) + t ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "timed out after ${t}s waiting for $what"
    sleep 0.2
  done
}
# daemons in start order: NAME PIDFILE COMM
daemons() {
  cat <<EOF
munged $ROOT/munge/munged.pid munged
mariadbd $ROOT/run/mysqld.pid mariadbd
slurmdbd $ROOT/run/slurmdbd.pid slurmdbd
slurmctld $ROOT/run/slurmctld.pid slurmctld
slurmd $ROOT/run/slurmd.pid slurmd
EOF
}
node_ready() {
  local st
  st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null) || return 1
  case "$st" in
    idle|mixed|allocated|completing) return 0 ;;
    *drain*|down*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null; return 1 ;;
    *) return 1 ;;
  esac
}
sacct_ok() { sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1; }

# ======================================================================== start
cmd_start() {
  [ "$(id -u)" = 0 ] || die "must run as root"

  # ---------------------------------------------------------------- packages
  local missing="" p
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    log "installing:$missing"
    # keep package postinst scripts from starting daemons on default paths
    local tmp_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; tmp_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    [ "$tmp_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    log "packages installed ($(elapsed))"
  fi
  log "slurm $(dpkg-query -W -f='${Version}' slurmctld), munge $(dpkg-query -W -f='${Version}' munge)"

  # ------------------------------------------------------------- directories
  mkdir -p "$ROOT"/{etc,run,log,spool/ctld,spool/d,munge}
  chmod 755 "$ROOT" "$ROOT/munge"        # munged: socket dir must be o+x
  mkdir -p /etc/slurm

  # --------------------------------------------------------------- munge key
  if [ ! -s "$ROOT/munge/munge.key" ]; then
    if [ -s /etc/munge/munge.key ]; then cp /etc/munge/munge.key "$ROOT/munge/munge.key"
    else dd if=/dev/urandom of="$ROOT/munge/munge.key" bs=1024 count=1 status=none; fi
  fi
  chown root:root "$ROOT/munge/munge.key"; chmod 400 "$ROOT/munge/munge.key"

  # ------------------------------------------------------------------ config
  # real hardware numbers; a RealMemory above the real one would drain the node
  local hw_cpus hw_sock hw_cores hw_threads hw_mem mem cpus node_hw slurmd_params
  read -r hw_cpus hw_sock hw_cores hw_threads hw_mem < <(slurmd -C | awk '
    /^NodeName/ { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                  print v["CPUs"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"] }')
  mem=$(( hw_mem * 90 / 100 ))
  # default: at least 4 slots, so a sleeping test job does not hold back the others on a 2-core runner
  cpus=${SLURM_LOCAL_CPUS:-$(( hw_cpus > 4 ? hw_cpus : 4 ))}
  if [ "$cpus" -gt "$hw_cpus" ]; then
    # advertise more CPUs than exist (lets N single-core jobs run at once on a small runner)
    node_hw="CPUs=$cpus"; slurmd_params="SlurmdParameters=config_overrides"
  else
    node_hw="CPUs=$hw_cpus Boards=1 SocketsPerBoard=$hw_sock CoresPerSocket=$hw_cores ThreadsPerCore=$hw_threads"
    slurmd_params="#SlurmdParameters="
  fi
  local gres_types="#GresTypes=" node_gres=""
  if [ "$GPUS" -gt 0 ]; then
    # slurmd counts GPUs from their device files; plain files stand in for them here
    mkdir -p "$ROOT/dev"
    for i in $(seq 0 $((GPUS - 1))); do touch "$ROOT/dev/fakegpu$i"; done
    gres_types="GresTypes=gpu
AccountingStorageTRES=gres/gpu"; node_gres="Gres=gpu:$GPUS"
    printf '# generated by scripts/slurm-local.sh: fake GPUs (plain files, no devices)\nNodeName=%s Name=gpu File=%s/dev/fakegpu[0-%s]\n' \
      "$NODE" "$ROOT" "$((GPUS - 1))" > "$ROOT/etc/gres.conf.new"
  else
    printf '# generated by scripts/slurm-local.sh: no GPUs\n' > "$ROOT/etc/gres.conf.new"
  fi

  cat > "$ROOT/etc/slurm.conf.new" <<EOF
# generated by scripts/slurm-local.sh (diffbias) - local test cluster only
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$ROOT/spool/ctld
SlurmdSpoolDir=$ROOT/spool/d
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
$gres_types
# a job hitting its time limit ends as TIMEOUT at once (no grace minutes) and is
# SIGKILLed ${KILLWAIT}s after SIGTERM; slurmctld checks limits about every 30 s
OverTimeLimit=0
KillWait=$KILLWAIT
$slurmd_params
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
# for the slurmdbd connection the munge socket is given here, not via AuthInfo
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# keep the executor plugin's --comment (rule name + wildcards) in sacct's Comment field
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 $node_hw RealMemory=$mem $node_gres State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

  cat > "$ROOT/etc/slurmdbd.conf.new" <<EOF
# generated by scripts/slurm-local.sh (diffbias) - local test cluster only
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$ROOT/log/slurmdbd.log
PidFile=$ROOT/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

  # install_conf NAME: replace NAME only if its content changed; returns 0 if changed
  install_conf() {
    if cmp -s "$ROOT/etc/$1.new" "$ROOT/etc/$1"; then rm -f "$ROOT/etc/$1.new"; return 1; fi
    mv "$ROOT/etc/$1.new" "$ROOT/etc/$1"
  }
  local changed=0 dbd_changed=0 f
  install_conf slurm.conf && changed=1
  install_conf gres.conf && changed=1
  install_conf slurmdbd.conf && dbd_changed=1
  chmod 644 "$ROOT/etc/slurm.conf" "$ROOT/etc/gres.conf"; chmod 600 "$ROOT/etc/slurmdbd.conf"   # slurmdbd insists on 600

  # The config must be at the compiled-in path: snakemake's jobstep executor strips
  # every SLURM_* variable (SLURM_CONF too) before its nested `srun`.
  for f in slurm.conf slurmdbd.conf gres.conf; do
    if [ -e "/etc/slurm/$f" ] && [ ! -L "/etc/slurm/$f" ]; then
      mv "/etc/slurm/$f" "/etc/slurm/$f.orig-$(date +%s)"
    fi
    ln -sfn "$ROOT/etc/$f" "/etc/slurm/$f"
  done
  unset SLURM_CONF

  # ------------------------------------------------------------------ munged
  if ! alive "$ROOT/munge/munged.pid" munged; then
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    munged --key-file="$ROOT/munge/munge.key" --socket="$MUNGE_SOCK" \
           --pid-file="$ROOT/munge/munged.pid" --log-file="$ROOT/log/munged.log" \
           --seed-file="$ROOT/munge/munged.seed" </dev/null
    log "munged started ($(elapsed))"
  fi
  munge -S "$MUNGE_SOCK" -n | unmunge -S "$MUNGE_SOCK" >/dev/null || die "munge self-test failed"

  # ---------------------------------------------------- MariaDB + slurmdbd
  if [ ! -d "$ROOT/mysql/mysql" ]; then
    mkdir -p "$ROOT/mysql"
    mariadb-install-db --no-defaults --user=root --datadir="$ROOT/mysql" \
      --auth-root-authentication-method=socket --skip-test-db >"$ROOT/log/mariadb-install.log" 2>&1
  fi
  if ! alive "$ROOT/run/mysqld.pid" mariadbd; then
    setsid mariadbd --no-defaults --user=root --datadir="$ROOT/mysql" --socket="$DB_SOCK" \
      --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
      --pid-file="$ROOT/run/mysqld.pid" --log-error="$ROOT/log/mysqld.log" \
      --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 &
    wait_for 60 "MariaDB (see $ROOT/log/mysqld.log)" mariadb-admin --no-defaults --socket="$DB_SOCK" -u root ping
    log "mariadbd started ($(elapsed))"
  fi
  mariadb --no-defaults --socket="$DB_SOCK" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
  if [ "$dbd_changed" = 1 ] && alive "$ROOT/run/slurmdbd.pid" slurmdbd; then
    log "slurmdbd.conf changed: restarting slurmdbd"
    kill_pidfile "$ROOT/run/slurmdbd.pid" slurmdbd
  fi
  if ! alive "$ROOT/run/slurmdbd.pid" slurmdbd; then
    slurmdbd </dev/null
    log "slurmdbd started ($(elapsed))"
  fi
  wait_for 60 "slurmdbd (see $ROOT/log/slurmdbd.log)" sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi

  # ------------------------------------------------------ slurmctld + slurmd
  if [ "$changed" = 1 ]; then
    for d in slurmd slurmctld; do
      if alive "$ROOT/run/$d.pid" "$d"; then
        log "slurm.conf changed: restarting $d"
        kill_pidfile "$ROOT/run/$d.pid" "$d"
      fi
    done
  fi
  if ! alive "$ROOT/run/slurmctld.pid" slurmctld; then
    slurmctld </dev/null
    log "slurmctld started ($(elapsed))"
  fi
  wait_for 30 "slurmctld (see $ROOT/log/slurmctld.log)" scontrol ping
  if ! alive "$ROOT/run/slurmd.pid" slurmd; then
    slurmd -N "$NODE" </dev/null
    log "slurmd started ($(elapsed))"
  fi

  # ------------------------------------------------------- node idle, sacct
  wait_for 60 "node $NODE to become idle (see $ROOT/log/slurmd.log)" node_ready
  wait_for 60 "sacct to answer (see $ROOT/log/slurmdbd.log)" sacct_ok
  sinfo
  log "cluster ready in $(elapsed); config /etc/slurm/slurm.conf -> $ROOT/etc/slurm.conf"
}

# ========================================================================= stop
cmd_stop() {
  local name pidf comm
  # reverse start order
  while read -r name pidf comm; do
    kill_pidfile "$pidf" "$comm"
  done < <(daemons | tac)
  if [ "${1:-}" = "--purge" ]; then
    rm -rf "$ROOT"
    for f in slurm.conf slurmdbd.conf gres.conf; do
      if [ -L "/etc/slurm/$f" ] && [ "$(readlink "/etc/slurm/$f")" = "$ROOT/etc/$f" ]; then
        rm -f "/etc/slurm/$f"
      fi
    done
    log "purged $ROOT"
  fi
}

# ======================================================================= status
cmd_status() {
  local name pidf comm ok=0
  while read -r name pidf comm; do
    if alive "$pidf" "$comm"; then echo "$name: running (pid $(cat "$pidf"))"
    else echo "$name: not running"; ok=1; fi
  done < <(daemons)
  if command -v sinfo >/dev/null && sinfo >/dev/null 2>&1; then
    sinfo
    if sacct_ok; then echo "sacct: ok"; else echo "sacct: NOT working"; ok=1; fi
  else
    echo "sinfo: not working (cluster not started? run: bash scripts/slurm-local.sh start)"; ok=1
  fi
  return $ok
}

case "${1:-}" in
  start)  shift; cmd_start "$@" ;;
  stop)   shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  *) echo "usage: $0 {start|stop [--purge]|status}" >&2; exit 2 ;;
esac
