"""The deep-training schedule of VanillaNet's activations, as an mmengine hook."""
from typing import Optional, Sequence

from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log

from mmdet.registry import HOOKS

from ..detectors import find_vanillanets

META_KEY = 'act_learn'


@HOOKS.register_module()
class ActLearnHook(Hook):
    """Set ``act_learn`` of every VanillaNet in the model before each training iteration.

    Deep training (VanillaNet paper): the activation ``leaky_relu(x, act_learn)`` starts as ReLU
    (``act_learn = 0``, the paper's lambda = 1) and turns linearly into the identity
    (``act_learn = 1``, lambda = 0) between ``start`` and ``end``; it stays at 0 before ``start``
    and at 1 from ``end`` on. Only then can each block's two 1x1 convs be merged for deployment.

    The value is a pure function of the number of finished training iterations, so a resumed
    run gets exactly the values of an uninterrupted one. With ``by_epoch=True`` the progress is
    measured in epochs *with the fraction of the current epoch*, ``runner.iter /
    len(train_dataloader)``: the value rises a little every iteration instead of jumping once per
    epoch as in the reference code (which set it at each epoch's start). It is set on the
    training model and on the averaged copy of an ``EMAHook`` (a plain float attribute is not
    averaged, so the copy would otherwise keep its value from creation time), and logged as
    ``train/act_learn`` so it appears in the training log lines.

    Validation during training runs with the current value. Because weights trained with
    ``act_learn < 1`` are only valid with that value, ``before_save_checkpoint`` stores the model's
    value in ``checkpoint['meta']['act_learn']`` and ``after_load_checkpoint`` sets it back: mmengine
    calls that hook from ``Runner.load_checkpoint``, which serves ``load_from`` in train, val and
    test runs and ``Runner.resume``, so a config that keeps this hook in ``custom_hooks`` tests a
    mid-schedule checkpoint with the value it was trained with (on resume the schedule then takes
    over again, with the same value). Code that loads the checkpoint without this hook gets the
    backbone's default (1.0).

    Priority ``ABOVE_NORMAL``: runs before ``EMAHook`` (``NORMAL``) at every stage, and the value
    is set in ``before_train_iter``, before the iteration's forward pass and EMA update.

    Args:
        end (int | float): Epoch (``by_epoch=True``) or iteration at which ``act_learn`` reaches 1.
            The paper uses 100 of 300 ImageNet epochs.
        start (int | float): Epoch or iteration at which the rise from 0 begins. Defaults to 0.
        by_epoch (bool): Whether ``start`` and ``end`` count epochs (of ``len(train_dataloader)``
            iterations) or iterations. Defaults to True.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, end: float, start: float = 0, by_epoch: bool = True):
        if start < 0:
            raise ValueError(f'ActLearnHook start must be >= 0, got {start}.')
        if end <= start:
            raise ValueError(f'ActLearnHook end must be greater than start, got start={start}, '
                             f'end={end}.')
        self.start = start
        self.end = end
        self.by_epoch = by_epoch

    def value_at(self, progress: float) -> float:
        """``act_learn`` after ``progress`` epochs (``by_epoch``) or iterations of training."""
        if progress <= self.start:
            return 0.
        if progress >= self.end:
            return 1.
        return (progress - self.start) / (self.end - self.start)

    def current_value(self, runner) -> float:
        """``act_learn`` for the runner's next training iteration."""
        progress = runner.iter
        if self.by_epoch:
            progress = runner.iter / len(runner.train_dataloader)
        return self.value_at(progress)

    def before_train(self, runner) -> None:
        value = self.current_value(runner)
        models = self._models(runner)
        if value < 1 and any(m.deploy for m in models):
            raise ValueError('ActLearnHook cannot train a VanillaNet in deploy structure '
                             f'(act_learn would be {value:g} < 1, which deploy cannot represent); '
                             'train the training structure (deploy=False).')
        unit = 'epoch' if self.by_epoch else 'iteration'
        print_log(f'ActLearnHook: act_learn rises 0 -> 1 from {unit} {self.start} to {self.end}; '
                  f'now {value:g} on {len(models)} VanillaNet module(s).', logger='current')
        self._set(models, value)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        value = self.current_value(runner)
        self._set(self._models(runner), value)
        runner.message_hub.update_scalar('train/act_learn', value)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        models = find_vanillanets(runner.model)
        if models:
            checkpoint.setdefault('meta', {})[META_KEY] = float(models[0].act_learn)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        value: Optional[float] = checkpoint.get('meta', {}).get(META_KEY)
        if value is None:
            return
        self._set(self._models(runner), value)
        print_log(f'ActLearnHook: set act_learn={value:g} stored in the checkpoint.',
                  logger='current')

    def _models(self, runner) -> list:
        """The VanillaNets of the training model and of any EMA copy of it."""
        models = find_vanillanets(runner.model)
        if not models:
            raise RuntimeError('ActLearnHook found no VanillaNet in the model; remove the hook '
                               'from custom_hooks or use a VanillaNet backbone.')
        for hook in runner.hooks:
            ema_model = getattr(hook, 'ema_model', None) if isinstance(hook, EMAHook) else None
            if ema_model is not None:
                models += find_vanillanets(ema_model.module)
        return models

    @staticmethod
    def _set(models: Sequence, value: float) -> None:
        for model in models:
            model.act_learn = value
