"""Runner parts: layer-wise lr decay, the act_learn (deep training) schedule, exact resume, strict loading."""
from .act_learn_hook import ActLearnHook
from .layer_decay import VanillaNetLayerDecayOptimizerConstructor
from .rng_state_hook import RandomStateHook
from .strict_load_hook import StrictLoadHook

__all__ = ['ActLearnHook', 'RandomStateHook', 'StrictLoadHook', 'VanillaNetLayerDecayOptimizerConstructor']
