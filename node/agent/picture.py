"""The search tree as an SVG picture: versions as dots at (rounds from the base, held-out
loss), each joined to its parent; versions of stopped branches grey, the optimal path
highlighted. Written directly: the picture is a few dozen lines and circles, and a
plotting library (matplotlib: tens of MB) would be the node's largest dependency.
"""

from __future__ import annotations

from html import escape
from typing import Any

W, H = 720, 440
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50
PATH_COLOUR = "#d62728"
LIVE_COLOUR = "#1f77b4"
STOPPED_COLOUR = "#b0b0b0"


def search_svg(doc: dict[str, Any]) -> str:
    """The SVG text of a stored search document (Agent.status)."""
    s = doc["search"]
    nodes = {n["version"]: n for n in s["nodes"]}
    status = {b["id"]: b["status"] for b in s["branches"]}
    path = s["path"]
    on_path = set(path)
    losses = [n["loss"] for n in nodes.values() if n["loss"] is not None]
    lo, hi = (min(losses), max(losses)) if losses else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    depth_max = max([n["depth"] for n in nodes.values()] + [1])

    def xy(n: dict[str, Any]) -> tuple[float, float]:
        x = LEFT + (W - LEFT - RIGHT) * n["depth"] / depth_max
        loss = n["loss"] if n["loss"] is not None else hi
        y = TOP + (H - TOP - BOTTOM) * (hi - loss) / (hi - lo)
        return x, y

    def grey(n: dict[str, Any]) -> bool:
        return n["branch"] is not None and status.get(n["branch"]) in ("stopped", "failed")

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">'
           f'{escape(doc["name"])}: search tree (best '
           f'{s["best"]["loss"]:.4f})</text>' if s["best"] else
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">'
           f'{escape(doc["name"])}: search tree</text>']
    x0, y0, x1, y1 = LEFT, H - BOTTOM, W - RIGHT, TOP
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/>')
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="black"/>')
    for i in range(5):
        loss = lo + (hi - lo) * i / 4
        y = TOP + (H - TOP - BOTTOM) * (hi - loss) / (hi - lo)
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{loss:.3f}</text>')
        out.append(f'<line x1="{x0 - 3}" y1="{y:.1f}" x2="{x0}" y2="{y:.1f}" stroke="black"/>')
    for d in range(depth_max + 1):
        x = LEFT + (W - LEFT - RIGHT) * d / depth_max
        out.append(f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle">{d}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">rounds from the base'
               '</text>')
    out.append(f'<text x="16" y="{H / 2}" text-anchor="middle" transform="rotate(-90 16 '
               f'{H / 2})">held-out loss</text>')
    for n in nodes.values():
        parent = nodes.get(n["parent"]) if n["parent"] else None
        if parent is None:
            continue
        (px, py), (cx, cy) = xy(parent), xy(n)
        edge_on_path = n["version"] in on_path and parent["version"] in on_path
        colour = PATH_COLOUR if edge_on_path else STOPPED_COLOUR if grey(n) else LIVE_COLOUR
        width = 3 if edge_on_path else 1.2
        out.append(f'<line x1="{px:.1f}" y1="{py:.1f}" x2="{cx:.1f}" y2="{cy:.1f}" '
                   f'stroke="{colour}" stroke-width="{width}"/>')
    for n in nodes.values():
        x, y = xy(n)
        colour = PATH_COLOUR if n["version"] in on_path else STOPPED_COLOUR if grey(n) \
            else LIVE_COLOUR
        loss = "?" if n["loss"] is None else f'{n["loss"]:.4f}'
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{5 if n["version"] in on_path else 4}"'
                   f' fill="{colour}"><title>{n["version"][:12]} loss {loss}'
                   f'{"" if n["branch"] is None else " branch " + str(n["branch"])}</title>'
                   '</circle>')
    legend = [(PATH_COLOUR, "optimal path"), (LIVE_COLOUR, "kept branches"),
              (STOPPED_COLOUR, "stopped branches")]
    for i, (colour, label) in enumerate(legend):
        y = TOP + 4 + 16 * i
        out.append(f'<circle cx="{W - 150}" cy="{y}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{W - 140}" y="{y + 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
