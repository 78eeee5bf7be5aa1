#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, so the SLURM profile can be tested against a
# real slurmctld/slurmd instead of a mock.
#
#   scripts/slurm-local.sh start    install (Debian: slurm-wlm, munge) if missing, configure, start
#   scripts/slurm-local.sh status   exit 0 when the node accepts jobs
#   scripts/slurm-local.sh stop     stop the daemons this script started
#
# Needs root (apt-get, munged and slurmd run as root). One node on 127.0.0.1 with the machine's
# CPUs and memory and one fake GPU (a GRES backed by /dev/null), so rules that ask for a GPU
# schedule here as they would on a GPU partition. No slurmdbd: accounting is off, so sacct has nothing to
# report and jobs must be followed with squeue (the test profile says so).
#
# It refuses to touch a slurm.conf it did not write: on a real cluster, use the real one.
set -euo pipefail

STATE=${SSLPIPE_SLURM_STATE:-/var/lib/sslpipe-slurm}
CONF_DIR=/etc/slurm            # where Debian's binaries look for slurm.conf
MARK="# Written by sslpipe scripts/slurm-local.sh; safe to delete."
NODE=$(hostname -s)
START_TIMEOUT=${SSLPIPE_SLURM_TIMEOUT:-60}

die() { echo "slurm-local: $*" >&2; exit 1; }
say() { echo "slurm-local: $*"; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts munged/slurmd); try: sudo $0 $*"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm is not installed and apt-get is missing: install slurmctld, slurmd, the slurm client tools and munge by hand"
    say "installing slurm-wlm and munge with apt-get (under a minute)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed: is the Debian mirror reachable?"
    # Keep package scripts from starting the daemons with the stock config: this script starts
    # them itself, with its own.
    local policy=/usr/sbin/policy-rc.d had_policy=0
    [ -e "$policy" ] && had_policy=1
    [ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; }
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >"$STATE/apt.log" 2>&1 \
        || { [ "$had_policy" = 1 ] || rm -f "$policy"; tail -20 "$STATE/apt.log" >&2; die "apt-get install slurm-wlm munge failed (log: $STATE/apt.log)"; }
    [ "$had_policy" = 1 ] || rm -f "$policy"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n </dev/null >/dev/null 2>&1; then return; fi  # a munged already answers
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chmod 400 /etc/munge/munge.key
    fi
    # --force: run as root without the munge user's directory ownership (containers, CI).
    # Its warnings about directory ownership are expected here; shown only if it fails.
    munged --force --pid-file="$STATE/munged.pid" 2>"$STATE/munged.err" \
        || { cat "$STATE/munged.err" >&2; die "munged did not start; see /var/log/munge/munged.log"; }
    touch "$STATE/started-munged"
    for _ in $(seq 20); do munge -n </dev/null >/dev/null 2>&1 && return; sleep 0.25; done
    die "munged started but does not answer; see /var/log/munge/munged.log"
}

