"""Untrusted files: no loading path of the tools runs code pickled into a checkpoint.

A payload whose unpickling would create a marker file goes through every entry point that reads a
checkpoint: resume, evaluation, weight conversion, deploy, and the backbone's ``init_cfg``. Each refuses it
with a message naming the file and the refused global; the marker never appears.
"""
import os
import pickle

import pytest
import torch

import mmdet_vanillanet  # noqa: F401  (registration, safe loader)
from mmdet_vanillanet.checkpoint import UnsafeCheckpointError
from tiny_detector import load_tool, make_data, write_config


class Payload:
    """Unpickling this runs ``os.system('touch MARKER')``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def tiny_weights():
    return {'stem1.0.weight': torch.zeros(8, 3, 4, 4)}


# torch.save's zip format with the payload beside real tensors, and a bare pickle (the legacy format)
FORMATS = {
    'zip': lambda marker, path: torch.save(dict(state_dict=tiny_weights(), meta=Payload(marker)), path),
    'pickle': lambda marker, path: path.write_bytes(pickle.dumps(Payload(marker), protocol=2)),
}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('untrusted')
    config = write_config(root / 'tiny.py', make_data(root / 'data'), max_epochs=1)
    return root, config


def write_payload(tmp_path, kind):
    marker = tmp_path / 'PWNED'
    path = tmp_path / f'payload_{kind}.pth'
    FORMATS[kind](marker, path)
    yield str(path)
    assert not marker.exists(), 'the pickled code ran'


@pytest.fixture
def payload(tmp_path):
    """A zip-format payload (the format of every checkpoint torch writes)."""
    yield from write_payload(tmp_path, 'zip')


@pytest.fixture(params=sorted(FORMATS))
def any_payload(request, tmp_path):
    """Both formats, for the tools that fail before building a runner (cheap to run twice)."""
    yield from write_payload(tmp_path, request.param)


def refused(path):
    """What the error must say: the file, the global it refused, and that nothing ran."""
    return pytest.raises(UnsafeCheckpointError, match=rf"Refused to load checkpoint '{path}': it references "
                                                      r"'(posix|os)\.system'.*nothing outside that list was run")


def test_the_payload_works(tmp_path):
    """The test means something: plain pickle would run the payload."""
    marker = tmp_path / 'PWNED'
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_train_resume(setup, payload, tmp_path):
    root, config = setup
    with refused(payload):
        load_tool('train').main([config, '--resume', payload, '--work-dir', str(tmp_path / 'work')])


def test_train_backbone_init_cfg(setup, payload, tmp_path):
    root, config = setup
    with refused(payload):
        load_tool('train').main([config, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                                 f'model.backbone.init_cfg.type=Pretrained',
                                 f'model.backbone.init_cfg.checkpoint={payload}'])


def test_test_tool(setup, payload, tmp_path):
    root, config = setup
    with refused(payload):
        load_tool('test').main([config, payload, '--work-dir', str(tmp_path / 'work')])


def test_convert_weights(any_payload, tmp_path):
    with refused(any_payload):
        load_tool('convert_weights').main([any_payload, str(tmp_path / 'out.pth')])
    assert not (tmp_path / 'out.pth').exists()


def test_deploy_tool(setup, any_payload, tmp_path):
    root, config = setup
    with refused(any_payload):
        load_tool('deploy').main([config, any_payload, str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()
