#!/usr/bin/env bash
# A one- or two-node Slurm cluster with real accounting, for CI machines and local test runs.
#
#   bash .ci/slurm-cluster.sh up            install (apt) if needed, configure for this host, start, wait
#   SLURM_CI_NODES=2 bash .ci/slurm-cluster.sh up
#                                           the same with two compute nodes (see "Two nodes" below)
#   bash .ci/slurm-cluster.sh down          cancel jobs, stop every daemon by its pid file, remove the
#                                           two-node network (namespaces, veths, bridge, /etc/hosts lines)
#   bash .ci/slurm-cluster.sh status        sinfo + accounting check; exit 0 only if every node of the
#                                           partition can take jobs
#   bash .ci/slurm-cluster.sh release JOBID make a requeued job eligible to start now
#   bash .ci/slurm-cluster.sh kill-node N   (two nodes) SIGKILL every process of node N's namespace: its
#                                           slurmd, slurmstepd and job tasks, as if the host died
#   bash .ci/slurm-cluster.sh revive-node N (two nodes) start node N's slurmd again and resume the node
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
# Two nodes (SLURM_CI_NODES=2): slurmctld, slurmdbd, MariaDB and munged stay in this (the root)
# network namespace; each compute node's slurmd runs in a network namespace of its own
# (`ip netns` slurmci-n1, slurmci-n2) and a UTS namespace whose hostname is the node's name
# (ci-node1, ci-node2), so every process of a job step sees its own host name and address. Each
# namespace has one end of a veth pair (eth0 there, slurmci-h<N> here); the root ends are ports of
# the bridge slurmci0, which holds $SUBNET.1, the controller's address as the nodes see it.
# Node N is $SUBNET.(10+N). The node names are added to /etc/hosts between two marker lines (the
# file is shared by every namespace), so Slurm, submitit (MASTER_ADDR is the first node's name) and
# gloo resolve them anywhere. munged's socket is a file, reachable from every namespace. Each node
# declares all of this machine's CPUs (oversubscribed: a one-node 2-task job still fits on either).
# The script creates and removes only these namespaces, links, addresses and lines.
#
# Environment overrides: SLURM_CI_CLUSTER (cluster name, default "ci"),
# SLURM_CI_PARTITION (default "debug"), SLURM_CI_UP_TIMEOUT (seconds to wait for readiness, 90),
# SLURM_CI_CRED_EXPIRE (job credential lifetime = requeue hold, seconds, >= 5; default 30),
# SLURM_CI_NODES (compute nodes, 1 or 2; default 1), SLURM_CI_SUBNET (first three octets of the
# two-node network, default 10.77.77), SLURM_CI_NODE_PREFIX (node names, default "ci-node").
set -euo pipefail

