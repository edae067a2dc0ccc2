"""What this machine holds: CPUs, free RAM, the visible GPUs' free memory."""
import os
import subprocess


def cpu_count():
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:  # a container's CPU quota (cgroup v2)
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def available_ram():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def gpus():
    """[(index, free bytes)] of the visible NVIDIA GPUs, read with nvidia-smi (no CUDA context in this process)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.total,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in out.stdout.strip().splitlines() if out.returncode == 0 else []:
        index, total, used = (int(x) for x in line.split(","))
        found.append((index, (total - used) * 2**20))
    if visible:
        wanted = [int(x) for x in visible.split(",") if x.strip().isdigit()]
        found = [(index, free) for index, free in found if index in wanted]
    return found
