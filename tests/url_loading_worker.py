"""One process of a distributed (gloo) run that loads checkpoint URLs, for tests/test_untrusted_files.py.

    python url_loading_worker.py RANK WORLD_SIZE PORT OUT_JSON URL [URL ...]

Loads every URL in turn through mmengine's ``CheckpointLoader`` (the plugin's safe loader) and writes, per
URL, what happened: ``loaded <top-level keys>`` or ``<error type>: <message>``. Not a test module.
"""
import json
import sys

import torch.distributed as dist
from mmengine.runner import CheckpointLoader

import mmdet_vanillanet  # noqa: F401  (installs the safe loader)


def outcome(url):
    """What loading ``url`` gives: its top-level keys, or the error."""
    try:
        return 'loaded ' + ', '.join(sorted(CheckpointLoader.load_checkpoint(url, map_location='cpu')))
    except Exception as err:  # every error is the result here
        return f'{type(err).__name__}: {err}'


def main(rank, world_size, port, out_json, *urls):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=int(rank),
                            world_size=int(world_size))
    outcomes = {url: outcome(url) for url in urls}
    dist.destroy_process_group()
    with open(out_json, 'w') as f:
        json.dump(outcomes, f, indent=1)


if __name__ == '__main__':
    main(*sys.argv[1:])
