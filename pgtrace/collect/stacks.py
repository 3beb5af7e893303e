"""Stacks from the BPF maps as folded lines (`frame;frame;... count`), root first.

On-CPU lines count samples; off-CPU lines count nanoseconds and start with the
bucket the blocked time went to ("[fsync]", "[lwlock]", ...). User frames come
from the binary's symbols (dynamic symbols; debug info when installed); user
stacks are walked by frame pointers, so a build without them gives short stacks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pgtrace.model import SERVER_BUCKETS


def _frames(bpf: Any, stack_id: int, pid: int, kernel: bool) -> list[str]:
    if stack_id < 0:
        return []
    try:
        addrs = list(bpf["stack_traces"].walk(stack_id))
    except KeyError:
        return []
    out = []
    for addr in reversed(addrs):  # root first
        raw = bpf.ksym(addr) if kernel else bpf.sym(addr, pid)
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        out.append(f"{name}_[k]" if kernel else name)
    return out


def _clean(frame: str) -> str:
    return frame.replace(";", ":").replace(" ", "_") or "[unknown]"


def folded(bpf: Any, pid: int) -> tuple[list[str], list[str]]:
    """(on-CPU, off-CPU) folded stacks; `pid` is a process whose maps name the binary."""
    on: Counter[str] = Counter()
    for key, value in bpf["oncpu_samples"].items():
        frames = _frames(bpf, key.ustack, pid, False) + _frames(bpf, key.kstack, pid, True)
        on[";".join(_clean(f) for f in frames) or "[no stack]"] += int(value.value)
    off: Counter[str] = Counter()
    for key, value in bpf["offcpu_ns"].items():
        bucket = SERVER_BUCKETS[key.bucket] if key.bucket < len(SERVER_BUCKETS) else "?"
        frames = [f"[{bucket}]", *_frames(bpf, key.ustack, pid, False),
                  *_frames(bpf, key.kstack, pid, True)]
        off[";".join(_clean(f) for f in frames)] += int(value.value)
    return ([f"{s} {n}" for s, n in on.most_common()],
            [f"{s} {n}" for s, n in off.most_common()])
