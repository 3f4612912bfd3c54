"""mmengine hooks that put reduced precision into the Runner's val / test loops, and the config entries that
add them (what ``--bf16`` / ``--int8`` of the tools do)."""
from contextlib import ExitStack

from mmengine.hooks import Hook
from mmengine.logging import print_log

from mmdet.registry import HOOKS

from .. import cpu_support
from ..checkpoint.safe_load import check_checkpoint_file
from .bf16 import add_fp32_borders, bf16_available, runs_on_cpu
from .channels_last import channels_last_detector
from .int8 import load_calibration, replace_with_int8


@HOOKS.register_module()
class Fp32PostprocessHook(Hook):
    """Keeps box decoding, NMS, RoIAlign and mask pasting in fp32 while a val / test loop runs under autocast.

    Add it to ``custom_hooks``; with ``test_cfg = dict(type='TestLoop', fp16=True)`` (or ``val_cfg``) on a CPU
    the loop's bf16 autocast then runs whole detectors (see :mod:`mmdet_vanillanet.precision.bf16`). It does
    nothing for loops without ``fp16``. ``tools/test.py`` adds it whenever the test loop has ``fp16``.

    Args:
        channels_last (bool): on a CPU, run the necks and heads in channels-last memory format during the loop
            (:func:`mmdet_vanillanet.precision.channels_last.channels_last_detector`). Default: True.
    """

    priority = 'VERY_LOW'

    def __init__(self, channels_last=True):
        self.channels_last = channels_last
        self._undo = ExitStack()

    def _add(self, runner, loop):
        if not getattr(loop, 'fp16', False):
            return
        if self.channels_last and runs_on_cpu(runner.model):
            self._undo.enter_context(channels_last_detector(runner.model))
        for handle in add_fp32_borders(runner.model):
            self._undo.callback(handle.remove)

    def _remove(self):
        self._undo.close()

    def before_val(self, runner):
        self._add(runner, runner.val_loop)

    def after_val(self, runner):
        self._remove()

    def before_test(self, runner):
        self._add(runner, runner.test_loop)

    def after_test(self, runner):
        self._remove()


@HOOKS.register_module()
class Int8BackboneHook(Hook):
    """Before testing, swaps the detector's VanillaNet for its int8 copy rebuilt from a calibration file.

    The trained (or fused) weights are loaded first (``load_from``), then quantized with the file's
    statistics (:func:`mmdet_vanillanet.precision.int8.replace_with_int8`). ``tools/test.py --int8 FILE`` adds it.

    Args:
        calibration (str): the file written by ``tools/quantize.py``.
    """

    priority = 'LOW'

    def __init__(self, calibration):
        self.calibration = calibration

    def before_test(self, runner):
        print_log(f'int8: rebuilding the quantized backbone from {self.calibration}', logger='current')
        replace_with_int8(runner.model, load_calibration(self.calibration))


def configure_test_precision(cfg, bf16=False, int8=None):
    """Make ``cfg``'s test loop run in bf16 and / or with an int8 backbone, where this CPU supports it.

    bf16 sets ``test_cfg.fp16`` (mmengine's autocast, bf16 on a CPU). Whenever the test loop has ``fp16``
    (from here or from ``--cfg-options test_cfg.fp16=True``), :class:`Fp32PostprocessHook` is added so that
    post-processing runs in fp32. int8 adds :class:`Int8BackboneHook`. On a CPU without native support for
    a precision, that precision is left out with one warning.

    Args:
        cfg (mmengine.Config): the config, changed in place.
        bf16 (bool): bf16 autocast.
        int8 (str | None): a calibration file of ``tools/quantize.py``.
    """
    hooks = list(cfg.get('custom_hooks') or [])
    if bf16 and bf16_available(what='--bf16'):
        cfg.test_cfg = dict(cfg.get('test_cfg') or dict(type='TestLoop'), fp16=True)
    if (cfg.get('test_cfg') or {}).get('fp16') and not any(h.get('type') == 'Fp32PostprocessHook' for h in hooks):
        hooks.append(dict(type='Fp32PostprocessHook'))
    if int8:
        check_checkpoint_file(int8)
        if cpu_support.native_int8():
            hooks.append(dict(type='Int8BackboneHook', calibration=int8))
        else:
            cpu_support.warn_once(f'--int8: no native int8 on this CPU ({cpu_support.describe()}); running the '
                                  'backbone in fp32 instead of emulating int8.')
    cfg.custom_hooks = hooks
    return cfg
