"""Untrusted files: no loading path of the tools runs code pickled into a checkpoint.

A payload whose unpickling would create a marker file goes through every entry point that reads a
checkpoint: resume, evaluation, weight conversion, deploy, and the backbone's ``init_cfg``, as a local
file and as an ``http://`` URL served from 127.0.0.1. Each refuses it with a message naming the file (or
URL) and the refused global; the marker never appears. Good checkpoints over the same server load.
"""
import functools
import http.server
import os
import pickle
import threading

import pytest
import torch
from mmengine.runner import CheckpointLoader

import mmdet_vanillanet  # noqa: F401  (registration, safe loader)
from mmdet_vanillanet.checkpoint import UnsafeCheckpointError, safe_load
from mmdet_vanillanet.models import VanillaNet
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


class QuietHandler(http.server.SimpleHTTPRequestHandler):

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """An HTTP server on 127.0.0.1 serving a folder: (folder, base URL)."""
    folder = tmp_path_factory.mktemp('served')
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()
    thread.join()


@pytest.fixture(autouse=True)
def torch_hub_cache(tmp_path, monkeypatch):
    """Downloads go to this test's own torch hub cache."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    return tmp_path / 'torch_home' / 'hub' / 'checkpoints'


def write_payload(tmp_path, kind, where='local', server=None):
    marker = tmp_path / 'PWNED'
    name = f'payload_{kind}_{os.path.basename(tmp_path)}.pth'
    path = tmp_path / name if where == 'local' else server[0] / name
    FORMATS[kind](marker, path)
    yield str(path) if where == 'local' else f'{server[1]}/{name}'
    assert not marker.exists(), 'the pickled code ran'


@pytest.fixture(params=['local', 'url'])
def payload(request, tmp_path, server):
    """A zip-format payload (the format of every checkpoint torch writes), as a local file and as a URL."""
    yield from write_payload(tmp_path, 'zip', request.param, server)


@pytest.fixture(params=sorted(FORMATS))
def any_payload(request, tmp_path):
    """Both formats, for the tools that fail before building a runner (cheap to run twice)."""
    yield from write_payload(tmp_path, request.param)


def refused(path):
    """What the error must say: the file (or URL), the global it refused, and that nothing ran."""
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


def test_train_load_from(setup, payload, tmp_path):
    root, config = setup
    with refused(payload):
        load_tool('train').main([config, '--work-dir', str(tmp_path / 'work'), '--cfg-options', f'load_from={payload}'])


def test_a_refused_download_leaves_the_cache(server, tmp_path, torch_hub_cache):
    url = next(write_payload(tmp_path, 'zip', 'url', server))
    with refused(url) as error:
        CheckpointLoader.load_checkpoint(url)
    assert 'Its download was deleted from the cache' in str(error.value)
    assert not list(torch_hub_cache.iterdir())


def test_every_mmengine_scheme_loads_weights_only():
    loaders = set(safe_load.SAFE_LOADERS.values())
    assert all(loader in loaders for loader in CheckpointLoader._schemes.values()), CheckpointLoader._schemes
    for path in ('x.pth', 'http://host/x.pth', 'https://host/x.pth', 'open-mmlab://x', 'openmmlab://x',
                 'mmcls://x', 'torchvision://x', 'modelzoo://x', 's3://bucket/x.pth', 'petrel://x', 'pavi://x'):
        assert CheckpointLoader._get_checkpoint_loader(path) in loaders, path


def test_model_zoo_names_resolve_to_the_safe_url_loader(server, tmp_path, monkeypatch):
    url = next(write_payload(tmp_path, 'zip', 'url', server))
    monkeypatch.setattr(safe_load.mmengine_checkpoint, 'get_external_models', lambda: {'evil': url})
    with refused(url):
        CheckpointLoader.load_checkpoint('open-mmlab://evil')


def test_object_storage_is_read_weights_only(tmp_path, monkeypatch):
    marker = tmp_path / 'PWNED'
    FORMATS['zip'](marker, tmp_path / 'evil.pth')

    class Bucket:
        def get(self, filename):
            return (tmp_path / 'evil.pth').read_bytes()

    monkeypatch.setattr(safe_load, 'get_file_backend', lambda *args, **kwargs: Bucket())
    with refused('s3://bucket/evil.pth'):
        CheckpointLoader.load_checkpoint('s3://bucket/evil.pth')
    assert not marker.exists()


def test_pavi_is_refused_with_the_fix():
    with pytest.raises(safe_load.CheckpointReadError, match='download the file and give its local path'):
        CheckpointLoader.load_checkpoint('pavi://model/x.pth')


def test_good_checkpoints_over_the_same_server_load(setup, server, tmp_path, torch_hub_cache):
    folder, base = server
    torch.manual_seed(0)
    source = VanillaNet(arch=dict(dims=[8, 16, 24, 32], strides=[2, 2, 2]), act_num=1)
    torch.save(dict(model=source.state_dict()), folder / 'backbone.pth')
    net = VanillaNet(arch=dict(dims=[8, 16, 24, 32], strides=[2, 2, 2]), act_num=1,
                     init_cfg=dict(type='Pretrained', checkpoint=f'{base}/backbone.pth'))
    net.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    assert (torch_hub_cache / 'backbone.pth').is_file()

    root, config = setup
    work_dir = tmp_path / 'work'
    load_tool('train').main([config, '--work-dir', str(work_dir), '--cfg-options', 'train_cfg.max_epochs=1'])
    (folder / 'epoch_1.pth').write_bytes((work_dir / 'epoch_1.pth').read_bytes())
    load_tool('test').main([config, f'{base}/epoch_1.pth', '--work-dir', str(tmp_path / 'test')])
    load_tool('train').main([config, '--work-dir', str(work_dir), '--resume', f'{base}/epoch_1.pth',
                             '--cfg-options', 'train_cfg.max_epochs=2'])
    assert (work_dir / 'epoch_2.pth').is_file()
