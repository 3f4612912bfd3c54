"""The installable plugin: registration on import, mmdet-style train / test / resume through tools/, and mmdet's
analysis tools on what they write.

A process of its own where that is what is checked: importing the plugin, mmdet's own train tool loading it
through the config's ``custom_imports``, the demo's command line (``make demo``, ``make demo-mask``). Elsewhere
the tools' ``main`` and mmdet's analysis scripts run in this process, with the same arguments.
"""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_detector import load_tool, run_script

import mmdet

from mmdet_vanillanet import cpu_support
from mmdet_vanillanet.datasets import generate_synthetic_coco
from mmdet_vanillanet.demo import training_runner

ROOT = Path(__file__).resolve().parents[1]
MMDET_ANALYSIS_TOOLS = Path(mmdet.__file__).parent / '.mim' / 'tools' / 'analysis_tools'

pytestmark = pytest.mark.usefixtures('one_thread')


def run_tool(*args, cwd=ROOT):
    """``python *args`` in a process of its own: its output."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f'{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result.stdout + result.stderr


def run_main(capsys, tool, *args):
    """``tools/<tool>.py``'s ``main`` with these arguments, in this process: what it printed and logged."""
    capsys.readouterr()
    load_tool(tool).main([str(a) for a in args])
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_import_registers_everything_and_touches_no_network():
    code = textwrap.dedent('''
        import socket, threading
        def refuse(*args, **kwargs):
            raise AssertionError('importing the plugin opened a network connection')
        socket.socket.connect = refuse
        socket.create_connection = refuse
        before = threading.active_count()
        import mmdet_vanillanet
        from mmdet.registry import HOOKS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS
        assert MODELS.get('VanillaNet') is mmdet_vanillanet.models.VanillaNet
        assert HOOKS.get('ActLearnHook') is not None
        assert OPTIM_WRAPPER_CONSTRUCTORS.get('VanillaNetLayerDecayOptimizerConstructor') is not None
        assert threading.active_count() == before, 'importing the plugin started threads'
        import torch
        assert torch.serialization.get_safe_globals(), 'safe loading is not installed'
        print('registered')
    ''')
    assert 'registered' in run_tool('-c', code)


TINY_CONFIG = '''
_base_ = '{root}/configs/demo/retinanet_vanillanet_demo.py'
data_root = '{data}/'
size = (64, 64)
model = dict(test_cfg=dict(score_thr=0.0))  # an untrained model still gives detections to evaluate
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=size, keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=1)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=3))
'''


# The Mask R-CNN demo on the same tiny data: the pipelines load masks, the metric adds segm, and the images
# are upscaled to 128 px (at 64 px the RPN's stride-64 level would be a single position).
TINY_MASK_CONFIG = TINY_CONFIG.replace('retinanet_vanillanet_demo.py', 'mask-rcnn_vanillanet_demo.py').replace(
    'size = (64, 64)', 'size = (128, 128)').replace(
    "dict(type='LoadAnnotations', with_bbox=True)", "dict(type='LoadAnnotations', with_bbox=True, with_mask=True)"
).replace("model = dict(test_cfg=dict(score_thr=0.0))", "model = dict(test_cfg=dict(rcnn=dict(score_thr=0.0)))"
          ).replace("val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')",
                    "val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', "
                    "metric=['bbox', 'segm'])")


@pytest.fixture(scope='module')
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny')
    data = generate_synthetic_coco(str(root / 'data'), num_train=8, num_val=4, image_size=64, seed=0,
                                   show_progress=False)['root']
    config = root / 'tiny_retinanet.py'
    config.write_text(TINY_CONFIG.format(root=ROOT, data=data))
    (root / 'tiny_mask_rcnn.py').write_text(TINY_MASK_CONFIG.format(root=ROOT, data=data))
    return root, config


def test_train_test_and_resume_through_tools(tiny_setup, capsys):
    root, config = tiny_setup
    work_dir = root / 'work'
    log = run_main(capsys, 'train', config, '--work-dir', work_dir)
    assert (work_dir / 'epoch_1.pth').is_file()
    assert re.search(r'coco/bbox_mAP: -?\d\.\d+', log), 'validation did not run the COCO metric'

    log = run_main(capsys, 'test', config, work_dir / 'epoch_1.pth', '--work-dir', root / 'test',
                   '--out', root / 'preds.pkl')
    assert re.search(r'coco/bbox_mAP: -?\d\.\d+', log)
    # mmdet's confusion_matrix.py reads the predictions
    run_script(MMDET_ANALYSIS_TOOLS / 'confusion_matrix.py', config, root / 'preds.pkl', root / 'confusion',
               '--score-thr', '0.0')
    assert (root / 'confusion' / 'confusion_matrix.png').stat().st_size > 1000

    log = run_main(capsys, 'train', config, '--work-dir', work_dir, '--resume',
                   '--cfg-options', 'train_cfg.max_epochs=2')
    assert re.search(r'resumed epoch: 1, iter: 2', log), log[-2000:]
    assert (work_dir / 'epoch_2.pth').is_file()
    assert 'Epoch(train) [1]' not in log.replace('  ', ' '), 'the finished epoch was trained again'


