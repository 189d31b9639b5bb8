#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing the workflow's Slurm profile for real
# (tests/test_slurm.py, .ci/run). Not for production clusters: it writes /etc/slurm/slurm.conf.
#
#   scripts/slurm-local.sh up [--gpus N]   install (apt) if needed, configure, start; waits until idle
#   scripts/slurm-local.sh status          exit 0 iff the controller answers and the node is usable
#   scripts/slurm-local.sh down            stop slurmctld and slurmd (munged keeps running)
#
# Needs root and Debian's packages (munge, slurmctld, slurmd, slurm-client; installed with apt-get
# when missing). Works without systemd: the daemons are started directly and daemonize themselves.
# Facts this relies on (tested on Debian 12 / Slurm 22.05 from apt, as root, without systemd):
#  - no slurmdbd, so `sacct` fails: MinJobAge keeps finished jobs in `squeue --states=all` for an
#    hour, which the Snakemake plugin's `slurm-status-command: squeue` mode requires (>= 120 s);
#  - fake GPUs: a GRES needs device files, so N character devices (/dev/null clones) stand in for
#    GPUs; jobs asking for --gpus schedule and run on the CPU (CUDA_VISIBLE_DEVICES stays empty);
#  - the node is named `localhost` (slurmd -N) whatever `hostname` says;
#  - DefMemPerCPU, so that a plain `sbatch` without --mem does not take the whole node.
# Exit codes: 0 ok, 1 the cluster did not come up (last log lines printed), 3 cannot run here
# (not root, no apt-get); tests skip on 3 only.
set -euo pipefail

GPUS=${FAKE_GPUS:-2}
CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm

die() { echo "slurm-local: $*" >&2; exit "${2:-1}"; }

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -1; }

controller_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return 0
    command -v apt-get >/dev/null || die "slurm is not installed and there is no apt-get to install it" 3
    echo "slurm-local: installing munge and slurm from apt" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        munge slurmctld slurmd slurm-client >/dev/null
}

start_munge() {
    # munge authenticates every daemon and client call; munged refuses to run as root
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

MARKER="# written by scripts/slurm-local.sh"

write_config() {
    # never overwrite the configuration of a real cluster node
    if [ -s "$CONF_DIR/slurm.conf" ] && ! head -1 "$CONF_DIR/slurm.conf" | grep -qF "$MARKER"; then
        die "$CONF_DIR/slurm.conf exists and was not written by this script; not touching it" 3
    fi
    install -d "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" "$RUN_DIR"
    # the topology slurmd detects (Sockets/Cores/Threads), so that slurmd does not complain
    local topo mem gres=""
    topo=$(slurmd -C | head -1 | tr ' ' '\n' |
        grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
    mem=$(( $(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # 1 GiB left to the OS
    if [ "$GPUS" -gt 0 ]; then
        gres="Gres=gpu:$GPUS"
        for i in $(seq 0 $((GPUS - 1))); do
            [ -e "$RUN_DIR/fakegpu$i" ] || mknod -m 0666 "$RUN_DIR/fakegpu$i" c 1 3
        done
        echo "NodeName=localhost Name=gpu File=$RUN_DIR/fakegpu[0-$((GPUS - 1))]" >"$CONF_DIR/gres.conf"
    else
        rm -f "$CONF_DIR/gres.conf"
    fi
    cat >"$CONF_DIR/slurm.conf.new" <<EOF
$MARKER (a one-node test cluster; rerun it to change, do not edit)
ClusterName=cll-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MinJobAge=3600
KillWait=5
ReturnToService=2
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 $topo RealMemory=$mem $gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # CHANGED=1 when the daemons must re-read it (a running cluster is otherwise left alone)
    if cmp -s "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"; then
        rm "$CONF_DIR/slurm.conf.new"
        CHANGED=0
    else
        mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
        CHANGED=1
    fi
}

wait_idle() {
    local state
    for _ in $(seq 150); do
        state=$(node_state)
        case "$state" in
            idle | mixed | allocated) return 0 ;;
            # left DOWN/DRAINED/INVALID by an earlier configuration: registered again, it may resume
            down* | drain* | inval*) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "the node did not become idle (state: ${state:-none})"
}

up() {
    [ "$(id -u)" -eq 0 ] || die "needs root (it installs packages and writes /etc/slurm)" 3
    local t0=$SECONDS
    install_packages
    start_munge
    write_config
    # a running cluster whose slurm.conf changed is restarted: `scontrol reconfigure` cannot change
    # a GRES count (Slurm 22.05 refuses it with File= devices and drains the node)
    if [ "$CHANGED" -eq 1 ] && controller_up; then down; fi
    controller_up || slurmctld
    pgrep -x slurmd >/dev/null || slurmd -N localhost
    wait_idle
    echo "slurm-local: up in $((SECONDS - t0)) s: partition debug, node localhost, $GPUS fake GPU(s)"
}

down() {
    scontrol shutdown 2>/dev/null || true  # stops slurmctld and every slurmd
    for _ in $(seq 50); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || return 0
        sleep 0.1
    done
    die "slurmctld/slurmd still running after shutdown"
}

status() {
    controller_up || die "slurmctld is not answering"
    local state
    state=$(node_state)
    case "$state" in idle | mixed | allocated) sinfo ;; *) die "node state: ${state:-unknown}" ;; esac
}

case "${1:-}" in
    up)
        shift
        if [ "${1:-}" = --gpus ]; then GPUS=${2:?--gpus needs a number}; fi
        up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up [--gpus N] | status | down" >&2; exit 2 ;;
esac
