"""Safe (weights-only) checkpoint loading: what loads, what is refused, and how errors read."""
import argparse
import io
import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import CheckpointLoader, Runner, load_checkpoint
from mmengine.runner.checkpoint import _load_checkpoint
from torch import nn
from torch.utils.data import Dataset

from mmdet_vanillanet.checkpoint import (
    EXTRA_SAFE_GLOBALS_ENV,
    SAFE_GLOBALS,
    CheckpointReadError,
    UnsafeCheckpointError,
    install_safe_loading,
    load_checkpoint_file,
)


class ToyDataset(Dataset):
    metainfo = dict(classes=('cat', 'dog'), palette=[(220, 20, 60), (119, 11, 32)])

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.full((2, ), float(i)), labels=torch.tensor([i % 2], dtype=torch.float32))


class ToyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.bn = nn.BatchNorm1d(1)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.bn(self.linear(inputs))
        return dict(loss=nn.functional.mse_loss(out, labels)) if mode == 'loss' else out


class Payload:
    """Pickles as a call of ``reduce[0](*reduce[1])``, as a malicious checkpoint would."""

    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


class TrustedMeta:
    """A user's plain-data class: refused unless explicitly allowed."""

    def __init__(self, note):
        self.note = note


@pytest.fixture(scope='module')
def mmengine_checkpoint(tmp_path_factory):
    """A checkpoint written by a real mmengine Runner (optimizer, schedulers, message hub, meta)."""
    work_dir = tmp_path_factory.mktemp('runner')
    runner = Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        experiment_name=f'safe_load_{os.getpid()}',
        train_dataloader=dict(
            dataset=ToyDataset(),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=4,
            num_workers=0,
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2),
            dict(type='CosineAnnealingLR', by_epoch=False, begin=2, end=4)
        ],
        train_cfg=dict(by_epoch=False, max_iters=4),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=4, by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)))
    runner.train()
    return work_dir / 'iter_4.pth'


@pytest.fixture
def classification_checkpoint(tmp_path):
    """A checkpoint laid out like the published VanillaNet ones (``args`` is an argparse.Namespace)."""
    model = ToyModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 2), torch.ones(2, 1), mode='loss')['loss'].backward()
    optimizer.step()
    path = tmp_path / 'vanillanet_cls.pth'
    torch.save(
        dict(
            model=model.state_dict(),
            model_ema=model.state_dict(),
            optimizer=optimizer.state_dict(),
            epoch=299,
            scaler=torch.amp.GradScaler('cpu').state_dict(),
            args=argparse.Namespace(model='vanillanet_13', act_num=4, lr=4.8e-3, input_size=224,
                                    model_ema_decay=[0.9999], clip_grad=None, output_dir='/ckpt',
                                    dist_url='env://')), path)
    return path


@pytest.fixture(autouse=True)
def default_torch_load(monkeypatch):
    """Run every test with torch's default (weights-only) loading and no opt-in."""
    monkeypatch.delenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', raising=False)
    monkeypatch.delenv(EXTRA_SAFE_GLOBALS_ENV, raising=False)


def test_mmengine_checkpoint_loads(mmengine_checkpoint):
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(mmengine_checkpoint)) == []
    for load in (torch.load, load_checkpoint_file, CheckpointLoader.load_checkpoint, _load_checkpoint):
        ckpt = load(str(mmengine_checkpoint))
        assert {'meta', 'state_dict', 'optimizer', 'param_schedulers', 'message_hub'} <= set(ckpt)
        assert ckpt['meta']['dataset_meta']['classes'] == ('cat', 'dog')
        loss = ckpt['message_hub']['log_scalars']['train/loss']
        assert isinstance(loss, HistoryBuffer) and len(loss.data[0]) == 4
        assert loss.mean() == pytest.approx(np.mean(loss.data[0]))  # statistics methods restored
    model = ToyModel()
    load_checkpoint(model, str(mmengine_checkpoint), strict=True)
    assert torch.equal(model.linear.weight, ckpt['state_dict']['linear.weight'])


def test_classification_checkpoint_loads(classification_checkpoint):
    for load in (torch.load, load_checkpoint_file, _load_checkpoint):
        ckpt = load(str(classification_checkpoint))
        assert isinstance(ckpt['args'], argparse.Namespace) and ckpt['args'].act_num == 4
        assert ckpt['epoch'] == 299 and set(ckpt['model']) == set(ckpt['model_ema'])


