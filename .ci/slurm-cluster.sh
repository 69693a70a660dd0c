#!/usr/bin/env bash
# A single-node Slurm cluster with real accounting, for CI machines and local test runs.
#
#   bash .ci/slurm-cluster.sh up            install (apt) if needed, configure for this host, start, wait
#   bash .ci/slurm-cluster.sh down          cancel jobs, stop every daemon by its pid file
#   bash .ci/slurm-cluster.sh status        sinfo + accounting check; exit 0 only if jobs can run
#   bash .ci/slurm-cluster.sh release JOBID make a requeued job eligible to start now
#
# Needs root, Debian/Ubuntu (apt) and no systemd: every daemon is started by hand and tracked by
# its pid file. Daemons: munged, mariadbd (local socket only, no TCP), slurmdbd, slurmctld, slurmd.
# Accounting (slurmdbd + MariaDB) is what makes `sacct`, and so submitit's `job.state`, report
# COMPLETED / FAILED instead of UNKNOWN.
#
# No cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, jobacct_gather/linux (/proc).
#
# Requeue and preemption: JobRequeue=1, so batch jobs may be requeued (`scontrol requeue`, which is
# what a submitit Checkpointable job runs after `job._interrupt()`). Slurm does not start a
# requeued job at once: it pends with reason "BeginTime" for AuthInfo=cred_expire seconds (Slurm's
# default 120; this cluster sets 30, see SLURM_CI_CRED_EXPIRE). Before that, the job stays
# COMPLETING for up to KillWait (10 s) because submitit's tasks ignore SIGTERM and are only
# killed by SIGKILL. `release JOBID` runs `scontrol update JobId=JOBID StartTime=now`, which makes
# a requeued job eligible at once; tests that exercise preemption can call it instead of waiting.
#
# Environment overrides: SLURM_CI_CLUSTER (cluster name, default "ci"),
# SLURM_CI_PARTITION (default "debug"), SLURM_CI_UP_TIMEOUT (seconds to wait for readiness, 90),
# SLURM_CI_CRED_EXPIRE (job credential lifetime = requeue hold, seconds, >= 5; default 30).
set -euo pipefail

CLUSTER=${SLURM_CI_CLUSTER:-ci}
PARTITION=${SLURM_CI_PARTITION:-debug}
UP_TIMEOUT=${SLURM_CI_UP_TIMEOUT:-90}
CRED_EXPIRE=${SLURM_CI_CRED_EXPIRE:-30}

CONF_DIR=/etc/slurm
SLURM_CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
DBD_PID=/run/slurmdbd.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_KEY=/etc/munge/munge.key
DB_DATADIR=/var/lib/mysql
DB_RUNDIR=/run/mysqld
DB_SOCKET=$DB_RUNDIR/mysqld.sock
DB_PID=$DB_RUNDIR/mysqld.pid
DB_LOG=$LOG_DIR/mariadb.log
DB_NAME=slurm_acct_db
DB_USER=slurm

PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

