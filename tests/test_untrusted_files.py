"""Untrusted files: no loading path of the tools runs code pickled into a checkpoint; downloads that fail.

A payload whose unpickling would create a marker file goes through every entry point that reads a
checkpoint: resume, evaluation, weight conversion, deploy, and the backbone's ``init_cfg``, as a local
file and as an ``http://`` URL served from 127.0.0.1. Each refuses it with a message naming the file (or
URL) and the refused global; the marker never appears. Good checkpoints over the same server load.
"""
import functools
import http.server
import json
import os
import os.path as osp
import pickle
import socket
import sys
import threading
from pathlib import Path

import pytest
import torch
from mmengine.runner import CheckpointLoader
from tiny_detector import ROOT, load_tool, make_data, run_together, tool_env, write_config

import mmdet_vanillanet  # noqa: F401  (registration, safe loader)
from mmdet_vanillanet.checkpoint import UnsafeCheckpointError, safe_load
from mmdet_vanillanet.models import VanillaNet


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
                                 'model.backbone.init_cfg.type=Pretrained',
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
    assert f'Its download was deleted from the cache ({safe_load.url_cache_path(url)})' in str(error.value)
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
    assert osp.isfile(safe_load.url_cache_path(f'{base}/backbone.pth'))
    assert osp.dirname(safe_load.url_cache_path(f'{base}/backbone.pth')).startswith(str(torch_hub_cache))

    root, config = setup
    work_dir = tmp_path / 'work'
    load_tool('train').main([config, '--work-dir', str(work_dir), '--cfg-options', 'train_cfg.max_epochs=1'])
    (folder / 'epoch_1.pth').write_bytes((work_dir / 'epoch_1.pth').read_bytes())
    load_tool('test').main([config, f'{base}/epoch_1.pth', '--work-dir', str(tmp_path / 'test')])
    load_tool('train').main([config, '--work-dir', str(work_dir), '--resume', f'{base}/epoch_1.pth',
                             '--cfg-options', 'train_cfg.max_epochs=2'])
    assert (work_dir / 'epoch_2.pth').is_file()


# ---- downloads that fail, or serve something else than a checkpoint --------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_addresses_never_share_a_cache_file(server, torch_hub_cache):
    """Two files of one name from two addresses (two releases, two hosts) are two cache files."""
    folder, base = server
    for sub, value in (('v1', 1.0), ('v2', 2.0)):
        (folder / sub).mkdir(exist_ok=True)
        torch.save({'w': torch.full((1,), value)}, folder / sub / 'model.pth')
    assert float(CheckpointLoader.load_checkpoint(f'{base}/v1/model.pth')['w']) == 1.0
    assert float(CheckpointLoader.load_checkpoint(f'{base}/v2/model.pth')['w']) == 2.0
    assert len([p for p in torch_hub_cache.rglob('model.pth')]) == 2


@pytest.mark.parametrize('served, message', [
    (b'<html><body>Please log in</body></html>', r"is not a PyTorch checkpoint: it starts with b'<html>"),
    (b'\x80\x02}q\x00garbage', r'holds malformed pickle data'),
])
def test_a_download_that_does_not_load_is_deleted_and_the_error_says_where_it_was(server, torch_hub_cache, served,
                                                                                  message):
    folder, base = server
    name = f'release_{len(served)}.pth'
    (folder / name).write_bytes(served)
    url = f'{base}/{name}'
    cached = safe_load.url_cache_path(url)
    with pytest.raises(safe_load.CheckpointDownloadError, match=message) as error:
        CheckpointLoader.load_checkpoint(url)
    assert f'deleted from the cache ({cached})' in str(error.value) and url in str(error.value)
    assert not osp.exists(cached)
    # the address serves the checkpoint now: the next run downloads it, instead of reading the old download
    torch.save({'w': torch.ones(1)}, folder / name)
    assert set(CheckpointLoader.load_checkpoint(url)) == {'w'}


def test_every_process_of_a_distributed_run_raises_the_same_error(server, tmp_path, torch_hub_cache):
    """Two gloo processes on 127.0.0.1 load addresses that fail in every way, then a good one.

    Before, rank 0 raised before the barrier the other processes waited at: they waited forever. A hang
    here fails the test at its timeout.
    """
    folder, base = server
    (folder / 'login.pth').write_text('<html>Please log in</html>')
    torch.save({'state_dict': {'w': torch.ones(1)}}, folder / 'good.pth')
    payload = next(write_payload(tmp_path, 'zip', 'url', server))
    urls = dict(missing=f'{base}/missing.pth', refused=f'http://127.0.0.1:{free_port()}/x.pth',
                login=f'{base}/login.pth', payload=payload, good=f'{base}/good.pth')
    port, env = free_port(), tool_env(TORCH_HOME=str(tmp_path / 'torch_home'))
    worker = osp.join(ROOT, 'tests', 'url_loading_worker.py')
    run_together([[sys.executable, worker, str(rank), '2', str(port), str(tmp_path / f'{rank}.json'), *urls.values()]
                  for rank in (0, 1)], timeout=180, env=env)
    rank0, rank1 = (json.loads((tmp_path / f'{rank}.json').read_text()) for rank in (0, 1))
    assert rank0 == rank1
    outcome = {name: rank0[url] for name, url in urls.items()}
    assert outcome['missing'].startswith('CheckpointDownloadError: Cannot download checkpoint') \
        and 'HTTP Error 404' in outcome['missing'], outcome['missing']
    assert outcome['refused'].startswith('CheckpointDownloadError: Cannot download checkpoint') \
        and 'Connection refused' in outcome['refused'], outcome['refused']
    assert outcome['login'].startswith('CheckpointDownloadError: The download of') \
        and 'is not a PyTorch checkpoint' in outcome['login'], outcome['login']
    assert outcome['payload'].startswith('UnsafeCheckpointError: Refused to load checkpoint') \
        and 'Its download was deleted from the cache' in outcome['payload'], outcome['payload']
    assert outcome['good'] == 'loaded state_dict'
    cached = [p for p in (tmp_path / 'torch_home').rglob('*') if p.is_file()]
    hub = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    assert cached == [Path(safe_load.url_cache_path(urls['good'], str(hub)))]
