"""Colour tables: distinct colours for region segments and a heat ramp for saliency maps.

Built here (not taken from Slicer's colour nodes) so they are the same in the Slicer app and in a
bare MRML scene, and so "distinct" is a tested property rather than a hope.
"""

from __future__ import annotations

import colorsys

# A hand-picked qualitative start (red, blue, green, orange, purple, cyan, yellow, magenta), then
# golden-ratio hue steps for as many more regions as a lesion touches.
_BASE: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.16, 0.14),
    (0.19, 0.45, 0.85),
    (0.20, 0.70, 0.25),
    (0.98, 0.55, 0.05),
    (0.58, 0.30, 0.75),
    (0.10, 0.78, 0.80),
    (0.95, 0.85, 0.15),
    (0.90, 0.30, 0.70),
)
_PALETTE: list[tuple[float, float, float]] = []
_PALETTE_SIZE = 64


def _palette() -> list[tuple[float, float, float]]:
    """The base colours, then greedy farthest-point picks from an HSV grid (deterministic)."""
    if _PALETTE:
        return _PALETTE
    cands = []
    for h in range(36):
        for s, v in ((0.9, 0.95), (0.55, 1.0), (0.9, 0.6), (0.4, 0.75)):
            r, g, b = colorsys.hsv_to_rgb(h / 36, s, v)
            cands.append((round(r, 4), round(g, 4), round(b, 4)))
    chosen = list(_BASE)
    while len(chosen) < _PALETTE_SIZE:
        best = max(cands, key=lambda c: min(color_distance(c, x) for x in chosen))
        chosen.append(best)
    _PALETTE.extend(chosen)
    return _PALETTE


def region_color(i: int) -> tuple[float, float, float]:
    """The i-th segment colour (RGB in [0, 1]); the first 64 are kept far apart, then they repeat."""
    if i < 0:
        raise ValueError("colour index must be >= 0")
    pal = _palette()
    return pal[i % len(pal)]


def color_distance(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Euclidean RGB distance; used by tests and to warn about look-alike colours."""
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5


def heat_table(n: int = 256, transparent_below: float = 0.05) -> list[tuple[float, float, float, float]]:
    """A black-red-yellow-white ramp (RGBA in [0, 1]) for a [0, 1] saliency map.

    Values under ``transparent_below`` get alpha 0 so only salient tissue is tinted.
    """
    if n < 2:
        raise ValueError("a colour table needs at least 2 entries")
    out = []
    for i in range(n):
        t = i / (n - 1)
        r = min(1.0, 3 * t)
        g = min(1.0, max(0.0, 3 * t - 1))
        b = min(1.0, max(0.0, 3 * t - 2))
        a = 0.0 if t < transparent_below else 1.0
        out.append((r, g, b, a))
    return out
