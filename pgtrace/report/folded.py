"""Folded stacks (`a;b;c count`) to a self-contained SVG flame graph (root at the bottom)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

ROW = 16
FONT = 11
CHAR_W = 6.5


@dataclass
class Node:
    """One frame of the merged stacks."""

    name: str
    value: int = 0
    children: dict[str, Node] = field(default_factory=dict)


def parse_folded(lines: list[str]) -> Node:
    """Merge folded lines into a tree; malformed lines are skipped."""
    root = Node("all")
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        root.value += n
        node = root
        for frame in stack.split(";"):
            node = node.children.setdefault(frame, Node(frame))
            node.value += n
    return root


def _depth(node: Node) -> int:
    return 1 + max((_depth(c) for c in node.children.values()), default=0)


def _color(name: str) -> str:
    h = sum(name.encode()) % 60
    if name.endswith("_[k]"):
        return f"hsl({200 + h % 30},60%,70%)"
    if name.startswith("["):
        return "hsl(0,0%,80%)"
    return f"hsl({10 + h},85%,{60 + h % 15}%)"


def flame_svg(lines: list[str], *, width: int = 1200, title: str = "", unit: str = "") -> str:
    """An SVG flame graph; hover a frame for its name, value and share."""
    root = parse_folded(lines)
    depth = _depth(root)
    height = (depth + 1) * ROW + 24
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="{FONT}">',
           f'<text x="4" y="14" font-size="13">{html.escape(title)}</text>']
    total = root.value or 1

    def draw(node: Node, x: float, level: int) -> None:
        w = node.value / total * width
        if w < 0.5:
            return
        y = height - (level + 1) * ROW
        label = html.escape(node.name)
        tip = f"{label} ({node.value} {unit}, {node.value / total * 100:.2f}%)"
        out.append(f'<g><title>{tip}</title><rect x="{x:.1f}" y="{y}" width="{w:.1f}" '
                   f'height="{ROW - 1}" fill="{_color(node.name)}" rx="2"/>')
        chars = int(w / CHAR_W)
        if chars >= 3:
            text = node.name if len(node.name) <= chars else node.name[: chars - 2] + ".."
            out.append(f'<text x="{x + 3:.1f}" y="{y + ROW - 4}">{html.escape(text)}</text>')
        out.append("</g>")
        cx = x
        for child in sorted(node.children.values(), key=lambda c: c.name):
            draw(child, cx, level + 1)
            cx += child.value / total * width

    draw(root, 0.0, 0)
    out.append("</svg>")
    return "\n".join(out)
