"""Folded stacks to a flame graph: merging and layout."""

from __future__ import annotations

import re

from pgtrace.report.folded import flame_svg, parse_folded

LINES = ["main;a;b 30", "main;a;c 10", "main;d 60", "broken line", "x;y notanumber"]


def test_parse_merges_and_skips_malformed() -> None:
    root = parse_folded(LINES)
    assert root.value == 100
    main = root.children["main"]
    assert main.value == 100
    assert main.children["a"].value == 40
    assert main.children["a"].children["b"].value == 30
    assert main.children["d"].value == 60


def test_svg_widths_are_proportional() -> None:
    svg = flame_svg(LINES, width=1000, title="on-CPU", unit="samples")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    widths = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"<title>(\w+) \(\d+ samples[^<]*</title><rect [^>]*width=\"([\d.]+)\"", svg)}
    assert widths["all"] == 1000.0
    assert widths["d"] == 600.0
    assert widths["a"] == 400.0
    assert widths["b"] == 300.0


def test_escapes_names() -> None:
    assert "&lt;lambda&gt;" in flame_svg(["<lambda> 1"])
