#!/usr/bin/env bash
# A throwaway Slurm cluster on this host, for sandpool's Slurm tests and benchmarks:
# one slurmctld and three slurmd node daemons (n1 n2 n3) on loopback, with two fake GPUs on n3,
# and a munged of its own. Everything (config, state, logs, pid files, munge key and socket) lives
# under $SANDPOOL_SLURM_DIR (default /tmp/sandpool-slurm); /etc/slurm and the system's munged are
# never touched. Daemons are stopped by the PIDs in their pid files, never by name.
#
#   scripts/slurm-cluster.sh start        install (apt) if missing, write the config, start; prints SLURM_CONF=...
#   scripts/slurm-cluster.sh stop         stop every daemon of this cluster (SIGTERM, then SIGKILL)
#   scripts/slurm-cluster.sh status       exit 0 if the cluster answers, and show its nodes
#   scripts/slurm-cluster.sh env          print the SLURM_CONF line to eval
#   scripts/slurm-cluster.sh kill-node N  power-cut node N: SIGKILL its slurmd, its job steps and their processes
#   scripts/slurm-cluster.sh start-node N start node N's slurmd again (it returns to service)
#
# Start needs root (the daemons run as root, munged as user munge). Exit status: 0 on success,
# 1 on failure with the reason on stderr; "start" on a machine without apt or root fails cleanly.
set -euo pipefail

DIR=${SANDPOOL_SLURM_DIR:-/tmp/sandpool-slurm}
PORT=${SANDPOOL_SLURM_PORT:-16817}      # slurmctld; nodes use PORT+1..PORT+3
NODES=(n1 n2 n3)
CONF=$DIR/slurm.conf

die() { echo "slurm-cluster: $*" >&2; exit 1; }

pid_of() {  # the live pid recorded in pid file $1, or nothing
    local pid
    [ -s "$1" ] || return 0
    pid=$(tr -dc 0-9 < "$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
    return 0
}

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
        || die "apt-get install slurmctld slurmd slurm-client munge failed"
}

write_config() {
    local host
    host=$(hostname -s)
    mkdir -p "$DIR"/{state,log,run,dev} "$DIR"/spool/{n1,n2,n3}
    chmod 755 "$DIR"
    for i in 0 1; do  # fake GPUs: character devices like /dev/null
        [ -e "$DIR/dev/gpu$i" ] || mknod "$DIR/dev/gpu$i" c 1 3
    done
    cat > "$CONF" <<EOF
# written by sandpool's scripts/slurm-cluster.sh; throwaway test cluster, loopback only
ClusterName=sandpool
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
AuthType=auth/munge
AuthInfo=socket=$DIR/munge-run/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=10
KillWait=5
MinJobAge=60
SchedulerParameters=batch_sched_delay=0
GresTypes=gpu
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=4 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=4 RealMemory=4000 State=UNKNOWN
NodeName=n3 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 3)) CPUs=4 RealMemory=4000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=n[1-3] Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$DIR/gres.conf" <<EOF
AutoDetect=off
NodeName=n3 Name=gpu File=$DIR/dev/gpu[0-1]
EOF
}

start_munge() {
    # the key is private to munge ($DIR/munge, 0700); the socket sits in its own reachable directory
    [ -n "$(pid_of "$DIR/munge-run/munged.pid")" ] && return 0
    mkdir -p "$DIR/munge" "$DIR/munge-run"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge:munge "$DIR/munge" "$DIR/munge-run"
    chmod 700 "$DIR/munge"
    chmod 755 "$DIR/munge-run"
    chmod 400 "$DIR/munge/munge.key"
    runuser -u munge -- munged --socket="$DIR/munge-run/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge-run/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" || die "munged did not start (see $DIR/munge/munged.log)"
}