@pytest.mark.parametrize('detector', ['retinanet', 'mask_rcnn'])
def test_shortened_demo_trains_evaluates_fuses_and_draws(tiny_setup, detector):
    root, _ = tiny_setup
    work_dir = root / f'demo_{detector}'
    # the command line of `make demo` / `make demo-mask`, in a process of its own (in a process that ran a
    # Runner before, mmengine hands the demo config's visualizer, named 'visualizer', that Runner's log folder)
    log = run_tool('tools/demo.py', '--config', root / f'tiny_{detector}.py', '--work-dir', work_dir,
                   '--num-train', 8, '--num-val', 4, '--image-size', 64, '--timed-images', 2,
                   '--calibration-images', 4)
    fused_map = {}
    for metric in ['bbox'] + (['segm'] if detector == 'mask_rcnn' else []):
        # evaluated before and after fusing (after one epoch on 8 images both are about 0: what fusing keeps
        # is checked by the outputs below, and on a trained detector by test_deploy_tool.py)
        fused_map[metric] = re.findall(rf'^{metric}_mAP: (\d\.\d{{3}}) ', log, flags=re.M)[1]
    deviation = float(re.search(r'largest output deviation after fusing \(relative\): (\S+)', log).group(1))
    assert deviation < 1e-4, 'fusing changed what the detector computes'
    assert re.search(r'inference time per image: \d+ ms trained structure, \d+ ms fused', log)
    # the fused checkpoint in every precision this CPU runs natively, each against fp32
    native = ['fp32'] + [name for name, ok in (('bf16', cpu_support.native_bf16()),
                                               ('int8', cpu_support.native_int8())) if ok]
    rows = re.findall(r'^fused, (\w+): bbox_mAP: (\d\.\d{3}).*, \d+ ms per image, outputs (.*)$', log, flags=re.M)
    assert [row[0] for row in rows] == native, log[-3000:]
    assert rows[0][2] == 'the reference' and rows[0][1] == fused_map['bbox']
    for name, _, deviation in rows[1:]:
        assert float(deviation.split()[0]) < (0.05 if name == 'bf16' else 0.5)
    assert (work_dir / 'predictions.png').stat().st_size > 1000
    assert f'training loss and validation mAP: {work_dir / "training_curves.png"}' in log
    assert (work_dir / 'training_curves.png').stat().st_size > 1000
    assert list((work_dir / 'deploy').glob('*_deploy.pth'))
    # mmdet's analyze_logs.py (it needs seaborn) reads the training log the LoggerHook wrote:
    # <work_dir>/<timestamp>/vis_data/<timestamp>.json
    train_logs = [p for p in work_dir.glob('*/vis_data/*.json')
                  if p.stem == p.parent.parent.name and '"loss"' in p.read_text()]
    assert len(train_logs) == 1, train_logs
    run_script(MMDET_ANALYSIS_TOOLS / 'analyze_logs.py', 'plot_curve', train_logs[0], '--keys', 'loss', 'loss_cls',
               '--backend', 'agg', '--out', work_dir / 'loss_curve.png')
    assert (work_dir / 'loss_curve.png').stat().st_size > 1000


def test_a_second_demo_in_one_process_trains_with_a_visualizer_and_log_folder_of_its_own(tmp_path):
    """mmengine hands a Runner the existing visualizer of its config's name ('visualizer'), with an earlier
    Runner's folder: a second ``run_demo`` in one process (a notebook) lost its training log to the first."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(ROOT / 'configs/demo/retinanet_vanillanet_demo.py'))
    runners = []
    for name in ('first', 'second'):
        cfg.work_dir = str(tmp_path / name)
        runners.append(training_runner(cfg))
    assert runners[0].visualizer is not runners[1].visualizer
    for runner in runners:
        (backend,) = runner.visualizer._vis_backends.values()
        assert Path(backend._save_dir).is_relative_to(runner.log_dir)


def test_mmdet_own_train_tool_trains_with_the_plugin(tiny_setup):
    """mmdet's tools/train.py (shipped in the mmdet package) on a config that carries the custom_imports line."""
    root, config = tiny_setup
    train = Path(mmdet.__file__).parent / '.mim' / 'tools' / 'train.py'
    log = run_tool(train, config, '--work-dir', root / 'mmdet_train')
    assert (root / 'mmdet_train' / 'epoch_1.pth').is_file()
    assert re.search(r'coco/bbox_mAP: -?\d\.\d+', log)