CLUSTER=${SLURM_CI_CLUSTER:-ci}
PARTITION=${SLURM_CI_PARTITION:-debug}
UP_TIMEOUT=${SLURM_CI_UP_TIMEOUT:-90}
CRED_EXPIRE=${SLURM_CI_CRED_EXPIRE:-30}
NODES=${SLURM_CI_NODES:-1}
SUBNET=${SLURM_CI_SUBNET:-10.77.77}
NODE_PREFIX=${SLURM_CI_NODE_PREFIX:-ci-node}
[[ $NODES == 1 || $NODES == 2 ]] || { echo "SLURM_CI_NODES must be 1 or 2, not '$NODES'" >&2; exit 2; }
[[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || { echo "SLURM_CI_SUBNET must be three octets (a.b.c)" >&2; exit 2; }
# Every name the two-node mode creates (also what `down` removes, whatever mode is up).
MAX_NODES=2
BRIDGE=slurmci0
NETNS_PREFIX=slurmci-n
VETH_PREFIX=slurmci-h
HOSTS_BEGIN="# BEGIN slurm-ci nodes (.ci/slurm-cluster.sh)"
HOSTS_END="# END slurm-ci nodes (.ci/slurm-cluster.sh)"

CONF_DIR=/etc/slurm
SLURM_CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
# Two-node mode: per-node slurmd files (%n is the node name in slurm.conf).
NODE_SLURMD_PID=/run/slurmd-%n.pid
NODE_SLURMD_SPOOL=/var/spool/slurmd-%n
NODE_SLURMD_LOG=$LOG_DIR/slurmd-%n.log
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

    # One node: this host's slurmd on 127.0.0.1. Two nodes: one slurmd per network namespace; the
    # controller is reached on the bridge's address, and the slurmd files are per node (%n).
    local ctld_addr=127.0.0.1 slurmd_pid=$SLURMD_PID slurmd_spool=$SLURMD_SPOOL slurmd_log=$LOG_DIR/slurmd.log
    local node_lines partition_nodes i kind=single-node
    if ((NODES == 1)); then
        node_lines="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
        partition_nodes=$HOST
    else
        kind=$NODES-node
        ctld_addr=$SUBNET.1
        slurmd_pid=$NODE_SLURMD_PID slurmd_spool=$NODE_SLURMD_SPOOL slurmd_log=$NODE_SLURMD_LOG
        mem_mb=$((mem_mb / NODES))
        node_lines=""
        for ((i = 1; i <= NODES; i++)); do
            node_lines+="NodeName=$(node_name "$i") NodeHostname=$(node_name "$i") NodeAddr=$(node_addr "$i")"
            node_lines+=" CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"$'\n'
        done
        node_lines=${node_lines%$'\n'}
        partition_nodes="${NODE_PREFIX}[1-$NODES]"
    fi

    local conf
    conf=$(
        cat <<EOF
# Written by .ci/slurm-cluster.sh for host $HOST: $kind test cluster, no cgroups.
ClusterName=$CLUSTER
SlurmctldHost=$HOST($ctld_addr)
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
SlurmdSpoolDir=$slurmd_spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$slurmd_log
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
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
$node_lines
PartitionName=$PARTITION Nodes=$partition_nodes Default=YES MaxTime=INFINITE State=UP
EOF
    )
    if install_if_changed "$SLURM_CONF" "$conf" 644; then
        SLURM_CONF_CHANGED=1
        log "wrote $SLURM_CONF ($NODES node(s), CPUs=$cpus RealMemory=${mem_mb}MB each)"
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
# Two-node mode: node N is slurmd in network namespace slurmci-nN (UTS namespace with hostname
# ci-nodeN), reached over a veth pair whose root end is a port of the bridge slurmci0.
node_name() { echo "$NODE_PREFIX$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
node_netns() { echo "$NETNS_PREFIX$1"; }
node_pidfile() { local f=${NODE_SLURMD_PID//%n/$(node_name "$1")}; echo "$f"; }
netns_exists() { [[ -e /run/netns/$1 ]]; }
link_exists() { ip link show dev "$1" >/dev/null 2>&1; }

# The /etc/hosts file without our block (it may be a bind mount: rewrite it in place, never replace it).
hosts_without_block() {
    awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1; next} $0 == e {skip = 0; next} !skip' /etc/hosts
}

hosts_add() {
    local content i
    content=$(hosts_without_block)
    content+=$'\n'"$HOSTS_BEGIN"
    for ((i = 1; i <= NODES; i++)); do
        content+=$'\n'"$(node_addr "$i") $(node_name "$i")"
    done
    content+=$'\n'"$HOSTS_END"
    if [[ $content != "$(cat /etc/hosts)" ]]; then
        printf '%s\n' "$content" >/etc/hosts
        log "added the node names to /etc/hosts"
    fi
}

hosts_remove() {
    grep -qxF "$HOSTS_BEGIN" /etc/hosts 2>/dev/null || return 0
    local content
    content=$(hosts_without_block)
    printf '%s\n' "$content" >/etc/hosts
    log "removed the node names from /etc/hosts"
}

net_up() {
    command -v ip >/dev/null && command -v unshare >/dev/null && command -v nsenter >/dev/null ||
        die "two nodes need ip (iproute2), unshare and nsenter"
    # The subnet must be ours alone: refuse if an interface that is not our bridge already uses it.
    local other
    other=$(ip -o -4 addr show | awk -v p="$SUBNET." -v br="$BRIDGE" '$2 != br && index($4, p) == 1 {print $2}')
    [[ -z $other ]] || die "subnet $SUBNET.0/24 is already used by interface(s) $other: set SLURM_CI_SUBNET"
    if ! link_exists "$BRIDGE"; then
        ip link add "$BRIDGE" type bridge
        log "created bridge $BRIDGE"
    fi
    ip addr replace "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i ns veth
    for ((i = 1; i <= NODES; i++)); do
        ns=$(node_netns "$i") veth=$VETH_PREFIX$i
        if ! netns_exists "$ns"; then
            ip netns add "$ns"
            log "created network namespace $ns"
        fi
        if ! link_exists "$veth"; then
            ip netns exec "$ns" ip link del eth0 >/dev/null 2>&1 || true
            ip link add "$veth" type veth peer name eth0 netns "$ns"
            log "created veth $veth <-> $ns:eth0"
        fi
        ip link set "$veth" master "$BRIDGE"
        ip link set "$veth" up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip addr replace "$(node_addr "$i")/24" dev eth0
        ip netns exec "$ns" ip link set eth0 up
    done
    hosts_add
}

# Each node's namespace must reach slurmctld (on the bridge's address) by TCP.
check_nodes_reach_controller() {
    local i
    for ((i = 1; i <= NODES; i++)); do
        wait_for 10 "$(node_name "$i") -> $SUBNET.1:6817" ip netns exec "$(node_netns "$i")" \
            timeout 3 bash -c "exec 3<>/dev/tcp/$SUBNET.1/6817" ||
            die "node $(node_name "$i") cannot reach slurmctld at $SUBNET.1:6817 over $BRIDGE"
    done
}

# Removes whatever the two-node mode left, whichever mode is configured now.
net_down() {
    local i ns pids
    for ((i = 1; i <= MAX_NODES; i++)); do
        ns=$(node_netns "$i")
        netns_exists "$ns" || continue
        # Only job processes whose slurmd was stopped can be left here; they are this node's.
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        if [[ -n ${pids// /} ]]; then
            log "stopping processes left in $ns: $pids"
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
            sleep 2
            pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
            # shellcheck disable=SC2086
            [[ -z ${pids// /} ]] || kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$ns"
        log "removed network namespace $ns"
    done
    for ((i = 1; i <= MAX_NODES; i++)); do
        link_exists "$VETH_PREFIX$i" && ip link del "$VETH_PREFIX$i" && log "removed veth $VETH_PREFIX$i"
    done
    if link_exists "$BRIDGE"; then
        ip link del "$BRIDGE"
        log "removed bridge $BRIDGE"
    fi
    hosts_remove
}

# Starts node N's slurmd in its namespaces: the network namespace, and a new UTS namespace whose
# hostname is the node's name (slurmd finds its NodeName from it; job steps inherit both).
start_node_slurmd() {
    local i=$1 name pidfile
    name=$(node_name "$i")
    pidfile=$(node_pidfile "$i")
    if pid_alive "$pidfile" slurmd; then
        log "slurmd of $name already running"
        return 0
    fi
    rm -f "$pidfile"
    mkdir -p "${NODE_SLURMD_SPOOL//%n/$name}"
    nsenter --net="/run/netns/$(node_netns "$i")" -- unshare --uts -- \
        /bin/sh -c 'hostname "$1" && exec /usr/sbin/slurmd' sh "$name"
    log "started slurmd of $name ($(node_addr "$i"), namespace $(node_netns "$i"))"
}

stop_node_slurmds() {
    local i
    for ((i = 1; i <= MAX_NODES; i++)); do
        stop_by_pidfile "$(node_pidfile "$i")" slurmd
    done
}

# The nodes the configuration defines: this host, or ci-node1..N.
configured_nodes() {
    local i
    if ((NODES == 1)); then
        echo "$HOST"
    else
        for ((i = 1; i <= NODES; i++)); do node_name "$i"; done
    fi
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
        stop_node_slurmds
        pid_alive "$CTLD_PID" slurmctld && stop_by_pidfile "$CTLD_PID" slurmctld
    fi
    if ((NODES == 1)); then
        # Switching back from two nodes: their slurmds and network go.
        stop_node_slurmds
        net_down
    else
        pid_alive "$SLURMD_PID" slurmd && stop_by_pidfile "$SLURMD_PID" slurmd
        net_up
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
    if ((NODES > 1)); then
        check_nodes_reach_controller
        local i
        for ((i = 1; i <= NODES; i++)); do start_node_slurmd "$i"; done
    elif pid_alive "$SLURMD_PID" slurmd; then
        log "slurmd already running"
    else
        rm -f "$SLURMD_PID"
        /usr/sbin/slurmd
        log "started slurmd"
    fi
}

node_state() { sinfo -h -n "${1:-$HOST}" -o '%T' 2>/dev/null | head -n 1; }
node_usable() { [[ $(node_state "${1:-$HOST}") =~ ^(idle|mixed|allocated|completing)$ ]]; }
node_slurmd_alive() { # node
    if [[ $1 == "$HOST" ]]; then pid_alive "$SLURMD_PID" slurmd; else pid_alive "${NODE_SLURMD_PID//%n/$1}" slurmd; fi
}
node_slurmd_log() { # node
    if [[ $1 == "$HOST" ]]; then echo "$LOG_DIR/slurmd.log"; else echo "${NODE_SLURMD_LOG//%n/$1}"; fi
}
# slurmctld has registered with slurmdbd once the cluster row has a control host.
accounting_ok() {
    sacct -n -X -S now-1minutes >/dev/null 2>&1 &&
        [[ -n $(sacctmgr -n -P show cluster "$CLUSTER" format=ControlHost 2>/dev/null) ]]
}

wait_ready() {
    local started deadline state node all_usable
    local -A resumed=()
    started=$(date +%s)
    deadline=$((started + UP_TIMEOUT))
    while :; do
        all_usable=1
        for node in $(configured_nodes); do
            state=$(node_state "$node")
            if [[ $state =~ ^(down|drain|drained|draining|fail)[*~#$@+^-]*$ ]] && [[ -z ${resumed[$node]:-} ]]; then
                # A node left down/drained by an earlier run (e.g. killed slurmd) is ours to resume.
                scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
                resumed[$node]=1
                log "node $node was '$state': resumed it"
            fi
            node_usable "$node" || all_usable=0
            if (($(date +%s) - started >= 5)) && ! node_slurmd_alive "$node"; then
                tail -n 15 "$(node_slurmd_log "$node")" >&2 || true
                die "slurmd of $node is not running"
            fi
        done
        if ((all_usable)) && accounting_ok; then
            return 0
        fi
        if (($(date +%s) >= deadline)); then
            sinfo -N -l >&2 || true
            tail -n 15 "$LOG_DIR/slurmctld.log" >&2 || true
            for node in $(configured_nodes); do tail -n 15 "$(node_slurmd_log "$node")" >&2 || true; done
            die "cluster not ready after ${UP_TIMEOUT}s (node states: $(sinfo -h -N -o '%N=%T' 2>/dev/null | tr '\n' ' '))"
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
    local cpus mem node
    for node in $(configured_nodes); do
        cpus=$(sinfo -h -n "$node" -o '%c')
        mem=$(sinfo -h -n "$node" -o '%m')
        if ((NODES == 1)); then
            echo "slurm-cluster: UP cluster=$CLUSTER node=$HOST state=$(node_state) cpus=$cpus mem=${mem}MB" \
                "partition=$PARTITION accounting=ok in $(($(date +%s) - T0))s"
        else
            echo "slurm-cluster: UP cluster=$CLUSTER node=$node addr=$(getent hosts "$node" | awk '{print $1}')" \
                "state=$(node_state "$node") cpus=$cpus mem=${mem}MB partition=$PARTITION accounting=ok" \
                "in $(($(date +%s) - T0))s"
        fi
    done
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
    stop_node_slurmds
    net_down
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
    if ((ok == 0)); then
        # Every node of the partition (this host, or ci-node1 and ci-node2) must take jobs.
        local nodes node
        nodes=$(sinfo -h -N -p "$PARTITION" -o '%N' 2>/dev/null | sort -u)
        [[ -n $nodes ]] || { echo "partition $PARTITION: no nodes"; ok=1; }
        for node in $nodes; do
            if node_usable "$node"; then
                echo "node $node: usable (state '$(node_state "$node")'$(node_where "$node"))"
            else
                echo "node $node: not usable (state '$(node_state "$node")')"
                ok=1
            fi
        done
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

# Where a two-node mode node lives (its address and namespace); nothing for this host.
node_where() {
    local i
    for ((i = 1; i <= MAX_NODES; i++)); do
        if [[ $1 == "$(node_name "$i")" ]]; then
            echo ", address $(getent hosts "$1" | awk '{print $1}'), namespace $(node_netns "$i")"
        fi
    done
}

node_index() { # N -> checked N of a two-node mode node
    local i=${1:?usage: slurm-cluster.sh kill-node|revive-node N}
    [[ $i =~ ^[1-9]$ ]] && ((i <= MAX_NODES)) && netns_exists "$(node_netns "$i")" ||
        die "node $i: no such node (is the two-node cluster up?)"
    echo "$i"
}

# Simulates a dead host: every process in node N's network namespace (its slurmd, slurmstepd and
# job tasks) gets SIGKILL. The namespace itself stays, so `revive-node N` can start it again.
cmd_kill_node() {
    local i pids
    i=$(node_index "${1:-}")
    pids=$(ip netns pids "$(node_netns "$i")" | tr '\n' ' ')
    # shellcheck disable=SC2086
    [[ -z ${pids// /} ]] || kill -KILL $pids 2>/dev/null || true
    rm -f "$(node_pidfile "$i")"
    echo "killed node $(node_name "$i"): pids ${pids:-none}"
}

cmd_revive_node() {
    local i name
    i=$(node_index "${1:-}")
    name=$(node_name "$i")
    NODES=$MAX_NODES start_node_slurmd "$i"
    wait_for 30 "slurmd of $name" node_slurmd_alive "$name" || die "slurmd of $name did not start"
    scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
    wait_for 60 "$name usable" node_usable "$name" || die "node $name not usable: $(node_state "$name")"
    echo "revived node $name ($(node_state "$name"))"
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
release) shift; cmd_release "$@" ;;
kill-node) shift; cmd_kill_node "$@" ;;
revive-node) shift; cmd_revive_node "$@" ;;
*)
    echo "usage: $0 {up|down|status|release JOBID|kill-node N|revive-node N}" >&2
    exit 2
    ;;
esac
