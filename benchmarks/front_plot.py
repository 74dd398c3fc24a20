"""The accuracy-size front of benchmarks/front.py's rows: one point per plan (mean over seeds, with the seed spread),
the measured references, and the front through the points no other point beats on both size and mAP."""

from __future__ import annotations

from pathlib import Path


def summarize(rows: list[dict], sizes: list[int]) -> list[dict]:
    """Per plan (in first-seen order): deployable MB (mean over seeds), mean mAP50-95 at each size, the seeds'
    values, min and max."""
    plans: dict[str, list[dict]] = {}
    for r in rows:
        plans.setdefault(r["plan"], []).append(r)
    out = []
    for plan, rs in plans.items():
        row = {"plan": plan, "seeds": [r["seed"] for r in rs], "MB": sum(r["bytes"] for r in rs) / len(rs) / 1e6}
        for s in sizes:
            vals = [r[f"mAP50-95@{s}"] for r in rs]
            row.update({f"mean@{s}": sum(vals) / len(vals), f"min@{s}": min(vals), f"max@{s}": max(vals),
                        f"seeds@{s}": " / ".join(f"{v:.4f}" for v in vals)})
        out.append(row)
    return out


def front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (size, accuracy) that no other point beats: none is as small and more accurate, or
    smaller and as accurate. Ordered by size."""
    keep = [i for i, (mb, acc) in enumerate(points)
            if not any((m2 <= mb and a2 > acc) or (m2 < mb and a2 >= acc) for m2, a2 in points)]
    return sorted(keep, key=lambda i: points[i][0])


def label_below(pts: list[tuple[float, float]], dx_log: float = 0.15, dy: float = 0.012) -> list[bool]:
    """For each (MB, mAP) point, whether its label goes below it: when another point sits close to its right (within
    `dx_log` in log10 MB and `dy` in mAP), where the label would run into that point's label."""
    import math

    return [any(0 <= math.log10(b[0] / a[0]) < dx_log and abs(b[1] - a[1]) < dy for j, b in enumerate(pts) if j != i)
            for i, a in enumerate(pts)]


def plot_front(summary: list[dict], size: int, path: Path) -> Path:
    """mAP50-95 at `size` against deployable MB: a marker per plan with its seed range, the front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    pts = [(r["MB"], r[f"mean@{size}"]) for r in summary]
    for r, (mb, acc), below in zip(summary, pts, label_below(pts)):
        ref = r["seeds"] == [None]
        err = [[acc - r[f"min@{size}"]], [r[f"max@{size}"] - acc]]
        ax.errorbar(mb, acc, yerr=err, fmt="s" if ref else "o", color="gray" if ref else None, capsize=3)
        ax.annotate(r["plan"], (mb, acc), textcoords="offset points", xytext=(5, -11 if below else 4), fontsize=8)
    best = front(pts)
    ax.plot([pts[i][0] for i in best], [pts[i][1] for i in best], "--", color="black", lw=1, label="front")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = min(p[0] for p in pts), max(p[0] for p in pts)
    ax.xaxis.set_major_locator(FixedLocator([t for t in (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100)
                                             if lo / 1.3 <= t <= hi * 1.3]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))  # plain MB numbers, not powers of ten
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("deployable file (MB, log scale)")
    ax.set_ylabel(f"mAP50-95 at {size} (coco128 val half)")
    ax.set_title("yolo11n: accuracy against file size (mean of seeds; bars: seed range)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
