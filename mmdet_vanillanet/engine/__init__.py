"""Training-time parts: layer-wise lr decay, the act_learn (deep training) schedule, exact resume."""
from .act_learn_hook import ActLearnHook
from .layer_decay import VanillaNetLayerDecayOptimizerConstructor
from .rng_state_hook import RandomStateHook

__all__ = ['ActLearnHook', 'RandomStateHook', 'VanillaNetLayerDecayOptimizerConstructor']