def test_numpy_values_load(tmp_path):
    values = dict(arr=np.arange(3.0), i64=np.int64(7), f32=np.float32(0.5), flag=np.bool_(True),
                  text=np.array(['a', 'bc']), rec=np.zeros(2, dtype=[('x', 'f4'), ('y', 'i8')]))
    torch.save(values, tmp_path / 'np.pth')
    loaded = load_checkpoint_file(tmp_path / 'np.pth')
    for key, value in values.items():
        assert type(loaded[key]) is type(value) and np.array_equal(loaded[key], value)


def test_numpy1_names_load(tmp_path):
    """Files written under numpy 1.x name numpy.core.multiarray instead of numpy._core.multiarray."""
    torch.save(dict(arr=np.arange(3.0), f=np.float64(2.5)), tmp_path / 'np2.pth')
    with zipfile.ZipFile(tmp_path / 'np2.pth') as src, zipfile.ZipFile(tmp_path / 'np1.pth', 'w') as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith('data.pkl'):
                assert b'numpy._core.multiarray' in data
                data = data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
            dst.writestr(item, data)
    loaded = load_checkpoint_file(tmp_path / 'np1.pth')
    assert np.array_equal(loaded['arr'], np.arange(3.0)) and loaded['f'] == 2.5


PAYLOADS = {
    'os.system': lambda marker: (os.system, (f'touch {marker}', )),
    'open': lambda marker: (open, (str(marker), 'w')),
    'Path.touch': lambda marker: (pathlib.Path.touch, (marker, )),
}


@pytest.fixture(params=sorted(PAYLOADS))
def malicious_checkpoint(request, tmp_path):
    """A checkpoint whose unpickling would create ``marker``; returns (path, marker, global name)."""
    marker = tmp_path / 'pwned'
    reduce = PAYLOADS[request.param](marker)
    path = tmp_path / 'evil.pth'
    torch.save(dict(state_dict=dict(w=torch.zeros(2)), meta=Payload(reduce)), path)
    offender = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert offender and not marker.exists()
    return path, marker, offender


LOADERS = {
    'torch.load': torch.load,
    'CheckpointLoader.load_checkpoint': CheckpointLoader.load_checkpoint,
    'runner.load_checkpoint': lambda path: load_checkpoint(ToyModel(), path),
    '_load_checkpoint': _load_checkpoint,
    'load_checkpoint_file': load_checkpoint_file,
}


@pytest.mark.parametrize('loader', sorted(LOADERS))
def test_payload_refused_on_every_path(malicious_checkpoint, loader):
    path, marker, unsafe = malicious_checkpoint
    with pytest.raises(pickle.UnpicklingError) as info:
        LOADERS[loader](str(path))
    assert not marker.exists()
    message = str(info.value)
    assert any(name in message or name.split('.')[-1] in message for name in unsafe)
    if loader != 'torch.load':  # torch's own message does not name the file
        assert isinstance(info.value, UnsafeCheckpointError)
        assert str(path) in message and info.value.offender in unsafe
        assert 'weights_only' not in message.replace('weights-only', '')


def test_getattr_reaches_only_allowed_attributes(tmp_path):
    path = tmp_path / 'gadget.pth'
    torch.save(dict(fn=Payload((getattr, (HistoryBuffer, '__init__')))), path)
    with pytest.raises(UnsafeCheckpointError, match=r'HistoryBuffer\.__init__'):
        load_checkpoint_file(path)


def test_opt_in_for_trusted_file(tmp_path, monkeypatch):
    path = tmp_path / 'trusted.pth'
    torch.save(dict(meta=TrustedMeta('mine'), args=argparse.Namespace(a=1)), path)
    name = f'{TrustedMeta.__module__}.TrustedMeta'
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(path)
    assert info.value.offender == name and EXTRA_SAFE_GLOBALS_ENV in str(info.value)

    assert load_checkpoint_file(path, extra_safe_globals=[name, 'argparse.Namespace'])['meta'].note == 'mine'
    monkeypatch.setenv(EXTRA_SAFE_GLOBALS_ENV, f' {name} , ')
    assert CheckpointLoader.load_checkpoint(str(path))['meta'].note == 'mine'
    monkeypatch.delenv(EXTRA_SAFE_GLOBALS_ENV)
    # the opt-in was scoped to those calls and left the allow-list as it was
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(path)
    torch.save(argparse.Namespace(a=1), tmp_path / 'ns.pth')
    assert torch.load(tmp_path / 'ns.pth').a == 1

    monkeypatch.setenv(EXTRA_SAFE_GLOBALS_ENV, 'no_such_pkg.Thing')
    with pytest.raises(ValueError, match=f'no_such_pkg.Thing.*{EXTRA_SAFE_GLOBALS_ENV}'):
        load_checkpoint_file(path)


