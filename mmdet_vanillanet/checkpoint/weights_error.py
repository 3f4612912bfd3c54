"""The error of weights that do not fit a VanillaNet, and how messages about weights list keys."""

SHOWN_KEYS = 5


class VanillaNetWeightsError(ValueError):
    """A checkpoint does not fit a VanillaNet; the message names the likely cause and the fix."""


def first_keys(keys, n=SHOWN_KEYS):
    """The first ``n`` of ``keys`` as one string, with the total when there are more (for messages)."""
    keys = list(keys)
    shown = ', '.join(map(str, keys[:n]))
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > n else '') if keys else 'none'
