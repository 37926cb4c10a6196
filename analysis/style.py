"""The look shared by every figure: one colour per loss family, orderings, number format, saving.

The palette is defined here and nowhere else, so a loss has the same colour in every figure.
Pure matplotlib (Agg backend); no torch, no Ray.
"""
from __future__ import annotations

import colorsys
import math
import os
import textwrap

import matplotlib
import numpy as np

if not os.environ.get("MPLBACKEND"):  # a notebook's inline backend (set by Jupyter) is kept
    matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from harness.base.safefs import write_inside  # noqa: E402
from harness.declare.config import INIT_SCHEMES

# Known loss families, in display order, with fixed colours (seaborn "colorblind" hues).
# Teacher-score families are blue/green, score-free (ratio) family members warm colours.
LOSS_COLORS = {
    "di": "#0173b2",
    "sid": "#029e73",
    "ratio_kl": "#de8f05",
    "ratio_js": "#d55e00",
    "ratio_rkl": "#cc78bc",
    "ratio_kl[fixed]": "#ca9161",
    "ratio_js[fixed]": "#fbafe4",
    "ratio_rkl[fixed]": "#56b4e9",
}
# Colours for loss labels not listed above, handed out in sorted label order.
EXTRA_COLORS = ("#8c564b", "#9467bd", "#bcbd22", "#17becf", "#e377c2", "#1f77b4", "#ff7f0e",
                "#2ca02c", "#d62728", "#7f7f7f")
# References are drawn in greys/black, never in a loss colour.
REFERENCE_STYLE = {
    "teacher_heun35": {"color": "black", "linestyle": (0, (5, 3)), "lw": 1.0,
                       "label": "teacher Heun-35 (35 NFE)"},
    # the data floor is drawn dotted and heavier in grey, above the teacher line, so the two stay
    # distinguishable where their values coincide (dots over dashes)
    "data_floor": {"color": "#666666", "linestyle": (0, (1, 1.2)), "lw": 1.8,
                   "label": "data floor (real images scored as samples)"},
    "initial": {"color": "#777777", "linestyle": "-.", "lw": 1.0,
                "label": "initial one-step generator"},
}
REFERENCE_NAMES = {k: v["label"] for k, v in REFERENCE_STYLE.items()}

RC = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "pdf.fonttype": 42,
}
KIMG_LABEL = "training images seen (kimg)"
SIGMA_LABEL = "σ_feat: noise on the transplanted features (log)"


def base_loss(label: str) -> str:
    """``'sid (student.lr=0.001)'`` -> ``'sid'``: the loss label without extra-axis suffix."""
    return label.split(" (", 1)[0]


