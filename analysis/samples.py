"""The ``samples`` figure: stored samples of every (loss, init), one tile each, in one axes.

Image samples are composed into a single canvas (one imshow, fast with hundreds of tiles);
toy2d samples ((N, 2) float32 points) are drawn as one scatter.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt  # noqa: E402,I001  (style selected the Agg backend)
import numpy as np

from analysis.data import Study, ordered
from analysis.style import RC, fmt_num, save, write_csv
from harness.store.results import decode_samples, load_samples


def samples(study: Study, out_dir: str, timer, root: str) -> list[str]:
    """One tile per (loss, init): the samples of the group's median seed (the seed whose final
    score is the median; the lower middle one for an even count) at its cell's latest kimg,
    with that seed and score written under the tile."""
    with timer("samples: aggregate"):
        s = load_samples(root)
        if s.empty:
            print("figures: samples skipped (no stored samples)")
            return []
        inc = study.cells[study.cells["reason"] == ""][["cell", "loss", "init", "seed"]]
        s = s.drop(columns=["loss", "init", "seed"]).merge(inc, on="cell", how="inner")
        if s.empty:
            print("figures: samples skipped (no stored samples of included cells)")
            return []
        s = s.sort_values(["cell", "kimg"], kind="stable").drop_duplicates("cell", keep="last")
        score = study.final.set_index("cell")["value"]
        s = s.assign(score=s["cell"].map(score).to_numpy()).dropna(subset=["score"])
        s = s.sort_values(["loss", "init", "score", "seed"], kind="stable")
        rank = s.groupby(["loss", "init"], sort=False).cumcount().to_numpy()
        size = s.groupby(["loss", "init"], sort=False)["cell"].transform("size").to_numpy()
        s = ordered(s[rank == (size - 1) // 2].reset_index(drop=True),
                    init_order=study.init_order)
        data = s[["loss", "init", "cell", "seed", "kimg", "score"]].copy()
        data["shape"] = ["x".join(str(int(d)) for d in sh) for sh in s["shape"]]
        csv = write_csv(data, out_dir, "samples")
    with timer("samples: render"), plt.rc_context({**RC, "axes.grid": False}):
        losses = [lo for lo in study.loss_order if lo in set(s["loss"])]
        inits = [i for i in study.init_order if i in set(s["init"])]
        look = {(r.loss, r.init): r for r in s.itertuples(index=False)}
        tiles = {k: decode_samples({"data": r.data, "dtype": r.dtype, "shape": r.shape})
                 for k, r in look.items()}
        # inits across (or the losses, where there are fewer inits), wrapped into blocks of at
        # most MAX_ACROSS so the figure stays within a two-column page width (7 in); tiles
        # about 0.2 in per stored image side, so digits are legible; toy2d scatters get 1.4 in
        flip = len(inits) < len(losses) <= MAX_ACROSS
        rows, cols = (inits, losses) if flip else (losses, inits)
        if flip:
            tiles = {(i, lo): v for (lo, i), v in tiles.items()}
        name = {**{lo: lo.replace(" (", "\n(") for lo in losses},
                **{i: study.display(i) for i in inits}}
        ink = {**{lo: study.palette[lo] for lo in losses}, **{i: "#222222" for i in inits}}
        side = max((int(math.isqrt(min(int(t.shape[0]), 64))) for t in tiles.values()
                    if t.ndim == 4), default=0)
        nblock = math.ceil(len(cols) / MAX_ACROSS)
        across = math.ceil(len(cols) / nblock)
        left, right, bottom, title_h = 0.75, 0.05, 0.05, 0.36
        tile_in = min(1.8 if side else 1.4, 0.2 * side if side else 1.4,
                      (MAX_WIDTH - left - right) / across)
        tile_in = max(tile_in, 0.9)
        blocks = [cols[b * across:(b + 1) * across] for b in range(nblock)]
        heads = [0.1 + 0.115 * max(name[c].count("\n") + 1 for c in part)
                 for part in blocks]  # the column names above each block's tiles
        fw = left + tile_in * across + right
        fh = title_h + sum(heads) + nblock * tile_in * len(rows) + (nblock - 1) * 0.08 + bottom
        fig = plt.figure(figsize=(fw, fh))
        kimgs = [float(r.kimg) for r in look.values()]
        common = max(set(kimgs), key=kimgs.count)
        y0 = fh - title_h
        for part, head in zip(blocks, heads):
            y0 -= head + tile_in * len(rows)
            ax = fig.add_axes((left / fw, y0 / fh, tile_in * len(part) / fw,
                               tile_in * len(rows) / fh))
            _draw_mosaic(ax, {k: v for k, v in tiles.items() if k[1] in part}, rows, part,
                         ink)
            for (loss, init), r in look.items():  # the tile's seed and score (and odd kimg)
                row, col = (init, loss) if flip else (loss, init)
                if col not in part:
                    continue
                at = "" if float(r.kimg) == common else f", {r.kimg:g} kimg"
                ax.text(part.index(col) + 0.5, rows.index(row) + 0.93,
                        f"seed {r.seed}: {fmt_num(r.score)}{at}", ha="center", va="center",
                        fontsize=6.5, color="#222222")
            ax.set_xticks(np.arange(len(part)) + 0.5)
            ax.set_xticklabels([name[c] for c in part], fontsize=6.5 if not flip else 7.5)
            ax.xaxis.tick_top()
            ax.set_yticks(np.arange(len(rows)) + 0.46)
            ax.set_yticklabels([name[r] for r in rows], fontsize=7.5 if not flip else 6.5)
            for lab, c in list(zip(ax.get_yticklabels(), rows)) + list(
                    zip(ax.get_xticklabels(), part)):
                lab.set_color(ink[c])
            ax.tick_params(length=0, pad=1.5)
            for sp in ax.spines.values():
                sp.set_visible(False)
            y0 -= 0.08
        fig.suptitle(f"Stored samples at {common:g} kimg of each loss x init's median seed\n"
                     f"(under each tile: that seed and its final {study.metric})", fontsize=8,
                     x=(left + tile_in * across / 2) / fw, y=1 - 0.04 / fh, va="top")
        return [csv] + save(fig, out_dir, "samples", study.note())


MAX_ACROSS = 6
"""Most tiles side by side; more inits wrap into further blocks below."""
MAX_WIDTH = 7.0
"""Inches: a two-column page width."""


def _draw_mosaic(ax, tiles: dict, losses: list, inits: list, palette: dict):
    """All tiles in one axes, unit cell (j, i) per (row ``losses[i]``, column ``inits[j]``), y
    pointing down: images are composed into one canvas (a single imshow), toy2d points into a
    single scatter in the row's colour (``palette``)."""
    ax.set_xlim(0, len(inits))
    ax.set_ylim(len(losses), 0)
    ax.set_autoscale_on(False)
    pad, bottom = 0.04, 0.86  # a tile spans [pad/2, bottom] of its unit cell down (images: square,
    # centred across); the score goes in the strip below it
    images = {k: _image_grid(a) for k, a in tiles.items() if a.ndim == 4}
    if images:
        size = max(max(g.shape[:2]) for g in images.values())
        unit = int(math.ceil(size / (bottom - pad / 2)))  # square tile, room for the score
        rgb = any(g.ndim == 3 for g in images.values())
        canvas = np.full((len(losses) * unit, len(inits) * unit) + ((3,) if rgb else ()), 255,
                         dtype=np.uint8)
        for (loss, init), g in images.items():
            g = _resize(g, size)
            if rgb and g.ndim == 2:
                g = np.repeat(g[..., None], 3, axis=2)
            y0 = losses.index(loss) * unit + int(round(pad / 2 * unit))
            x0 = inits.index(init) * unit + (unit - size) // 2
            canvas[y0:y0 + size, x0:x0 + size] = g
        ax.imshow(canvas, cmap=None if rgb else "gray", vmin=0, vmax=255,
                  interpolation="nearest", extent=(0, len(inits), len(losses), 0), aspect="auto")
    xs, ys, cs, boxes = [], [], [], []
    for (loss, init), arr in tiles.items():
        if arr.ndim != 2:
            continue
        i, j = losses.index(loss), inits.index(init)
        p = arr[np.isfinite(arr).all(1)]
        if len(p):
            lo, hi = np.percentile(p, [0.5, 99.5], axis=0)
            q = (p - (lo + hi) / 2) / np.maximum(hi - lo, 1e-9).max()
            q = q[(np.abs(q) <= 0.5).all(1)]  # the 1% outermost points would leave the tile
            xs.append(j + 0.5 + q[:, 0] * (1 - 2 * pad))
            ys.append(i + (pad / 2 + bottom) / 2 - q[:, 1] * (bottom - pad / 2))
            cs += [palette[loss]] * len(q)
        boxes.append(plt.Rectangle((j + pad, i + pad / 2), 1 - 2 * pad, bottom - pad / 2))
    if xs:
        ax.scatter(np.concatenate(xs), np.concatenate(ys), s=1.0, c=cs, alpha=0.6, lw=0,
                   rasterized=True)
    if boxes:
        from matplotlib.collections import PatchCollection

        ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="#aaaaaa", lw=0.4))


def _resize(g: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W[, 3]) tile to (size, size[, 3])."""
    if g.shape[0] == size and g.shape[1] == size:
        return g
    yi = np.arange(size) * g.shape[0] // size
    xi = np.arange(size) * g.shape[1] // size
    return g[yi][:, xi]


def _image_grid(arr: np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 -> one square grid image (H', W') or (H', W', 3), up to 64 images."""
    n, c, h, w = arr.shape
    k = max(1, int(math.isqrt(min(n, 64))))
    imgs = arr[:k * k]
    if c not in (1, 3):
        imgs, c = imgs[:, :1], 1
    grid = np.full((c, k * (h + 1) - 1, k * (w + 1) - 1), 255, dtype=np.uint8)
    for idx in range(len(imgs)):
        y, x = divmod(idx, k)
        grid[:, y * (h + 1):y * (h + 1) + h, x * (w + 1):x * (w + 1) + w] = imgs[idx]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)