def _truncate(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize('loader', [load_checkpoint_file, _load_checkpoint])
@pytest.mark.parametrize('case, expected', [
    ('missing', 'does not exist'),
    ('directory', 'is a directory'),
    ('empty', 'is empty'),
    ('text', 'is not a PyTorch checkpoint'),
    ('html', 'is not a PyTorch checkpoint'),
    ('truncated', 'is truncated or corrupted'),
])
def test_unreadable_file_gets_one_clear_error(tmp_path, classification_checkpoint, loader, case, expected):
    path = tmp_path / f'{case}.pth'
    if case == 'directory':
        path.mkdir()
    elif case == 'empty':
        path.write_bytes(b'')
    elif case == 'text':
        path.write_text("model = dict(type='RetinaNet')\n")
    elif case == 'html':
        path.write_text('<!DOCTYPE html><html>404 Not Found</html>')
    elif case == 'truncated':
        _truncate(classification_checkpoint, path)
    with pytest.raises(CheckpointReadError) as info:
        loader(str(path))
    message = str(info.value)
    assert expected in message and str(path) in message and 'Fix:' in message
    error = info.value  # one message, not a chained torch traceback
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    if case == 'missing':
        assert isinstance(error, FileNotFoundError)


def test_install_is_idempotent():
    before = set(torch.serialization.get_safe_globals())
    install_safe_loading()
    install_safe_loading()
    assert set(torch.serialization.get_safe_globals()) == before >= set(SAFE_GLOBALS)
    assert CheckpointLoader._get_checkpoint_loader('work_dirs/x.pth') is CheckpointLoader._schemes['']
    assert CheckpointLoader._schemes[''].__module__ == 'mmdet_vanillanet.checkpoint.safe_load'


def test_in_memory_buffers_keep_torch_behaviour():
    buffer = io.BytesIO()
    torch.save(dict(args=argparse.Namespace(a=1)), buffer)
    buffer.seek(0)
    assert torch.load(buffer)['args'].a == 1


def test_empty_arrays_and_an_empty_history_buffer_load(tmp_path):
    """Pickle protocol 2 writes an empty array's data as the call bytes(): allowed, and nothing else of bytes."""
    from mmengine.logging import MessageHub
    hub = MessageHub.get_instance(f'empty_{os.getpid()}')
    hub.update_scalar('train/loss', 1.0)
    state = hub.state_dict()
    state['log_scalars']['val/never_logged'] = HistoryBuffer()
    path = tmp_path / 'empty.pth'
    torch.save(dict(message_hub=state, empty=np.zeros((0, 3), dtype=np.float32), meta=dict(epoch=1)), path)
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith('data.pkl')))
    assert b'__builtin__\nbytes' in pickled  # the global the allow-list used to refuse
    for load in (load_checkpoint_file, CheckpointLoader.load_checkpoint, _load_checkpoint):
        loaded = load(str(path))
        buffer = loaded['message_hub']['log_scalars']['val/never_logged']
        assert isinstance(buffer, HistoryBuffer) and len(buffer.data[0]) == 0
        assert loaded['empty'].shape == (0, 3) and loaded['empty'].dtype == np.float32

    path = tmp_path / 'big_bytes.pth'
    torch.save(dict(x=Payload((bytes, (10 ** 6, )))), path)
    with pytest.raises(UnsafeCheckpointError, match='builtins.bytes'):
        load_checkpoint_file(path)


def test_an_mmdet2_optimizer_state_loads(tmp_path):
    """mmcv 1.x checkpoints keep the optimizer: AdamW state plus mmdet 2.x's layer-decay group fields."""
    model = ToyModel()
    optimizer = torch.optim.AdamW([dict(params=[model.linear.weight], lr_scale=0.6, group_name='layer_0_decay',
                                        param_names=['backbone.stem1.0.weight']),
                                   dict(params=[model.linear.bias], lr_scale=1.0, group_name='layer_7_no_decay',
                                        param_names=['bbox_head.retina_cls.bias'], weight_decay=0.0)], lr=8e-5)
    model(torch.ones(2, 2), torch.ones(2, 1), mode='loss')['loss'].backward()
    optimizer.step()
    path = tmp_path / 'mmdet2.pth'
    torch.save(dict(meta=dict(mmdet_version='2.25.1', CLASSES=('cat', 'dog'), seed=np.int64(7), epoch=12,
                              hook_msgs=dict(last_ckpt='work_dirs/x/epoch_11.pth')),
                    state_dict=model.state_dict(), optimizer=optimizer.state_dict()), path,
               _use_new_zipfile_serialization=False)
    loaded = load_checkpoint_file(path)
    assert loaded['optimizer']['param_groups'][0]['group_name'] == 'layer_0_decay'
    assert loaded['meta']['seed'] == 7 and loaded['meta']['CLASSES'] == ('cat', 'dog')