# The node line from what slurmd sees on this machine (CPUs, sockets, cores, threads), so slurmd
# does not drain the node for a mismatch. RealMemory is lowered by 5%: a node claiming more
# memory than it has is marked invalid.
node_line() {
    local hw mem
    hw=$(slurmd -C 2>/dev/null | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//' || true)
    [ -n "$hw" ] || hw="CPUs=$(nproc)"
    mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
    echo "NodeName=$NODE NodeAddr=127.0.0.1 $hw RealMemory=$mem Gres=gpu:1 State=UNKNOWN"
}

refuse_foreign_config() {
    local f
    for f in slurm.conf gres.conf; do
        if [ -e "$CONF_DIR/$f" ] && ! grep -qF "$MARK" "$CONF_DIR/$f"; then
            die "$CONF_DIR/$f exists and was not written by this script: this looks like a real SLURM installation; use it directly (see README, 'Running on a SLURM cluster')"
        fi
    done
}

write_config() {
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d"
    local f
    cat >"$CONF_DIR/slurm.conf.new" <<EOF
$MARK
ClusterName=sslpipe
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No cgroups in containers: track processes by parent id, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
# No slurmdbd: squeue is the status command. Finished jobs stay visible to it this long.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=300
# Every finished job's final state and TRES, one line each, kept however long squeue keeps it:
# what tests/test_slurm.py reads (squeue forgets jobs after MinJobAge).
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
# Without slurmdbd the job-completion record holds no GRES; the prolog records, per job, the
# GPUs SLURM allocated (SLURM_JOB_GPUS), so a test can check a GPU request reached the node.
Prolog=$STATE/prolog.sh
PrologFlags=Alloc
GresTypes=gpu
$(node_line)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    printf '#!/bin/sh\necho "JobId=$SLURM_JOB_ID JobGpus=${SLURM_JOB_GPUS:-}" >> %s/prolog.log\n' "$STATE" >"$STATE/prolog.sh"
    chmod 755 "$STATE/prolog.sh"
    # One fake GPU so --gpus=1 jobs schedule on a CPU-only node. slurmd counts GPUs by their
    # device files (a count-only gpu reads as 0 and the node is marked invalid); /dev/null
    # always exists, and without task/cgroup nothing is bound to it.
    printf '%s\nAutoDetect=off\nNodeName=%s Name=gpu File=/dev/null\n' "$MARK" "$NODE" >"$CONF_DIR/gres.conf.new"
    local changed=0
    for f in slurm.conf gres.conf; do
        cmp -s "$CONF_DIR/$f.new" "$CONF_DIR/$f" || changed=1
        mv "$CONF_DIR/$f.new" "$CONF_DIR/$f"
    done
    # Daemons still running with an older config (e.g. another node size) start afresh.
    if [ $changed = 1 ]; then
        stop_daemon slurmd "$STATE/slurmd.pid"
        stop_daemon slurmctld "$STATE/slurmctld.pid"
    fi
}

node_state() { sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -1 || true; }

wait_for_node() {
    local state="" deadline=$((SECONDS + START_TIMEOUT)) resumed=0
    while [ $SECONDS -lt $deadline ]; do
        state=$(node_state)
        case "$state" in
            idle|mix|alloc|comp) say "node $NODE is $state; cluster ready (sinfo below)"; sinfo; return ;;
            down*|drain*|drng*|inval*)
                # A node left down by an earlier run comes back by hand.
                if [ $resumed = 0 ]; then scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true; resumed=1; fi ;;
        esac
        sleep 1
    done
    echo "--- sinfo -N -l" >&2; sinfo -N -l >&2 || true
    echo "--- slurmctld.log" >&2; tail -20 "$STATE/slurmctld.log" >&2 || true
    echo "--- slurmd.log" >&2; tail -20 "$STATE/slurmd.log" >&2 || true
    die "node $NODE not up after ${START_TIMEOUT}s (state '${state:-unknown}'); logs above and in $STATE"
}

start() {
    need_root start
    refuse_foreign_config
    mkdir -p "$STATE"
    install_packages
    start_munge
    write_config
    if ! pid_alive "$STATE/slurmctld.pid"; then
        slurmctld || die "slurmctld did not start; see $STATE/slurmctld.log"
    fi
    if ! pid_alive "$STATE/slurmd.pid"; then
        slurmd -N "$NODE" || die "slurmd did not start; see $STATE/slurmd.log"
    fi
    wait_for_node
}

stop_daemon() {  # by the pid file its own start wrote, never by name
    local name=$1 pidfile=$2
    pid_alive "$pidfile" || return 0
    local pid; pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || { say "stopped $name ($pid)"; return; }; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    say "killed $name ($pid)"
}

stop() {
    need_root stop
    # Cancel leftover jobs first so slurmd does not leave orphans behind.
    if command -v scancel >/dev/null && pid_alive "$STATE/slurmctld.pid"; then scancel --full --quiet -u root 2>/dev/null || true; fi
    stop_daemon slurmd "$STATE/slurmd.pid"
    stop_daemon slurmctld "$STATE/slurmctld.pid"
    if [ -e "$STATE/started-munged" ]; then
        stop_daemon munged "$STATE/munged.pid"
        rm -f "$STATE/started-munged"
    fi
    # Remove the config too: with a slurm.conf naming a controller that is gone, every SLURM
    # client (and so snakemake's slurm plugin, which runs `scontrol show config` when it loads)
    # waits ~10 s for an answer. `start` writes it again.
    local f
    for f in slurm.conf gres.conf; do
        if [ -e "$CONF_DIR/$f" ] && grep -qF "$MARK" "$CONF_DIR/$f"; then rm -f "$CONF_DIR/$f"; fi
    done
}

status() {
    command -v sinfo >/dev/null || { say "SLURM is not installed"; exit 1; }
    local state; state=$(node_state)
    case "$state" in
        idle|mix|alloc|comp) sinfo; exit 0 ;;
        *) say "node $NODE not up (state '${state:-no answer from slurmctld}')"; exit 1 ;;
    esac
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
