"""Small inline SVG charts (histograms, bars) for the report: no plotting library, no script."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT, PAD = 420, 200, 32
COLOURS = {"web": "#d9822b", "synthetic": "#3b73b9", "kept": "#3a9a5b", "rejected": "#b94a48"}


def histogram(
    series: dict[str, list[float]],
    low: float,
    high: float,
    bins: int,
    title: str,
    marker: float | None = None,
    marker_label: str = "",
) -> str:
    """Overlaid histograms of each series (as fractions of that series), one SVG."""
    width = (high - low) / bins
    counts = {}
    for name, values in series.items():
        row = [0] * bins
        for value in values:
            if value is None:
                continue
            index = min(bins - 1, max(0, int((value - low) / width)))
            row[index] += 1
        total = max(1, sum(row))
        counts[name] = [c / total for c in row]
    top = max([max(row) for row in counts.values()] + [1e-9])
    plot_w, plot_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    bar_w = plot_w / bins / max(1, len(counts))
    parts = [_frame(title)]
    for s, (name, row) in enumerate(counts.items()):
        for i, fraction in enumerate(row):
            h = plot_h * fraction / top
            x = PAD + i * plot_w / bins + s * bar_w
            parts.append(
                f'<rect x="{x:.1f}" y="{PAD + plot_h - h:.1f}" width="{bar_w:.1f}" '
                f'height="{h:.1f}" fill="{COLOURS.get(name, "#777")}" opacity="0.85"/>'
            )
    if marker is not None:
        x = PAD + (marker - low) / (high - low) * plot_w
        parts.append(f'<line x1="{x:.1f}" y1="{PAD - 6}" x2="{x:.1f}" y2="{PAD + plot_h}" '
                     'stroke="#111" stroke-width="2" stroke-dasharray="5,3"/>')
        parts.append(f'<text x="{x + 4:.1f}" y="{PAD - 8}" font-size="11">'
                     f"{escape(marker_label)}</text>")
    parts.append(_axis(low, high))
    parts.append(_legend(list(counts)))
    parts.append("</svg>")
    return "".join(parts)


def bars(values: dict[str, float], title: str, high: float = 1.0, colour: str = "#3a9a5b") -> str:
    """One bar per label (e.g. kept fraction per shard), values between 0 and ``high``."""
    plot_w, plot_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    n = max(1, len(values))
    step = plot_w / n
    parts = [_frame(title)]
    for i, (label, value) in enumerate(values.items()):
        h = plot_h * (value / high if high else 0)
        x = PAD + i * step
        parts.append(f'<rect x="{x + step * 0.1:.1f}" y="{PAD + plot_h - h:.1f}" '
                     f'width="{step * 0.8:.1f}" height="{h:.1f}" fill="{colour}">'
                     f"<title>{escape(label)}: {value:.3f}</title></rect>")
        if n <= 24:
            parts.append(f'<text x="{x + step / 2:.1f}" y="{HEIGHT - PAD + 14}" font-size="9" '
                         f'text-anchor="middle">{escape(label)}</text>')
    parts.append(f'<text x="4" y="{PAD + 4}" font-size="10">{high:g}</text>')
    parts.append(f'<text x="4" y="{PAD + plot_h}" font-size="10">0</text>')
    parts.append("</svg>")
    return "".join(parts)


def _frame(title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">'
            f'<text x="{PAD}" y="14" font-size="13" font-weight="bold">{escape(title)}</text>'
            f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
            'stroke="#444"/>')


def _axis(low: float, high: float) -> str:
    y = HEIGHT - PAD + 14
    middle = (low + high) / 2
    return "".join(
        f'<text x="{x}" y="{y}" font-size="10" text-anchor="middle">{value:g}</text>'
        for x, value in ((PAD, low), (WIDTH / 2, middle), (WIDTH - PAD, high))
    )


def _legend(names: list[str]) -> str:
    parts = []
    for i, name in enumerate(names):
        x = WIDTH - PAD - 90
        y = PAD + 4 + i * 14
        parts.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" '
                     f'fill="{COLOURS.get(name, "#777")}"/>'
                     f'<text x="{x + 14}" y="{y}" font-size="11">{escape(name)}</text>')
    return "".join(parts)


def lines(
    series: dict[str, list[tuple[float, float, float | None, float | None]]],
    low: float,
    high: float,
    title: str,
    colours: dict[str, str],
    markers: tuple[tuple[float, str], ...] = (),
) -> str:
    """Lines of (x, y, band low, band high) points over x in [low, high] and y in [0, 1], each
    with its band shaded where one is given, and dashed vertical markers (x, label)."""
    plot_w, plot_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    span = (high - low) or 1.0

    def xy(x: float, y: float) -> str:
        return f"{PAD + (min(high, max(low, x)) - low) / span * plot_w:.1f}," \
               f"{PAD + plot_h - y * plot_h:.1f}"

    parts = [_frame(title)]
    for name, points in series.items():
        colour = colours.get(name, "#777")
        banded = [p for p in points if p[2] is not None and p[3] is not None]
        if banded:
            outline = [xy(x, hi) for x, _, _, hi in banded] + [
                xy(x, lo) for x, _, lo, _ in reversed(banded)]
            parts.append(f'<polygon points="{" ".join(outline)}" fill="{colour}" '
                         'opacity="0.18"/>')
        parts.append(f'<polyline points="{" ".join(xy(x, y) for x, y, _, _ in points)}" '
                     f'fill="none" stroke="{colour}" stroke-width="2"/>')
    for i, (x, label) in enumerate(markers):
        at = xy(x, 1.0).split(",")[0]
        parts.append(f'<line x1="{at}" y1="{PAD - 6}" x2="{at}" y2="{PAD + plot_h}" '
                     'stroke="#111" stroke-width="1.5" stroke-dasharray="5,3"/>')
        right_half = float(at) > WIDTH / 2  # a label there reads leftwards, inside the frame
        parts.append(f'<text x="{float(at) + (-4 if right_half else 4):.1f}" '
                     f'y="{PAD - 8 + 12 * i}" font-size="11" '
                     f'text-anchor="{"end" if right_half else "start"}">{escape(label)}</text>')
    parts.append(f'<text x="4" y="{PAD + 4}" font-size="10">1</text>')
    parts.append(f'<text x="4" y="{PAD + plot_h}" font-size="10">0</text>')
    parts.append(_axis(low, high))
    for i, name in enumerate(series):
        x, y = PAD + 6, PAD + plot_h - 34 + i * 14  # low left: the curves start high there
        parts.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" '
                     f'fill="{colours.get(name, "#777")}"/>'
                     f'<text x="{x + 14}" y="{y}" font-size="11">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