def _natural(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def loss_sort_key(label: str):
    """Known families first in LOSS_COLORS order, then others by name; extra-axis variants of
    one loss by their axis values, numerically where they are numbers."""
    base = base_loss(label)
    known = list(LOSS_COLORS)
    suffix = label[len(base):].strip()[1:-1] if label != base else ""
    parts = tuple((k, _natural(v)) for k, _, v in
                  (p.partition("=") for p in suffix.split(", ") if p))
    return (known.index(base) if base in known else len(known), base, parts, label)


_RESET_ORDER = ("input", "encoder", "middle", "decoder", "output", "embedding")
_REINIT_ORDER = {"matched": 0, "fresh": 1}  # any other value sorts last


def _nn(value):
    """None for a missing value (None, NaN, pandas NA), else the value."""
    if value is None:
        return None
    try:
        if value != value:  # NaN, NA
            return None
    except (TypeError, ValueError):
        return None
    return value


def _natural_tokens(text: str) -> tuple:
    """``'band 1.5-4'`` -> ``((1, 'band'), (0, 1.5), (0, 4.0))``: numbers compare as numbers."""
    out = []
    for tok in str(text).replace("-", " ").replace(",", " ").split():
        try:
            out.append((0, float(tok), ""))
        except ValueError:
            out.append((1, 0.0, tok))
    return tuple(out)


def init_sort_key(info: dict, label: str = ""):
    """Order of init labels from their typed columns (``info``: init_scheme, reset_groups,
    reinit, sigma_feat, reset_output, init_source, freeze_groups, mapping_steps): teacher,
    band-limited teachers, teacher with frozen groups (most frozen first), reset_layers (fewest
    groups first; matched, then fresh), feature_transplant by σ_feat (reset_output last),
    mapping_match, random, others by name."""
    get = (lambda k: _nn(info.get(k))) if info else (lambda k: None)
    scheme = get("init_scheme")
    if scheme == "teacher":
        src, frozen = get("init_source"), get("freeze_groups")
        if src is None and frozen is None:
            return (0, 0, ())
        if frozen is None:
            return (1, 0, _natural_tokens(src), label)
        return (1, 1, (-len(frozen.split("+")), *_natural_tokens(src or "")), label)
    if scheme == "reset_layers":
        groups = (get("reset_groups") or "").split("+")
        first = min((_RESET_ORDER.index(g) if g in _RESET_ORDER else 9) for g in groups)
        return (2, len(groups) * 10 + first, (_REINIT_ORDER.get(get("reinit"), 2),), label)
    if scheme == "feature_transplant":
        sigma = get("sigma_feat")
        ro = get("reset_output")
        return (3, math.inf if sigma is None else float(sigma),
                (0 if ro is None or not ro else 1, _REINIT_ORDER.get(get("reinit"), 2)), label)
    if scheme == "mapping_match":
        return (4, -float(get("mapping_steps") or 0), (), label)
    if scheme == "random":
        return (5, 0, (), label)
    return (6, 0, (), label)


def _wrap_groups(groups: str, width: int = 15) -> list[str]:
    lines, cur = [], "["
    for k, part in enumerate(groups.split("+")):
        piece = part if k == 0 else "+" + part
        if len(cur) + len(piece) > width and cur != "[":
            lines.append(cur)
            cur = piece
        else:
            cur += piece
    return lines + [cur + "]"]


def display_init(label: str, info: dict | None = None) -> str:
    """Compact multi-line form of an init for tick labels and panel titles, built from its typed
    columns (``info``; without them the label itself): ``reset_layers\n[output]\nmatched``,
    ``feature transplant\nσ_feat=2.5``, ``teacher\n[band 1.5-4]``, ``teacher\nfrozen\n[encoder]``."""
    if not info:
        return label
    get = lambda k: _nn(info.get(k))  # noqa: E731
    scheme = get("init_scheme")
    if scheme == "teacher" and get("freeze_groups") is not None:
        src = f"[{get('init_source')}]" if get("init_source") is not None else ""
        return "\n".join(["teacher" + src, "frozen", *_wrap_groups(get("freeze_groups"))])
    if scheme == "teacher" and get("init_source") is not None:
        return f"teacher\n[{get('init_source')}]"
    if scheme == "reset_layers" and get("reset_groups") is not None:
        return "\n".join(["reset_layers", *_wrap_groups(get("reset_groups")), str(get("reinit"))])
    if scheme == "feature_transplant" and get("sigma_feat") is not None:
        out = f"feature transplant\nσ_feat={float(get('sigma_feat')):g}"
        if get("reset_output"):
            out += f"\n+reset output ({get('reinit') or 'matched'})"
        return out
    if scheme == "mapping_match":
        extras = [f"{name}={_nn(info.get(p.column or name)):g}"
                  for name, p in INIT_SCHEMES["mapping_match"].items()
                  if _nn(info.get(p.column or name)) is not None
                  and _nn(info.get(p.column or name)) != p.default]
        return "mapping match" + ("\n" + ", ".join(extras) if extras else "")
    return label


def _shade(color: str, factor: float) -> str:
    r, g, b = mcolors.to_rgb(color)
    h, lum, s = colorsys.rgb_to_hls(r, g, b)
    lum = min(0.92, max(0.08, lum * factor))
    return mcolors.to_hex(colorsys.hls_to_rgb(h, lum, s))


def loss_palette(labels) -> dict[str, str]:
    """Colour for every loss label: known families fixed, unknown bases in sorted order,
    extra-axis variants of one base as lighter/darker shades of its colour."""
    labels = sorted(set(labels), key=loss_sort_key)
    bases = sorted({base_loss(lb) for lb in labels}, key=loss_sort_key)
    unknown = [b for b in bases if b not in LOSS_COLORS]
    base_color = {b: LOSS_COLORS.get(b) for b in bases}
    for i, b in enumerate(unknown):
        base_color[b] = EXTRA_COLORS[i % len(EXTRA_COLORS)]
    out = {}
    for b in bases:
        variants = [lb for lb in labels if base_loss(lb) == b]
        if len(variants) == 1:
            out[variants[0]] = base_color[b]
            continue
        k = len(variants)
        for j, lb in enumerate(variants):
            out[lb] = _shade(base_color[b], 0.6 + 0.8 * j / (k - 1))
    return out


def fmt_num(x: float, digits: int = 3) -> str:
    """Significant-digit formatting that keeps trailing zeros: 18.0, 0.213, 1234."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{_decimals(x, digits)}f}"


def _decimals(x: float, digits: int) -> int:
    if x == 0 or not math.isfinite(x):
        return digits - 1
    return int(min(6, max(0, digits - 1 - math.floor(math.log10(abs(x))))))


def fmt_pm(mean: float, std: float, digits: int = 3, pm: str = "±") -> str:
    """``mean±std`` with the std given to the mean's number of decimals."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    d = _decimals(mean, digits)
    if std is None or not math.isfinite(std):
        return f"{mean:.{d}f}"
    return f"{mean:.{d}f}{pm}{std:.{d}f}"


def metric_label(metric: str, higher_better: bool, wrap: bool = False) -> str:
    """``fd_digits_1k (lower is better)``; ``wrap``: on two lines (colorbars, narrow axes)."""
    return f"{metric}{chr(10) if wrap else ' '}({'higher' if higher_better else 'lower'} is better)"


def axis_limits(values, log: bool, bottom: float = 0.05) -> tuple[float, float]:
    """Axis limits around ``values``: 5% of the range above, ``bottom`` of it below."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if log:
        v = v[v > 0]
    if not len(v):
        return (0.0, 1.0)
    lo, hi = v.min(), v.max()
    if log:
        return lo / (hi / lo) ** bottom, hi * (hi / lo) ** 0.05
    span = (hi - lo) if hi > lo else max(abs(hi), 1.0)
    return lo - bottom * span, hi + 0.05 * span


def use_log(values) -> bool:
    """Log scale when all values are positive and span more than a factor of 20."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 20


def save(fig, out_dir: str, name: str, note: str | None = None) -> list[str]:
    """Write ``name.png`` (dpi 150) and ``name.pdf``; ``note`` goes in small text under the axes."""
    os.makedirs(out_dir, exist_ok=True)
    # the tight box is computed once and reused: one layout pass instead of one per format,
    # at the PNG's dpi (hinted text is wider at 150 dpi than at 100: a box measured at 100
    # cut the ends off the outermost labels)
    fig.set_dpi(150)
    renderer = fig.canvas.get_renderer()
    bbox = fig.get_tightbbox(renderer)
    if note:
        w, h = fig.get_size_inches()
        width = max(60, int((bbox.x1 - bbox.x0) * 19))  # characters of 6.5 pt per line
        note = "\n".join(textwrap.fill(line, width) for line in note.split("\n"))
        t = fig.text(bbox.x0 / w, (bbox.y0 - 0.06) / h, note, ha="left", va="top",
                     fontsize=6.5, color="#555555")
        tb = t.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())
        bbox = Bbox.union([bbox, tb])
    bbox = bbox.padded(0.05)
    paths = []
    for ext, extra in (("png", {"dpi": 150, "metadata": {"Software": None}}),
                       ("pdf", {"metadata": {"CreationDate": None, "Creator": None,
                                             "Producer": None}})):
        path = os.path.join(out_dir, f"{name}.{ext}")
        write_inside(out_dir, path, write=lambda fh, ext=ext, extra=extra: fig.savefig(
            fh, format=ext, bbox_inches=bbox, **extra))
        paths.append(path)
    plt.close(fig)
    return paths