T0=$(date +%s)
log() { printf '[slurm-cluster +%ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { printf '[slurm-cluster] ERROR: %s\n' "$*" >&2; exit 1; }

HOST=$(hostname -s)

# ---------------------------------------------------------------------------------------------
# Process helpers: a pid file counts only if its process is alive and has the expected name, so a
# stale file whose pid was reused by something else is never signalled.
pid_alive() { # pidfile name
    local pidfile=$1 name=$2 pid comm
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$name" ]]
}

stop_by_pidfile() { # pidfile name [seconds]
    local pidfile=$1 name=$2 wait_s=${3:-20} pid i
    if ! pid_alive "$pidfile" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(tr -dc '0-9' <"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait_s * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for ${wait_s}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
    log "stopped $name (pid $pid)"
}

wait_for() { # seconds description command...
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$(($(date +%s) + secs))
    until "$@" >/dev/null 2>&1; do
        (($(date +%s) < deadline)) || { log "gave up waiting for $what after ${secs}s"; return 1; }
        sleep 0.5
    done
}

# Like wait_for, but gives up early when the daemon has died (after a short grace period in
# which it may not have written its pid file yet).
wait_daemon() { # seconds pidfile name command...
    local secs=$1 pidfile=$2 name=$3 start now
    shift 3
    start=$(date +%s)
    until "$@" >/dev/null 2>&1; do
        now=$(date +%s)
        if ((now - start >= 3)) && ! pid_alive "$pidfile" "$name"; then
            log "$name is not running"
            return 1
        fi
        ((now - start < secs)) || { log "gave up waiting for $name after ${secs}s"; return 1; }
        sleep 0.5
    done
}

# ---------------------------------------------------------------------------------------------
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && { log "packages already installed"; return 0; }
    command -v apt-get >/dev/null || die "apt-get not found and packages missing: ${missing[*]}"
    log "installing ${missing[*]} (apt-get)"
    # Keep package scripts from starting daemons (no init system here; we start them ourselves).
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local apt_opts=(-y -qq --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    local rc=0
    if ! DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${missing[@]}" >/tmp/slurm-cluster-apt.log 2>&1; then
        # Empty or stale package lists: refresh once and retry.
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >>/tmp/slurm-cluster-apt.log 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${missing[@]}" >>/tmp/slurm-cluster-apt.log 2>&1 || rc=$?
    fi
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
    if ((rc != 0)); then
        tail -n 30 /tmp/slurm-cluster-apt.log >&2
        die "apt-get install failed (full log: /tmp/slurm-cluster-apt.log)"
    fi
    log "packages installed"
}

# Writes $2 to file $1 with mode $3 when the content differs; returns 0 if it changed.
install_if_changed() {
    local dest=$1 content=$2 mode=$3 tmp
    tmp=$(mktemp "${dest}.XXXXXX")
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$dest"
    return 0
}

SLURM_CONF_CHANGED=0
DBD_CONF_CHANGED=0

write_configs() {
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    local cpus mem_mb
    cpus=$(nproc)
    # Declare a little less memory than the kernel reports so slurmd never finds "low RealMemory".
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)

    local conf
    conf=$(
        cat <<EOF
# Written by .ci/slurm-cluster.sh for host $HOST: single-node test cluster, no cgroups.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Job credential lifetime; also how long a requeued job pends (BeginTime) before it may restart.
AuthInfo=cred_expire=$CRED_EXPIRE
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Test-sized scheduling loops: a job whose begin time passed starts within seconds, not a minute.
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Trust the declared CPUs/memory even if hardware detection inside a VM/container disagrees.
SlurmdParameters=config_overrides
# Accounting through slurmdbd (MariaDB) so sacct reports real job states.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
# Short timeouts: this is a test cluster.
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    )
    if install_if_changed "$SLURM_CONF" "$conf" 644; then
        SLURM_CONF_CHANGED=1
        log "wrote $SLURM_CONF (CPUs=$cpus RealMemory=${mem_mb}MB)"
    fi

    # The database password is generated once and kept in slurmdbd.conf (mode 600).
    local pass=""
    [[ -f $DBD_CONF ]] && pass=$(sed -n 's/^StoragePass=//p' "$DBD_CONF")
    [[ -n $pass ]] || pass=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    DB_PASS=$pass
    local dbd
    dbd=$(
        cat <<EOF
# Written by .ci/slurm-cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$DBD_PID
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$pass
EOF
    )
    if install_if_changed "$DBD_CONF" "$dbd" 600; then
        DBD_CONF_CHANGED=1
        log "wrote $DBD_CONF"
    fi
    chown root:root "$DBD_CONF"
}

# ---------------------------------------------------------------------------------------------
start_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
        log "created $MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY" /etc/munge
    chmod 400 "$MUNGE_KEY"
    chmod 700 /etc/munge
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    if pid_alive "$MUNGE_PID" munged; then
        log "munged already running"
    else
        rm -f "$MUNGE_PID"
        runuser -u munge -- /usr/sbin/munged
        log "started munged"
    fi
    wait_for 15 munge bash -c 'munge -n | unmunge' || die "munge does not work (see /var/log/munge/munged.log)"
}

