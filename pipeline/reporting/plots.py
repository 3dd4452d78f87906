"""Figures written as PNG (offline reviewers cannot load DVC's Vega-from-CDN plots).

Figures are matplotlib ``Figure`` objects rendered by Agg directly, never through pyplot:
no display is needed, no global backend is chosen on import, and no figure outlives its
function. Each function writes one file atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.files import write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(rows: int = 1, cols: int = 1, figsize: tuple[float, float] = (4.2, 4), squeeze: bool = True):
    """A figure and its axes (as ``plt.subplots`` returns them), without pyplot's global state.

    matplotlib (30 MB) is imported here, when a figure is drawn, not when a stage starts: the
    train stage draws its curves after training, so they never add to its peak memory.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def save_figure(fig: Figure, path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    write_bytes(path, buffer.getvalue())


def plot_history(history: Sequence[dict[str, float]], path: str | Path) -> None:
    """Training and validation loss and AUC per epoch; with a ``fold`` column (cross-validation),
    one pair of lines per fold, validated on its own held-out fold."""
    folds = sorted({row["fold"] for row in history}) if history and "fold" in history[0] else [None]
    fig, axes = new_figure(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ("loss", "roc_auc")):
        for fold in folds:
            rows = [row for row in history if fold is None or row["fold"] == fold]
            epochs = [row["epoch"] for row in rows]
            for split, style in (("train", "-o"), ("val", "-s")):
                values = [row[f"{split}_{key}"] for row in rows]
                ax.plot(epochs, [np.nan if v is None else v for v in values], style, ms=3,
                        label=split if fold is None else f"fold {fold:g} {split}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path) -> None:
    """One ROC curve per name: (fpr, tpr, auc)."""
    fig, ax = new_figure(figsize=(4.2, 4))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def plot_decision_curve(rows: Sequence[dict[str, float]], operating: float | None, path: str | Path) -> None:
    """Net benefit of the model, treat-all and treat-none over threshold probabilities, the
    frozen operating threshold marked (see :mod:`pipeline.evaluation.decision_curve`); without
    rows (a multi-class task, decided by arg-max), a figure that says so."""
    fig, ax = new_figure(figsize=(5, 3.6))
    if not rows:
        ax.text(0.5, 0.5, "no decision curve:\nthe task is decided by arg-max, not at a threshold", ha="center",
                va="center")
        ax.set_axis_off()
        save_figure(fig, path)
        return
    t = np.array([r["threshold"] for r in rows])
    ax.plot(t, [r["model"] for r in rows], label="model")
    ax.plot(t, [r["treat_all"] for r in rows], "--", color="grey", label="treat all")
    ax.plot(t, [r["treat_none"] for r in rows], ":", color="black", label="treat none")
    ax.axvline(operating, color="tab:red", alpha=0.6, label=f"operating threshold {operating:.3g}")
    top = max(max(r["model"] for r in rows), max(r["treat_all"] for r in rows), 0.01)
    ax.set_ylim(-0.05 * top - 0.01, top * 1.1)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path) -> None:
    cm = np.asarray(matrix)
    fig, ax = new_figure(figsize=(1.2 + 0.7 * len(cm), 1 + 0.7 * len(cm)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), value in np.ndenumerate(cm):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > cm.max() / 2 else "black")
    ax.set_xticks(range(len(cm)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(cm)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    save_figure(fig, path)


def plot_confusions(panels: Sequence[tuple[str, Sequence[Sequence[int]], Sequence[str]]], path: str | Path) -> None:
    """One confusion matrix (:func:`plot_confusion`), or a row of titled ones: one per finding."""
    if len(panels) == 1:
        plot_confusion(panels[0][1], panels[0][2], path)
        return
    fig, axes = new_figure(1, len(panels), figsize=(2.4 * len(panels), 2.6), squeeze=False)
    for number, (ax, (title, matrix, names)) in enumerate(zip(axes[0], panels)):
        cm = np.asarray(matrix)
        ax.imshow(cm, cmap="Blues")
        for (i, j), value in np.ndenumerate(cm):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > cm.max() / 2 else "black")
        ax.set_xticks(range(len(cm)), names)
        ax.set_yticks(range(len(cm)), names if number == 0 else [])  # the rows are the same in every panel
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("decided")
    axes[0][0].set_ylabel("true")
    save_figure(fig, path)


def thumbnail(image: np.ndarray) -> np.ndarray:
    """What ``imshow`` gets for an H×W×C image or a D×H×W×C volume (its middle axial slice):
    H×W for grayscale, H×W×3 for RGB."""
    image = image[len(image) // 2] if image.ndim == 4 else image
    return image[..., 0] if image.shape[2] == 1 else image


VIEWS = ("axial", "coronal", "sagittal")


def sections(volume: np.ndarray, point: tuple[int, ...]) -> list[np.ndarray]:
    """The axial, coronal and sagittal slices of a D×H×W(…) volume through ``point`` (z, y, x)."""
    z, y, x = point
    return [volume[z], volume[:, y], volume[:, :, x]]


def plot_volume_attributions(volume: np.ndarray, maps: dict[str, np.ndarray], title: str, path: str | Path,
                             mask: np.ndarray | None = None, marker: np.ndarray | None = None) -> None:
    """A volume and each method's map, as a reviewer reads a scan: three orthogonal slices.

    Row 1: the volume's axial, coronal and sagittal slices through the lesion centre (the
    mask's centre of mass; the volume centre without a lesion), lesion outline in green,
    and its maximum-intensity projection. Then per method: the three slices through the map's
    peak, the three through the lesion centre (only with a lesion), and the map's maximum
    projection along the axial axis. ``volume`` is D×H×W×C in [0, 1]; maps are D×H×W, each
    scaled to its own maximum |value|; ``marker`` the shortcut marker's voxels.
    """
    gray = volume.mean(axis=3)
    lesion = mask is not None and mask.any()
    centre = (tuple(int(round(c)) for c in np.argwhere(mask > 0).mean(axis=0)) if lesion
              else tuple(n // 2 for n in gray.shape))
    cols = 7 if lesion else 4
    fig, axes = new_figure(1 + len(maps), cols, figsize=(1.5 * cols, 1.6 * (1 + len(maps))), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def outline(ax, index: int, point: tuple[int, ...]) -> None:
        for region, colour in ((mask if lesion else None, "lime"), (marker, "orange")):
            if region is not None and region.any():
                plane = sections(region.astype(np.uint8), point)[index]
                if plane.any():
                    ax.contour(plane, levels=[0.5], colors=colour, linewidths=0.6)

    for k, plane in enumerate(sections(gray, centre)):
        axes[0, k].imshow(plane, cmap="gray", vmin=0, vmax=1)
        axes[0, k].set_title(f"{VIEWS[k]} (lesion centre)" if lesion else VIEWS[k], fontsize=6)
        outline(axes[0, k], k, centre)
    axes[0, cols - 1].imshow(gray.max(axis=0), cmap="gray", vmin=0, vmax=1)
    axes[0, cols - 1].set_title("image MIP (axial)", fontsize=6)
    for r, (name, attribution) in enumerate(maps.items(), start=1):
        scaled = attribution / (float(np.abs(attribution).max()) or 1.0)
        peak = tuple(int(i) for i in np.unravel_index(np.argmax(attribution), attribution.shape))
        for offset, point in ((0, peak), (3, centre)) if lesion else ((0, peak),):
            for k, (plane, overlay) in enumerate(zip(sections(gray, point), sections(scaled, point))):
                ax = axes[r, offset + k]
                ax.imshow(plane, cmap="gray", vmin=0, vmax=1)
                ax.imshow(overlay, cmap="bwr", vmin=-1, vmax=1, alpha=0.55)
                ax.set_title(f"{VIEWS[k]}, {'peak' if offset == 0 else 'lesion'}", fontsize=6)
                outline(ax, k, point)
        axes[r, cols - 1].imshow(np.abs(scaled).max(axis=0), cmap="magma", vmin=0, vmax=1)
        axes[r, cols - 1].set_title("|map| MIP (axial)", fontsize=6)
        axes[r, 0].text(-0.12, 0.5, name, transform=axes[r, 0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=7)
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path)


def plot_attributions(image: np.ndarray, maps: dict[str, np.ndarray], title: str, path: str | Path,
                      mask: np.ndarray | None = None, marker: tuple[int, int, int, int] | None = None) -> None:
    """The image, then each method's map blended over it; lesion outline and marker box where known.

    ``image`` is H×W×C in [0, 1]; each map is H×W, normalised here to its own maximum
    absolute value so methods with different scales can be read side by side.
    """
    gray = image.mean(axis=2) if image.shape[2] == 3 else image[..., 0]
    shown = image if image.shape[2] == 3 else gray
    cols = 1 + len(maps)
    fig, axes = new_figure(1, cols, figsize=(2.0 * cols, 2.4))
    axes[0].imshow(shown, cmap=None if image.shape[2] == 3 else "gray", vmin=0, vmax=1)
    axes[0].set_title("image", fontsize=8)
    for ax, (name, attribution) in zip(axes[1:], maps.items()):
        scale = float(np.abs(attribution).max()) or 1.0
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        ax.imshow(attribution / scale, cmap="bwr", vmin=-1, vmax=1, alpha=0.55)
        ax.set_title(name, fontsize=8)
    for ax in axes:
        if mask is not None and mask.any():
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
        if marker is not None:
            top, bottom, left, right = marker
            from matplotlib.patches import Rectangle

            ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                       edgecolor="orange", linewidth=0.8))
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path)


def plot_faithfulness(curves: dict[str, dict], path: str | Path) -> None:
    """Mean deletion and insertion curves per method (dashed: random pixel order)."""
    fig, axes = new_figure(1, 2, figsize=(9, 3.3))
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for name, row in curves.items():
            curve = row[f"{kind}_curve"]
            x = np.linspace(0, 1, len(curve))
            ax.plot(x, curve, "--" if name == "random" else "-", color="black" if name == "random" else None,
                    label=f"{name} ({row[f'{kind}_auc']:.3f})")
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("probability of the explained class")
        ax.set_title(f"{kind} (area; {'lower' if kind == 'deletion' else 'higher'} is better)", fontsize=9)
        ax.legend(fontsize=6)
    save_figure(fig, path)


def plot_feature_maps(layers: list[tuple[str, np.ndarray]], path: str | Path, channels: int = 8) -> None:
    """The first ``channels`` activation maps of each conv layer for one image (volumes: the middle axial slice)."""
    fig, axes = new_figure(len(layers), channels, figsize=(1.3 * channels, 1.4 * len(layers)), squeeze=False)
    for r, (name, maps) in enumerate(layers):
        for c in range(channels):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(maps):
                ax.imshow(maps[c][len(maps[c]) // 2] if maps[c].ndim == 3 else maps[c], cmap="viridis")
        axes[r, 0].set_title(name, fontsize=7, loc="left")
    save_figure(fig, path)


def plot_class_images(images: dict[str, np.ndarray], path: str | Path) -> None:
    """Gradient-ascent images, one per class."""
    fig, axes = new_figure(1, len(images), figsize=(2.2 * len(images), 2.4), squeeze=False)
    for ax, (name, image) in zip(axes[0], images.items()):
        ax.imshow(thumbnail(image), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    save_figure(fig, path)


def plot_pr(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> None:
    """One precision-recall curve per name: (recall, precision)."""
    fig, ax = new_figure(figsize=(4.2, 4))
    for name, (recall, precision) in curves.items():
        ax.plot(recall, precision, label=name)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    save_figure(fig, path)


def plot_calibration(reliability: dict[str, list[dict[str, float]]], summary: dict, path: str | Path) -> None:
    """Reliability diagram before and after calibration, with ECE in the legend."""
    fig, ax = new_figure(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect")
    for when, rows in reliability.items():
        ece = summary[when]["ece"]
        ax.plot([r["predicted"] for r in rows], [r["observed"] for r in rows], "-o", ms=3, label=f"{when} (ECE {ece:.3f})")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def plot_failures(images: np.ndarray, failures: dict[str, list[dict]], path: str | Path) -> None:
    """Thumbnails of the most confident mistakes, one row per kind, with their scores."""
    kinds = [k for k, rows in failures.items() if rows] or list(failures)
    cols = max([len(failures[k]) for k in kinds] + [1])
    fig, axes = new_figure(len(kinds), cols, figsize=(1.9 * cols, 2.2 * len(kinds)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, kind in enumerate(kinds):
        for c, row in enumerate(failures[kind]):
            axes[r, c].imshow(thumbnail(images[row["index"]]), cmap="gray", vmin=0, vmax=255)
            axes[r, c].set_title(f"{row['id']}\n{row['label']}→{row['predicted']} {row['score']:.2f}", fontsize=7)
        axes[r, 0].text(-0.1, 0.5, kind.replace("_", " "), transform=axes[r, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=8)
    save_figure(fig, path)


def plot_robustness(robustness: dict, path: str | Path) -> None:
    """Test ROC AUC against corruption severity, one line per corruption, clean dashed."""
    fig, ax = new_figure(figsize=(5.2, 3.6))
    clean = robustness["clean"]["roc_auc"]
    for name, levels in robustness["corruptions"].items():
        severities = [0, *map(int, levels)]
        values = [clean, *[row["roc_auc"] for row in levels.values()]]
        ax.plot(severities, [np.nan if v is None else v for v in values], "-o", ms=3, label=name)
    if clean is not None:
        ax.axhline(clean, color="k", ls="--", lw=0.8)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("test ROC AUC")
    ax.grid(alpha=0.3)
    if robustness["corruptions"]:
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_forest(rows: Sequence[tuple[str, float | None, float | None, float | None]], pooled: float | None,
                label: str, path: str | Path) -> None:
    """A forest plot: one estimate with its 95% CI per site (top to bottom), the pooled estimate dashed."""
    fig, ax = new_figure(figsize=(5.2, 0.5 + 0.45 * max(len(rows), 1)))
    for y, (name, value, low, high) in enumerate(reversed(rows)):
        if value is None:
            continue
        if low is not None and high is not None:
            ax.plot([low, high], [y, y], color="k", lw=1)
        ax.plot([value], [y], "s", color="tab:blue", ms=5)
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=8)
    if pooled is not None:
        ax.axvline(pooled, color="grey", ls="--", lw=0.8)
    ax.set_xlabel(label)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
