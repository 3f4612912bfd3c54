"""Training curves from mmengine's scalar log: the training loss per iteration, the validation mAP per epoch.

mmengine's ``LoggerHook`` writes one JSON dict a line to ``<work_dir>/<timestamp>/vis_data/<timestamp>.json``:
training records (``loss``, ``lr``, ..., ``epoch``, ``iter``, ``step``) and, after each validation,
the metrics (``coco/bbox_mAP``, ...) with the epoch as ``step``. The figure is drawn with matplotlib's
object API (no pyplot state, no display needed).
"""
import json
import os.path as osp

from matplotlib.figure import Figure

MAP_KEYS = ('coco/bbox_mAP', 'coco/segm_mAP')


def training_log_file(runner):
    """The scalar log a runner's ``LoggerHook`` writes: ``<log_dir>/vis_data/<timestamp>.json``.

    Args:
        runner (mmengine.runner.Runner): the (training) runner.
    """
    return osp.join(runner.log_dir, 'vis_data', f'{runner.timestamp}.json')


def read_scalar_log(path):
    """The training and the validation records of an mmengine scalar log.

    Args:
        path (str): the ``.json`` log (one dict per line).

    Returns:
        tuple[list[dict], list[dict]]: records with a ``loss`` (training) and the others (validation).
    """
    train, val = [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                (train if 'loss' in record else val).append(record)
    return train, val


def plot_training_curves(log_file, out_file, final=None, map_keys=MAP_KEYS):
    """Draw the training loss (left) and the validation mAP (right) of a training run into one PNG.

    Args:
        log_file (str): the run's scalar log (:func:`training_log_file`).
        out_file (str): the PNG to write.
        final (dict[str, dict] | None): evaluations after training, by label (e.g. ``{'trained': metrics,
            'fused': fused_metrics}``, metrics as ``Runner.test()`` returns them); drawn as points at the
            last epoch. Default: None.
        map_keys (Sequence[str]): the metrics drawn on the right. Default: bbox and segm mAP.

    Returns:
        str: ``out_file``.
    """
    train, val = read_scalar_log(log_file)
    if not train:
        raise ValueError(f'{log_file} holds no training records (no "loss"): is it the log of a training run?')
    figure = Figure(figsize=(11, 4), layout='constrained')
    loss_axes, map_axes = figure.subplots(1, 2)
    loss_axes.plot([r['step'] for r in train], [r['loss'] for r in train], linewidth=1)
    loss_axes.set(xlabel='iteration', ylabel='loss', title='training loss')
    last_epoch = max(r['epoch'] for r in train)
    for key in map_keys:
        points = [(r['step'], r[key]) for r in val if key in r]
        if points:
            map_axes.plot(*zip(*points), marker='o', label=f'{key.split("/")[-1]}, validation')
        for label, metrics in (final or {}).items():
            if key in metrics:
                map_axes.scatter([last_epoch], [metrics[key]], marker='*', s=120,
                                 label=f'{key.split("/")[-1]}, {label} ({metrics[key]:.3f})')
    map_axes.set(xlabel='epoch', ylabel='mAP', title='validation mAP', xlim=(0, last_epoch + 1), ylim=(0, 1))
    if map_axes.has_data():
        map_axes.legend(loc='lower right')
    figure.savefig(out_file, dpi=100)
    return out_file
