"""List a binary's USDT probes and request-boundary symbols, like ``tplist -l``."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict
from typing import Any, TextIO

from pgtrace.elf.symbols import REQUEST_SYMBOLS, read_symbols
from pgtrace.elf.usdt import ProbeSite
from pgtrace.errors import PgtraceError

WIDTH = 100


def _groups(sites: list[ProbeSite]) -> dict[tuple[str, str], list[ProbeSite]]:
    """Sites grouped by (provider, name), sorted by name."""
    groups: dict[tuple[str, str], list[ProbeSite]] = {}
    for site in sorted(sites, key=lambda s: (s.provider, s.name, s.address)):
        groups.setdefault((site.provider, site.name), []).append(site)
    return groups


def _symbol_offsets(path: str) -> dict[str, int | None]:
    """File offset of each request-boundary symbol, None when absent."""
    try:
        symbols = read_symbols(path)
    except PgtraceError:
        symbols = {}
    return {
        name: (symbols[name].file_offset if name in symbols else None) for name in REQUEST_SYMBOLS
    }


def _site_json(site: ProbeSite) -> dict[str, Any]:
    return {
        "address": site.address,
        "file_offset": site.file_offset,
        "semaphore": site.semaphore,
        "semaphore_offset": site.semaphore_offset,
        "args": [asdict(arg) for arg in site.args],
    }


def _as_json(path: str, sites: list[ProbeSite]) -> dict[str, Any]:
    return {
        "binary": path,
        "probes": [
            {"provider": provider, "name": name, "sites": [_site_json(s) for s in group]}
            for (provider, name), group in _groups(sites).items()
        ],
        "symbols": _symbol_offsets(path),
    }


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text,
        WIDTH,
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_long_words=False,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


def _site_lines(site: ProbeSite) -> list[str]:
    args = " ".join(a.raw for a in site.args) or "(no args)"
    lines = _wrap(f"offset {site.file_offset:#x}  args {args}", "    ")
    bad = [str(i) for i, a in enumerate(site.args, 1) if not a.supported]
    if bad:
        lines.append(f"      unsupported arg form: arg {', '.join(bad)}")
    return lines


def _as_text(path: str, sites: list[ProbeSite]) -> list[str]:
    groups = _groups(sites)
    lines = _wrap(f"{path}: {len(groups)} USDT probes at {len(sites)} sites", "")
    for (provider, name), group in groups.items():
        semaphores = sorted({s.semaphore_offset for s in group})
        sema = ", ".join(f"{o:#x}" for o in semaphores if o) or "none"
        count = f"{len(group)} site" + ("s" if len(group) > 1 else "")
        lines.append("")
        lines.extend(_wrap(f"{provider}:{name}  {count}  semaphore {sema}", "  "))
        for site in group:
            lines.extend(_site_lines(site))
    lines += ["", "Request-boundary uprobe symbols:"]
    offsets = _symbol_offsets(path)
    width = max(len(name) for name in offsets)
    for name, offset in offsets.items():
        where = f"offset {offset:#x}" if offset is not None else "MISSING"
        lines.append(f"  {name:<{width}}  {where}")
    return lines


def render_probes(path: str, sites: list[ProbeSite], stream: TextIO, *, as_json: bool) -> None:
    """Write the probe listing of ``path`` to ``stream``, as text or JSON."""
    if as_json:
        json.dump(_as_json(path, sites), stream, indent=2)
        stream.write("\n")
        return
    for line in _as_text(path, sites):
        stream.write(line + "\n")
