"""Folded stacks (`a;b;c count`) to a self-contained SVG flame graph (root at the bottom)."""

from __future__ import annotations

from dataclasses import dataclass, field

from markupsafe import Markup

from pgtrace.report.common import template

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


@dataclass
class Frame:
    """One frame drawn: its box (px), fill, and the label that fits in it ("" if none)."""

    name: str
    value: int
    share: float
    x: float
    y: int
    w: float
    fill: str
    text: str


def flame_svg(lines: list[str], *, width: int = 1200, title: str = "", unit: str = "") -> Markup:
    """An SVG flame graph; hover a frame for its name, value and share."""
    root = parse_folded(lines)
    height = (_depth(root) + 1) * ROW + 24
    total = root.value or 1
    frames: list[Frame] = []

    def draw(node: Node, x: float, level: int) -> None:
        w = node.value / total * width
        if w < 0.5:
            return
        chars = int(w / CHAR_W)
        text = "" if chars < 3 else (
            node.name if len(node.name) <= chars else node.name[: chars - 2] + "..")
        frames.append(Frame(node.name, node.value, node.value / total * 100, x,
                            height - (level + 1) * ROW, w, _color(node.name), text))
        cx = x
        for child in sorted(node.children.values(), key=lambda c: c.name):
            draw(child, cx, level + 1)
            cx += child.value / total * width

    draw(root, 0.0, 0)
    svg = template("flame.svg.j2").render(width=width, height=height, font=FONT, row=ROW,
                                          title=title, unit=unit, frames=frames)
    return Markup(svg.strip())
