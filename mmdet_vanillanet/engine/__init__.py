"""Training-time parts: layer-wise lr decay and the act_learn (deep training) schedule."""
from .act_learn_hook import ActLearnHook
from .layer_decay import VanillaNetLayerDecayOptimizerConstructor

__all__ = ['ActLearnHook', 'VanillaNetLayerDecayOptimizerConstructor']
from .rng_state_hook import RandomStateHook  # noqa: F401,E402
