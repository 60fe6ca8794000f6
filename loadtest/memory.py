"""Memory of the server's whole process tree (``bentoml serve`` and every worker it starts), and
the soak's reading of it. psutil when installed, else ``/proc``; no locust import."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _tree_psutil(pid: int) -> tuple[int, float, float | None]:
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss, pss = 0, 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            if pss is not None:
                pss += getattr(p.memory_full_info(), "pss", 0)
        except psutil.NoSuchProcess:
            continue
        except (psutil.AccessDenied, OSError):
            pss = None
    return len(procs), rss / 2**20, None if pss is None else pss / 2**20


def _tree_proc(pid: int) -> tuple[int, float, float | None]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    page = os.sysconf("SC_PAGE_SIZE")
    rss, pss = 0, 0.0
    for p in tree:
        try:
            rss += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return len(tree), rss / 2**20, pss / 2**20 or None


def tree_memory(pid: int) -> tuple[int, float, float | None]:
    """(processes, RSS MiB summed, PSS MiB summed or None). RSS counts shared pages once per
    process, PSS splits them; the soak's verdict uses RSS, as asked, and PSS is there to tell a
    shared-page effect from a leak."""
    try:
        return _tree_psutil(pid)
    except ImportError:
        return _tree_proc(pid)


def _role(cmdline: list[str]) -> str:
    """``serve`` for the bentoml arbiter, the service name for a worker, else the program."""
    if "--service-name" in cmdline:
        i = cmdline.index("--service-name")
        return cmdline[i + 1] if i + 1 < len(cmdline) else "worker"
    if "serve" in cmdline and any("bentoml" in c for c in cmdline):
        return "serve"
    return Path(cmdline[0]).name if cmdline else "?"


def tree_breakdown(pid: int) -> dict[str, float]:
    """RSS MiB per process role in the tree (``serve``, ``mam``, ``mam_clip``, ...), to tell
    which worker grows."""
    out: dict[str, float] = {}
    for p in tree_pids(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            rss = int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
        role = _role([c.decode(errors="replace") for c in cmd if c])
        out[role] = out.get(role, 0.0) + rss / 2**20
    return out


@dataclass
class MemoryReport:
    start_mb: float  # first sample (before load)
    warm_mb: float  # median over [warmup_s, warmup_s + window_s)
    end_mb: float  # median over the last window_s
    max_mb: float
    change: float  # end vs warm, relative
    slope_mb_per_min: float  # least-squares slope after warm-up

    def lines(self, limit: float = 0.10) -> list[str]:
        ok = abs(self.change) <= limit
        return [
            f"server RSS: start {self.start_mb:.0f} MiB, after warm-up {self.warm_mb:.0f} MiB, "
            f"end {self.end_mb:.0f} MiB, max {self.max_mb:.0f} MiB",
            f"change end vs after warm-up: {self.change:+.1%} (slope "
            f"{self.slope_mb_per_min:+.2f} MiB/min): "
            + ("flat within" if ok else "NOT flat within")
            + f" {limit:.0%}",
        ]


def memory_report(
    samples: Sequence[tuple[float, float]], warmup_s: float, window_s: float = 30.0
) -> MemoryReport:
    """``samples``: (t_s since load started, RSS MiB), time-ordered. Medians over short windows
    rather than single samples, so that one request's buffers in flight do not decide it."""
    if not samples:
        raise ValueError("no memory samples")
    t = np.array([s[0] for s in samples], float)
    m = np.array([s[1] for s in samples], float)
    after = t >= warmup_s
    if not after.any():
        after = t >= t[-1]
    t0 = t[after][0]
    warm = float(np.median(m[after & (t < t0 + window_s)]))
    end = float(np.median(m[t > t[-1] - window_s]))
    ta, ma = t[after], m[after]
    slope = float(np.polyfit(ta, ma, 1)[0] * 60) if len(ta) >= 3 and np.ptp(ta) > 0 else math.nan
    return MemoryReport(
        start_mb=float(m[0]),
        warm_mb=warm,
        end_mb=end,
        max_mb=float(m.max()),
        change=(end - warm) / warm if warm else math.nan,
        slope_mb_per_min=slope,
    )


def cpu_seconds() -> dict[int, float]:
    """pid -> CPU seconds (user + system) of every process on the machine, now."""
    try:
        import psutil
    except ImportError:
        psutil = None
    out: dict[int, float] = {}
    if psutil is not None:
        for p in psutil.process_iter(["cpu_times"]):
            ct = p.info.get("cpu_times")
            if ct is not None:
                out[p.pid] = ct.user + ct.system
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(d.name)] = (int(f[11]) + int(f[12])) / tick
            except (OSError, IndexError, ValueError):
                continue
    return out


def tree_pids(pid: int) -> set[int]:
    try:
        import psutil

        root = psutil.Process(pid)
        return {pid, *(p.pid for p in root.children(recursive=True))}
    except ImportError:
        pass
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        seen.add(p)
        todo.extend(children.get(p, []))
    return seen


def cpu_split(
    before: dict[int, float], after: dict[int, float], server: set[int], client: set[int],
    seconds: float,
) -> tuple[float, float, float]:  # fmt: skip
    """Cores used over a window by the server tree, the load process and everything else. On a
    shared machine the last one says whether a level was disturbed by someone else's work (a
    process that ended inside the window is missed)."""
    used = {pid: t - before.get(pid, 0.0) for pid, t in after.items()}
    server_s = sum(v for p, v in used.items() if p in server)
    client_s = sum(v for p, v in used.items() if p in client)
    other_s = sum(v for p, v in used.items() if p not in server and p not in client)
    return server_s / seconds, client_s / seconds, other_s / seconds
