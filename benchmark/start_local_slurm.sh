#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine, for the benchmark's Slurm tests (tests/test_benchmark_slurm.py).
#
#     sudo benchmark/start_local_slurm.sh          # Debian/Ubuntu; installs slurm-wlm and munge with apt if missing
#
# Idempotent: does nothing when `sinfo` already answers. Never overwrites a slurm.conf it did not write.
# Exits non-zero with one line saying why when it cannot (not root, no apt, no network, daemons fail).
set -euo pipefail

MARK="# written by cleanrl-moe benchmark/start_local_slurm.sh"
CONF=/etc/slurm/slurm.conf

if timeout 10 sinfo -h >/dev/null 2>&1; then
    echo "slurm: already running ($(sinfo -h -o '%P %D nodes %T' | head -1))"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "slurm: needs root to install and start the daemons" >&2
    exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || { echo "slurm: not installed and no apt-get to install it" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    timeout 90 apt-get update -qq >/dev/null || true
    timeout 180 apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || { echo "slurm: apt-get install slurm-wlm munge failed" >&2; exit 1; }
fi
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "slurm: $CONF exists and was not written by this script; leaving it alone" >&2
    exit 1
fi

# munge authenticates the Slurm daemons and clients to each other
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || \
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null || { echo "slurm: munge does not work" >&2; exit 1; }

# one node with all CPUs and most of the RAM; jobs share it by CPU (no cgroups: works in containers)
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > "$CONF" <<CONF
$MARK
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=30
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "slurm: one-node cluster up ($host, $cpus CPUs, $mem_mb MB)"
        exit 0
    fi
    sleep 1
done
echo "slurm: the daemons started but the node is not idle after 60 s (see /var/log/slurm/)" >&2
exit 1