start_node() {
    local n=$1
    [ -n "$(pid_of "$DIR/run/slurmd-$n.pid")" ] && return 0
    SLURM_CONF=$CONF slurmd -N "$n" -f "$CONF" || die "slurmd $n did not start (see $DIR/log/slurmd-$n.log)"
}

wait_ready() {  # until every node is idle (or mixed/allocated), up to 20 s
    local i states
    for i in $(seq 1 100); do
        states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null || true)
        if [ "$(echo "$states" | grep -cE ' (idle|mix|alloc)$')" = 3 ]; then
            return 0
        fi
        sleep 0.2
    done
    die "the nodes did not become ready: $states (see $DIR/log)"
}

start() {
    [ "$(id -u)" = 0 ] || die "starting the cluster needs root (its daemons run as root)"
    install
    write_config
    start_munge
    if [ -z "$(pid_of "$DIR/run/slurmctld.pid")" ]; then
        SLURM_CONF=$CONF slurmctld -i -f "$CONF" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
    fi
    for n in "${NODES[@]}"; do start_node "$n"; done
    wait_ready
    echo "SLURM_CONF=$CONF"
}

stop_pid_files() {  # SIGTERM the pids in files "$@" together, wait up to 10 s, then SIGKILL what is left
    local f pid i left pids=()
    for f in "$@"; do
        pid=$(pid_of "$f")
        [ -n "$pid" ] && pids+=("$pid") && kill -TERM "$pid" 2>/dev/null
    done
    for i in $(seq 1 100); do
        left=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        [ "${#left[@]}" = 0 ] && break
        sleep 0.1
    done
    for pid in "${left[@]}"; do
        echo "slurm-cluster: pid $pid ignored SIGTERM for 10 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$@"
}

node_pids() {  # node $1's job processes (they carry its name) and its job steps (asks slurmctld)
    local n=$1 job
    grep -lzx "SLURMD_NODENAME=$n" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true
    for job in $(SLURM_CONF=$CONF squeue -h -w "$n" -o %i 2>/dev/null || true); do
        pgrep -f "^slurmstepd: \[$job\." || true
    done
}

our_stepds() {  # slurmstepd processes of this cluster (their slurmd passed them our SLURM_CONF)
    local pid
    for pid in $(pgrep -f '^slurmstepd: \[' || true); do
        grep -qzx "SLURM_CONF=$CONF" "/proc/$pid/environ" 2>/dev/null && echo "$pid"
    done
    return 0
}

kill_node() {
    local n=$1 pid
    [ -f "$CONF" ] || die "no cluster config at $CONF"
    pid=$(pid_of "$DIR/run/slurmd-$n.pid")
    [ -n "$pid" ] && kill -KILL "$pid"
    for pid in $(node_pids "$n" | sort -u); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$DIR/run/slurmd-$n.pid"
}

stop() {
    local i pid
    [ -f "$CONF" ] || return 0
    if [ -n "$(pid_of "$DIR/run/slurmctld.pid")" ]; then  # jobs first, so that no step outlives its node
        SLURM_CONF=$CONF scancel --quiet --partition=debug 2>/dev/null || true
        for i in $(seq 1 50); do
            [ -z "$(SLURM_CONF=$CONF squeue -h 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    stop_pid_files "$DIR/run/slurmctld.pid" "$DIR"/run/slurmd-n[1-3].pid
    stop_pid_files "$DIR/munge-run/munged.pid"
    for pid in $(our_stepds); do kill -KILL "$pid" 2>/dev/null || true; done  # steps of a lost node
}

status() {
    [ -f "$CONF" ] || die "not started (no $CONF)"
    SLURM_CONF=$CONF sinfo -N -o '%N %t %c %m %G' || die "the cluster does not answer"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "SLURM_CONF=$CONF" ;;
    kill-node) kill_node "${2:?which node}" ;;
    start-node) start_node "${2:?which node}" ;;
    *) echo "usage: $0 start|stop|status|env|kill-node N|start-node N" >&2; exit 2 ;;
esac