def panel_grid(n: int, ncol: int, w: float = 2.4, h: float = 1.7, left: float = 0.75,
               right: float = 0.1, top: float = 0.55, bottom: float = 0.55, wgap: float = 0.15,
               hgap: float = 0.6):
    """A figure with n panels on a fixed grid in inches (no layout engine pass needed).
    Returns (fig, axes list, (nrow, ncol))."""
    nrow = math.ceil(n / ncol)
    fw = left + ncol * w + (ncol - 1) * wgap + right
    fh = top + nrow * h + (nrow - 1) * hgap + bottom
    fig = plt.figure(figsize=(fw, fh))
    axes = []
    for i in range(n):
        r, c = divmod(i, ncol)
        x0 = left + c * (w + wgap)
        y0 = fh - top - (r + 1) * h - r * hgap
        axes.append(fig.add_axes((x0 / fw, y0 / fh, w / fw, h / fh)))
    return fig, axes, (nrow, ncol)


def legend_below(fig, handles, labels, ncol: int | None = None, fontsize: float = 7,
                 title: str | None = None) -> None:
    """The legend under everything drawn so far (axes, tick labels, axis labels), centred on
    the axes: a figure keeps the width of its panels instead of growing a column at the right.
    Two columns where the figure is wide enough, long labels wrapped."""
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_visible()]
    x0, x1 = min(b.x0 for b in boxes), max(b.x1 for b in boxes)
    y0 = min(b.y0 for b in boxes)
    W, H = fig.bbox.width, fig.bbox.height
    width_in = (x1 - x0) / fig.dpi
    if ncol is None:
        ncol = 1 if width_in < 4.2 or len(labels) < 3 else 2
    chars = max(24, int(width_in / ncol * 72 / (0.55 * fontsize)) - 5)
    labels = [textwrap.fill(str(lb), chars, subsequent_indent="  ") for lb in labels]
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=((x0 + x1) / 2 / W,
                                                                    (y0 - 4) / H),
               bbox_transform=fig.transFigure, ncol=ncol, frameon=False, fontsize=fontsize,
               title=title, title_fontsize=fontsize, handlelength=1.8, columnspacing=1.2,
               borderaxespad=0.0)


def log_ticks(axis, lo: float, hi: float) -> None:
    """Plain-number ticks on a log ``axis`` (``ax.yaxis``): 1, 2, 5 per decade over at most
    three decades, else the decades; no minor labels (matplotlib's ``6x10^0`` minor labels
    overlap on a short axis)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    wide = lo > 0 and hi / lo > 1000
    axis.set_major_locator(LogLocator(subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def write_csv(df, out_dir: str, name: str) -> str:
    """``<name>.data.csv``: the figure's aggregated data, floats to 6 significant digits."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.data.csv")
    text = df.to_csv(index=False, float_format="%.6g")
    return write_inside(out_dir, path, text.encode())
