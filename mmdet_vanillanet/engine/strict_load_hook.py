"""Strict loading of ``load_from`` inside mmengine's own flow, where every other hook sees the checkpoint too."""
from mmengine.hooks import Hook

from mmdet.registry import HOOKS

from ..checkpoint.state_dict_selection import strip_module_prefix
from ..detectors import check_detector_state_dict


@HOOKS.register_module()
class StrictLoadHook(Hook):
    """Refuse a checkpoint whose keys or shapes differ from the model's, before mmengine loads it.

    mmengine's ``Runner`` loads ``load_from`` non-strictly: a key of the neck or head that is missing, or
    has another shape, would only be warned about and keep its random value. This hook checks every
    checkpoint the runner loads, in ``after_load_checkpoint``, i.e. after the other hooks' ``before_run``
    (an ``EMAHook`` has built its averaged model) and before the weights go into the model. With
    ``priority='VERY_HIGH'`` it runs before the other hooks' ``after_load_checkpoint``.
    ``tools/test.py`` registers it.

    Args:
        source (str | None): how messages name the checkpoint; None: the runner's ``load_from``.
    """

    priority = 'VERY_HIGH'

    def __init__(self, source=None):
        self.source = source

    def after_load_checkpoint(self, runner, checkpoint):
        """Raise :class:`~mmdet_vanillanet.checkpoint.VanillaNetWeightsError` unless ``checkpoint`` fits.

        Args:
            runner (mmengine.runner.Runner): the runner loading it.
            checkpoint (dict): the loaded checkpoint (``state_dict`` as mmengine reads it, or a bare one).
        """
        state_dict = checkpoint.get('state_dict', checkpoint)
        state_dict, _ = strip_module_prefix(state_dict)  # mmengine's default revise_keys
        source = self.source or runner.cfg.get('load_from') or 'the checkpoint'
        check_detector_state_dict(runner.model, state_dict, source=str(source))
