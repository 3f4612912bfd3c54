"""What a benchmark run measures: the groups, the options (VanillaNet defaults from the RetinaNet recipe
config), the names of the rows the targets are read from, and the targets."""
from dataclasses import dataclass

from .benchmark_models import recipe_backbone

GROUPS = ('complexity', 'backbone', 'detector', 'onnx', 'training', 'precision')
# Targets of the speed issue, checked (and printed) on the backbone rows.
TARGET_BOUND_RATIO = 1.3
TARGET_SPEEDUP = 1.7
# Targets of the reduced-precision issue: speed-ups over the same model in fp32.
TARGET_BF16_SPEEDUP = 3.0
TARGET_INT8_SPEEDUP = 5.0

FAST_ROW = 'fused, oneDNN blocked (default)'
TRAIN_ROW = 'training structure (channels_last, default)'


@dataclass
class BenchmarkOptions:
    """What to measure; see ``tools/benchmark.py --help`` for each field.

    ``arch``, ``act_num`` and ``out_indices`` default (None) to the backbone of
    ``configs/retinanet_vanillanet13_1x.py``.
    """

    shape: tuple = (800, 1216)
    batch: int = 1
    device: str = 'cpu'
    threads: int = None
    warmup: int = 1
    repeats: int = 5
    only: tuple = GROUPS
    baselines: tuple = ('r50', 'swin-t')
    detectors: tuple = ('retinanet', 'mask-rcnn')
    compile: bool = False
    gemm_size: int = 4096
    arch: str = None
    act_num: int = None
    out_indices: tuple = None
    train_shape: tuple = (320, 480)
    train_batch: int = 2
    train_steps: int = 2
    train_rounds: int = 2
    onnx_dir: str = None
    command: str = ''

    def __post_init__(self):
        # the VanillaNet of configs/retinanet_vanillanet13_1x.py unless told otherwise
        recipe = recipe_backbone('retinanet')
        self.arch = recipe['arch'] if self.arch is None else self.arch
        self.act_num = recipe['act_num'] if self.act_num is None else self.act_num
        self.out_indices = tuple(recipe['out_indices'] if self.out_indices is None else self.out_indices)

    @property
    def is_recipe_backbone(self):
        """Whether the measured VanillaNet is the recipe config's (its arch and act_num)."""
        recipe = recipe_backbone('retinanet')
        return self.arch == recipe['arch'] and self.act_num == recipe['act_num']
