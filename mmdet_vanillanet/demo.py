"""The main job on the embedded default data: train, evaluate, fuse, evaluate again, time, draw.

``make demo`` runs :func:`run_demo` through ``tools/demo.py``. Every step uses the real components:
mmengine's Runner for training and testing, mmdet's COCO metric (pycocotools), the project's deploy
path for fusing and mmdet's visualizer for the picture.
"""
import copy
import os.path as osp
import time

import mmcv
import numpy as np
import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner

from mmdet.registry import VISUALIZERS

from .datasets import generate_synthetic_coco
from .deploy import deploy_detector
from .precision.compare import PRECISIONS, batch1_dataloader, compare_precisions, seconds_per_image
from .visualization.training_curves import plot_training_curves, training_log_file

BBOX_MAP_KEY = 'coco/bbox_mAP'
SEGM_MAP_KEY = 'coco/segm_mAP'


def _data_root(cfg):
    dataset = cfg.train_dataloader.dataset
    while 'dataset' in dataset:  # wrappers such as RepeatDataset
        dataset = dataset.dataset
    return dataset.data_root


def training_runner(cfg):
    """The Runner that trains the demo detector, without validation (the final checkpoint is tested once), with
    a visualizer of its own.

    mmengine hands a Runner the existing visualizer of the name its config gives (mmdet's and the demo's
    configs say ``'visualizer'``), and with it an earlier Runner's log folder: a second demo in one process
    (a notebook) would write its training log there. A name of its own gives each run its own folder.

    Args:
        cfg (mmengine.Config): the demo config, ``work_dir`` set; not changed.
    """
    cfg = copy.deepcopy(cfg)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    if cfg.get('visualizer'):  # without one, the Runner builds its own, named after the run
        cfg.visualizer.name = f'{cfg.visualizer.get("name", "visualizer")}_{time.time_ns()}'
    return Runner.from_cfg(cfg)


def _test_metrics(cfg, checkpoint):
    cfg = copy.deepcopy(cfg)
    cfg.load_from = checkpoint
    runner = Runner.from_cfg(cfg)
    return runner, runner.test()


