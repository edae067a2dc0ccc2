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


def available_ram_bytes(meminfo="/proc/meminfo", own_cgroup="/proc/self/cgroup", cgroup_root="/sys/fs/cgroup"):
    """Bytes of memory this process can still use: MemAvailable, or less where a cgroup limits it (Slurm's --mem, a
    container): limit - usage of its cgroup and of each ancestor (v2 memory.max - memory.current, v1
    memory.limit_in_bytes - memory.usage_in_bytes). "max", v1's 2**63 - 4096 and missing files mean no limit."""

    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""

    free = [int(line.split()[1]) * 1024 for line in read(meminfo).splitlines() if line.startswith("MemAvailable:")]
    for line in read(own_cgroup).splitlines():  # "0::/path" (v2), "4:memory:/path" (v1)
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            root, limit_file, usage_file = cgroup_root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            root, limit_file, usage_file = f"{cgroup_root}/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts) + 1):  # the hierarchy's root (a container's own cgroup) down to this process's
            directory = os.path.join(root, *parts[:depth])
            limit, usage = read(f"{directory}/{limit_file}"), read(f"{directory}/{usage_file}")
            if limit.isdigit() and usage.isdigit() and int(limit) < 2**60:
                free.append(max(0, int(limit) - int(usage)))
    return min(free) if free else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


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