db_ping() { mariadb-admin --socket="$DB_SOCKET" -uroot ping; }

start_mariadb() {
    mkdir -p "$DB_RUNDIR" "$LOG_DIR"
    chown mysql:mysql "$DB_RUNDIR"
    if [[ ! -d $DB_DATADIR/mysql ]]; then
        log "initialising MariaDB datadir $DB_DATADIR"
        mkdir -p "$DB_DATADIR"
        chown mysql:mysql "$DB_DATADIR"
        mariadb-install-db --user=mysql --datadir="$DB_DATADIR" --auth-root-authentication-method=socket \
            --skip-test-db >"$LOG_DIR/mariadb-install.log" 2>&1 ||
            { tail -n 20 "$LOG_DIR/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    if pid_alive "$DB_PID" mariadbd; then
        log "mariadbd already running"
    else
        rm -f "$DB_PID"
        # No TCP: slurmdbd reaches "localhost" through the Unix socket.
        setsid /usr/sbin/mariadbd --user=mysql --datadir="$DB_DATADIR" --socket="$DB_SOCKET" \
            --pid-file="$DB_PID" --skip-networking --innodb-lock-wait-timeout=900 \
            --log-error="$DB_LOG" </dev/null >>"$DB_LOG" 2>&1 &
        log "started mariadbd"
    fi
    wait_daemon 60 "$DB_PID" mariadbd db_ping || { tail -n 20 "$DB_LOG" >&2; die "MariaDB is not answering (log: $DB_LOG)"; }
    mariadb --socket="$DB_SOCKET" -uroot <<SQL
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
}

cluster_registered() { sacctmgr -n -P show cluster format=Cluster | grep -qx "$CLUSTER"; }

start_slurmdbd() {
    if pid_alive "$DBD_PID" slurmdbd && ((DBD_CONF_CHANGED)); then
        stop_by_pidfile "$DBD_PID" slurmdbd
    fi
    if pid_alive "$DBD_PID" slurmdbd; then
        log "slurmdbd already running"
    else
        rm -f "$DBD_PID"
        /usr/sbin/slurmdbd
        log "started slurmdbd"
    fi
    wait_daemon 60 "$DBD_PID" slurmdbd sacctmgr -n show cluster ||
        { tail -n 20 "$LOG_DIR/slurmdbd.log" >&2; die "slurmdbd does not answer (sacctmgr show cluster)"; }
    if cluster_registered; then
        log "cluster '$CLUSTER' already registered in accounting"
    else
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
        log "registered cluster '$CLUSTER' in accounting"
    fi
}

start_slurm() {
    if ((SLURM_CONF_CHANGED)); then
        # A changed node/partition definition needs a restart, not just `scontrol reconfigure`.
        pid_alive "$SLURMD_PID" slurmd && stop_by_pidfile "$SLURMD_PID" slurmd
        pid_alive "$CTLD_PID" slurmctld && stop_by_pidfile "$CTLD_PID" slurmctld
    fi
    if pid_alive "$CTLD_PID" slurmctld; then
        log "slurmctld already running"
    else
        rm -f "$CTLD_PID"
        /usr/sbin/slurmctld
        log "started slurmctld"
    fi
    wait_daemon 30 "$CTLD_PID" slurmctld scontrol ping ||
        { tail -n 20 "$LOG_DIR/slurmctld.log" >&2; die "slurmctld does not answer (scontrol ping)"; }
    if pid_alive "$SLURMD_PID" slurmd; then
        log "slurmd already running"
    else
        rm -f "$SLURMD_PID"
        /usr/sbin/slurmd
        log "started slurmd"
    fi
}

node_state() { sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -n 1; }
node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
# slurmctld has registered with slurmdbd once the cluster row has a control host.
accounting_ok() {
    sacct -n -X -S now-1minutes >/dev/null 2>&1 &&
        [[ -n $(sacctmgr -n -P show cluster "$CLUSTER" format=ControlHost 2>/dev/null) ]]
}

wait_ready() {
    local started deadline state resumed=0
    started=$(date +%s)
    deadline=$((started + UP_TIMEOUT))
    while :; do
        state=$(node_state)
        if [[ $state =~ ^(down|drain|drained|draining|fail)[*~#$@+^-]*$ ]] && ((!resumed)); then
            # A node left down/drained by an earlier run (e.g. killed slurmd) is ours to resume.
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
            resumed=1
            log "node was '$state': resumed it"
        fi
        if node_usable && accounting_ok; then
            return 0
        fi
        if (($(date +%s) - started >= 5)) && ! pid_alive "$SLURMD_PID" slurmd; then
            tail -n 15 "$LOG_DIR/slurmd.log" >&2 || true
            die "slurmd is not running"
        fi
        if (($(date +%s) >= deadline)); then
            sinfo -N -l >&2 || true
            tail -n 15 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
            die "cluster not ready after ${UP_TIMEOUT}s (node state '${state:-?}')"
        fi
        sleep 0.5
    done
}

cmd_up() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurm
    wait_ready
    local cpus mem
    cpus=$(sinfo -h -n "$HOST" -o '%c')
    mem=$(sinfo -h -n "$HOST" -o '%m')
    echo "slurm-cluster: UP cluster=$CLUSTER node=$HOST state=$(node_state) cpus=$cpus mem=${mem}MB" \
        "partition=$PARTITION accounting=ok in $(($(date +%s) - T0))s"
}

cmd_down() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    local ids i
    if pid_alive "$CTLD_PID" slurmctld; then
        ids=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)
        if [[ -n ${ids// /} ]]; then
            log "cancelling jobs: $ids"
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            # Let slurmd kill the job steps while it is still running.
            for ((i = 0; i < 300; i++)); do
                [[ -z $(squeue -h -o '%A' 2>/dev/null) ]] && break
                sleep 0.1
            done
        fi
    fi
    stop_by_pidfile "$SLURMD_PID" slurmd
    stop_by_pidfile "$CTLD_PID" slurmctld
    stop_by_pidfile "$DBD_PID" slurmdbd
    stop_by_pidfile "$DB_PID" mariadbd 60
    stop_by_pidfile "$MUNGE_PID" munged
    # Report (never kill by name) anything of the cluster's that is still alive.
    local left
    left=$(ps -eo pid=,comm= | awk '$2 ~ /^(slurmctld|slurmd|slurmdbd|slurmstepd|munged|mariadbd|mysqld)$/' || true)
    if [[ -n $left ]]; then
        printf '%s\n' "$left" >&2
        die "processes left behind (listed above)"
    fi
    echo "slurm-cluster: DOWN in $(($(date +%s) - T0))s"
}

cmd_status() {
    local ok=0
    if ! command -v sinfo >/dev/null; then
        echo "slurm-cluster: sinfo not installed"
        return 1
    fi
    if scontrol ping >/dev/null 2>&1; then
        sinfo || true
    else
        echo "slurmctld: not responding"
        ok=1
    fi
    if ((ok == 0)) && ! node_usable; then
        echo "node $HOST: not usable (state '$(node_state)')"
        ok=1
    fi
    if accounting_ok; then
        echo "accounting: ok (sacct works, cluster '$CLUSTER' registered)"
    else
        echo "accounting: NOT working"
        ok=1
    fi
    return $ok
}

cmd_release() {
    local job=${1:?usage: slurm-cluster.sh release JOBID}
    scontrol update JobId="$job" StartTime=now
    echo "released job $job (StartTime=now)"
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
release) shift; cmd_release "$@" ;;
*)
    echo "usage: $0 {up|down|status|release JOBID}" >&2
    exit 2
    ;;
esac
