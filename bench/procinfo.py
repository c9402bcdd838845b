"""What the benchmarks read of a process from /proc."""

import os

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mib(pid, field="VmRSS"):
    """VmRSS (now) or VmHWM (peak) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid):
    """{pid: (command name, state)} of C{pid}'s children, zombies included."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found[int(entry)] = (name, fields[0])
    return found
