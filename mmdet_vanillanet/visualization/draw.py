"""Drawing detection CAMs: the heat map over the image, the explained boxes, one panel per model."""
import os
import os.path as osp

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

_BOX_COLORS = ('#ffffff', '#00ff7f', '#ffd700', '#ff69b4', '#00bfff', '#ff8c00', '#adff2f', '#da70d6')


def draw_detection_cam(ax, result, title=None, alpha=0.5, cmap='jet'):
    """Draw one :class:`~mmdet_vanillanet.visualization.DetectionCAM` on a matplotlib axes.

    Args:
        ax (matplotlib.axes.Axes): where to draw.
        result (DetectionCAM): the image, map and detections.
        title (str | None): first title line (e.g. the model's name); the hooked layer follows it.
        alpha (float): opacity of the heat map.
        cmap (str): matplotlib colormap of the heat map.
    """
    ax.imshow(result.image)
    if result.cam is not None:
        ax.imshow(result.cam, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    for box, score, label in zip(result.bboxes, result.scores, result.labels):
        x1, y1, x2, y2 = box
        color = _BOX_COLORS[int(label) % len(_BOX_COLORS)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5))
        name = result.class_names[label] if label < len(result.class_names) else str(label)
        ax.text(x1, y1, f'{name} {score:.2f}', color='black', fontsize=7, va='bottom',
                bbox=dict(facecolor=color, edgecolor='none', pad=1, alpha=0.8))
    if result.cam is None:
        note = f'{result.layer}: no detection to explain'
    elif not result.cam.any():
        note = f'{result.layer}: map is zero everywhere'
    else:
        note = result.layer
    ax.set_title(f'{title}\n{note}' if title else note, fontsize=9)
    ax.set_axis_off()


def save_cam_figure(results, out_file, titles=None, panel_width=5.0, dpi=100):
    """Save detection CAMs of one image side by side (one panel per model) as an image file.

    Args:
        results (Sequence[DetectionCAM]): one per model, same image.
        out_file (str): the file to write (``.png``); its folder is created.
        titles (Sequence[str] | None): one title per panel.
        panel_width (float): width of one panel in inches.
        dpi (int): pixels per inch.
    """
    titles = list(titles) if titles is not None else [None] * len(results)
    if len(titles) != len(results):
        raise ValueError(f'{len(titles)} titles for {len(results)} panels.')
    height, width = results[0].image.shape[:2]
    fig = Figure(figsize=(panel_width * len(results), panel_width * height / width + 0.6), dpi=dpi)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, result, title in zip(axes, results, titles):
        draw_detection_cam(ax, result, title)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    fig.savefig(out_file)