@torch.no_grad()
def draw_predictions(runner, out_file, num_images=4, score_thr=0.3):
    """Draw ground truth (left) and predictions (right) of the first val images into one PNG.

    Args:
        runner (mmengine.runner.Runner): a runner whose model holds the weights to show.
        out_file (str): PNG path.
        num_images (int): images drawn, stacked vertically.
        score_thr (float): smallest score drawn.
    """
    visualizer = VISUALIZERS.build(dict(type='DetLocalVisualizer', name=f'demo_{time.time_ns()}'))
    visualizer.dataset_meta = runner.test_dataloader.dataset.metainfo
    model = runner.model.eval()
    panels = []
    for i, batch in enumerate(batch1_dataloader(runner)):
        if i >= num_images:
            break
        sample = model.test_step(batch)[0]
        image = mmcv.imread(sample.img_path, channel_order='rgb')
        visualizer.add_datasample('prediction', image, sample, draw_gt=True, pred_score_thr=score_thr)
        panels.append(visualizer.get_image())
    width = max(p.shape[1] for p in panels)
    padded = [np.pad(p, ((0, 4), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in panels]
    mmcv.imwrite(np.concatenate(padded)[..., ::-1], out_file)
    return out_file


def run_demo(config, work_dir=None, num_train=600, num_val=100, image_size=256, seed=0, cfg_options=None,
             timed_images=20, precisions=PRECISIONS, calibration_images=32):
    """Train, evaluate, fuse and re-evaluate the demo detector; return a summary dict.

    Args:
        config (str): demo config (e.g. ``configs/demo/retinanet_vanillanet_demo.py``).
        work_dir (str | None): defaults to ``work_dirs/<config name>``.
        num_train (int): synthetic training images (the data is generated once and cached).
        num_val (int): synthetic validation images (never trained on).
        image_size (int): side of the synthetic images.
        seed (int): dataset seed.
        cfg_options (dict | None): config overrides, as ``--cfg-options``.
        timed_images (int): images timed for the per-image inference figures.
        precisions (Sequence[str]): precisions the fused checkpoint is evaluated in (fp32 always; bf16 and
            int8 where the CPU runs them natively), see :func:`~mmdet_vanillanet.precision.compare.compare_precisions`.
        calibration_images (int): training images the int8 backbone is calibrated on.
    """
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.work_dir = work_dir or osp.join('work_dirs', osp.splitext(osp.basename(config))[0])
    generate_synthetic_coco(_data_root(cfg), num_train=num_train, num_val=num_val, image_size=image_size,
                            seed=seed)

    runner = training_runner(cfg)
    start = time.perf_counter()
    runner.train()
    train_seconds = time.perf_counter() - start
    train_log = training_log_file(runner)
    checkpoint = osp.join(cfg.work_dir, f'epoch_{runner.max_epochs}.pth')

    runner, metrics = _test_metrics(cfg, checkpoint)
    dataloader = batch1_dataloader(runner)
    seconds = seconds_per_image(runner.model, dataloader, timed_images)
    picture = draw_predictions(runner, osp.join(cfg.work_dir, 'predictions.png'))

    fused = deploy_detector(config if not cfg_options else _dump(cfg), checkpoint,
                            osp.join(cfg.work_dir, 'deploy'))
    by_precision = compare_precisions(fused['config'], fused['checkpoint'], osp.join(cfg.work_dir, 'deploy'),
                                      precisions, calibration_images, timed_images)
    fused_metrics, fused_seconds = by_precision['fp32']['metrics'], by_precision['fp32']['seconds_per_image']
    curves = plot_training_curves(train_log, osp.join(cfg.work_dir, 'training_curves.png'),
                                  final=dict(trained=metrics, fused=fused_metrics))

    summary = dict(
        bbox_mAP=metrics[BBOX_MAP_KEY], fused_bbox_mAP=fused_metrics[BBOX_MAP_KEY],
        segm_mAP=metrics.get(SEGM_MAP_KEY), fused_segm_mAP=fused_metrics.get(SEGM_MAP_KEY),
        train_seconds=train_seconds, seconds_per_image=seconds, fused_seconds_per_image=fused_seconds,
        max_deviation=fused['max_rel'], picture=picture, curves=curves, checkpoint=checkpoint,
        fused_checkpoint=fused['checkpoint'], fused_config=fused['config'],
        precisions={name: dict(bbox_mAP=result['metrics'][BBOX_MAP_KEY], segm_mAP=result['metrics'].get(SEGM_MAP_KEY),
                               max_rel=result['max_rel'], seconds_per_image=result['seconds_per_image'])
                    for name, result in by_precision.items()})
    print_log(format_summary(summary), logger='current')
    return summary


def _dump(cfg):
    path = osp.join(cfg.work_dir, 'demo_config.py')
    cfg.dump(path)
    return path


def format_summary(summary):
    """The closing lines of ``make demo``.

    Args:
        summary (dict): as returned by :func:`run_demo`.
    """
    segm = []
    if summary.get('segm_mAP') is not None:
        segm = [f"segm_mAP: {summary['segm_mAP']:.3f}   (trained detector, val split)",
                f"segm_mAP: {summary['fused_segm_mAP']:.3f}   (fused detector, val split)"]
    return '\n'.join([
        '',
        '================ demo summary ================',
        f"bbox_mAP: {summary['bbox_mAP']:.3f}   (trained detector, val split)",
        f"bbox_mAP: {summary['fused_bbox_mAP']:.3f}   (fused detector, val split)",
        *segm,
        f"training time: {summary['train_seconds'] / 60:.1f} min",
        f"inference time per image: {summary['seconds_per_image'] * 1000:.0f} ms trained structure, "
        f"{summary['fused_seconds_per_image'] * 1000:.0f} ms fused",
        f"largest output deviation after fusing (relative): {summary['max_deviation']:.1e}",
        *_precision_lines(summary.get('precisions') or {}),
        f"predictions (left: ground truth, right: predicted): {summary['picture']}",
        f"training loss and validation mAP: {summary['curves']}",
        f"checkpoints: {summary['checkpoint']}",
        f"             {summary['fused_checkpoint']} (config {summary['fused_config']})",
        '==============================================',
    ])


def _precision_lines(precisions):
    lines = []
    for name, result in precisions.items():
        segm = f", segm_mAP: {result['segm_mAP']:.3f}" if result.get('segm_mAP') is not None else ''
        deviation = 'the reference' if name == 'fp32' else f"{result['max_rel']:.1e} from fp32"
        lines.append(f"fused, {name}: bbox_mAP: {result['bbox_mAP']:.3f}{segm}, "
                     f"{result['seconds_per_image'] * 1000:.0f} ms per image, outputs {deviation}")
    return lines
