"""Weights-only checkpoint loading with an explicit allow-list, for local files and URLs alike.

Since PyTorch 2.6, ``torch.load`` unpickles with ``weights_only=True`` by default and refuses any
global it does not know. mmengine's own checkpoints (``HistoryBuffer``, numpy arrays and scalars in
the message hub), mmdet 2.x checkpoints and the published VanillaNet checkpoints (``argparse.Namespace``)
hit that wall. :func:`install_safe_loading` allow-lists exactly those types and replaces every loader of
mmengine's ``CheckpointLoader``: local files go through :func:`load_checkpoint_file`; ``http(s)://`` URLs
(and the ``open-mmlab://``, ``mmcls://``, ``torchvision://`` model-zoo names, which resolve to URLs) are
downloaded into torch's hub cache (one folder per address) and then loaded by the same function, where
mmengine would unpickle them with no weights-only restriction; in a distributed run every process raises
the same error when the download fails; object storage (``s3://``, ``petrel://``) is read into memory and
loaded weights-only as well. Failures become errors that name the file and the fix.
"""
import argparse
import contextlib
import hashlib
import importlib
import inspect
import io
import os
import os.path as osp
import pickle
import re
import zipfile
from http.client import HTTPException
from urllib.parse import urlparse

import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.fileio import get_file_backend
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader
from mmengine.runner import checkpoint as mmengine_checkpoint

EXTRA_SAFE_GLOBALS_ENV = 'MMDET_VANILLANET_EXTRA_SAFE_GLOBALS'

# modules whose functions act on the system: never suggest allowing something from them
_SYSTEM_MODULES = ('builtins', 'io', 'nt', 'os', 'pathlib', 'posix', 'shutil', 'subprocess', 'sys')
_REDOWNLOAD = 'Fix: download or copy the checkpoint again (compare its size or checksum with the source).'
_multiarray = np._core.multiarray  # where numpy 2 defines (and pickles) _reconstruct and scalar
# how torch's weights-only unpickler names what it refused, most specific first
_REFUSAL_PATTERNS = (r'GLOBAL (\S+)', r"but got <class '([^']+)'>", r'unrecognized function (<[^>]*>)')


def _allowed_attribute(owner, name):
    """Stand-in for ``builtins.getattr`` inside weights-only unpickling.

    Python pickles a method such as ``HistoryBuffer.min`` (protocol 2, as ``torch.save`` uses) as
    ``getattr(HistoryBuffer, 'min')``. The real ``getattr`` would hand a malicious file any attribute
    (``__globals__``, ...); this one only returns attributes that are themselves allow-listed.

    Args:
        owner: The object the attribute is read from (a class on the unpickling stack).
        name (str): The attribute name.

    Returns:
        The attribute, looked up statically (no descriptor or ``__getattr__`` code runs).
    """
    value = inspect.getattr_static(owner, name, None) if isinstance(name, str) else None
    allowed = {g[0] if isinstance(g, tuple) else g for g in torch.serialization.get_safe_globals()}
    try:
        if value in allowed:
            return value
    except TypeError:  # unhashable value: certainly not a registered global
        pass
    holder = owner if isinstance(owner, type) else type(owner)
    raise pickle.UnpicklingError(
        f'Unsupported global: GLOBAL {holder.__module__}.{holder.__qualname__}.{name} '
        'was not an allowed global (reached through builtins.getattr).')


def _empty_bytes(*args):
    """Stand-in for ``builtins.bytes`` inside weights-only unpickling: only ``bytes()``, the empty string.

    Pickle protocol 2 (``torch.save``'s) writes an empty ``bytes`` object as the call ``bytes()``; an
    empty numpy array (an empty ``HistoryBuffer`` in mmengine's message hub, say) holds one. Any
    argument is refused: ``bytes(n)`` would allocate ``n`` bytes for whoever wrote the file.
    """
    if args:
        raise pickle.UnpicklingError('Unsupported global: GLOBAL builtins.bytes was called with arguments; '
                                     'only bytes() (the empty string) is allowed.')
    return b''


# Every entry is a type or function a legitimate checkpoint of this ecosystem references; found by
# listing torch.serialization.get_unsafe_globals_in_checkpoint() on real files (see tests).
SAFE_GLOBALS = [
    # mmengine checkpoints: message_hub['log_scalars'] holds HistoryBuffers ...
    HistoryBuffer,
    # ... whose __getstate__ also stores its statistics methods, pickled as getattr(HistoryBuffer, 'min')
    HistoryBuffer.min,
    HistoryBuffer.max,
    HistoryBuffer.current,
    HistoryBuffer.mean,
    (_allowed_attribute, 'builtins.getattr'),
    # numpy arrays (HistoryBuffer histories) and numpy scalars (logged values in message_hub)
    _multiarray._reconstruct,
    _multiarray.scalar,
    np.ndarray,
    np.dtype,
    # files written under numpy 1.x name the same functions under numpy.core
    (_multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
    (_multiarray.scalar, 'numpy.core.multiarray.scalar'),
    # unpickling a dtype sets the state of an instance of its class (Float64DType, ...)
    *(cls for cls in vars(np.dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)),
    # an empty array's data: b'', pickled as bytes()
    (_empty_bytes, 'builtins.bytes'),
    # published VanillaNet (classification) checkpoints keep their training arguments in 'args'
    argparse.Namespace,
]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint references a global that is not on the allow-list; it was not loaded.

    Args:
        filename (str): The checkpoint path or URL.
        offender (str): The full name of the refused global, as written in the file.
        note (str): A sentence added to the message. Default: ''.
    """

    def __init__(self, filename, offender, note=''):
        self.filename, self.offender = filename, offender
        if offender.split('.')[0] in _SYSTEM_MODULES:
            fix = (f'a checkpoint has no use for {offender!r}: do not use this file, get the checkpoint '
                   'from a trusted source.')
        else:
            fix = (f'only if you trust the file and {offender!r} is a plain data type, allow it: set '
                   f'{EXTRA_SAFE_GLOBALS_ENV}={offender} (comma-separated names), or call '
                   f"load_checkpoint_file(..., extra_safe_globals=['{offender}']).")
        super().__init__(
            f'Refused to load checkpoint {filename!r}: it references {offender!r}, which is not on '
            f'the weights-only allow-list of mmdet_vanillanet, so nothing outside that list was run. {note}'
            f'Fix: {fix}')


class CheckpointReadError(OSError):
    """A checkpoint file is missing, empty, truncated or not a checkpoint; the message names the fix.

    Args:
        message (str): What is wrong with which file, and how to fix it.
    """


class CheckpointNotFoundError(CheckpointReadError, FileNotFoundError):
    """The checkpoint path does not name an existing file (still a ``FileNotFoundError``).

    Args:
        message (str): What is wrong with which file, and how to fix it.
    """


def _resolve_global(name):
    """Import the object behind a dotted name such as ``'pkg.module.Class'``.

    Args:
        name (str): Full dotted name, as written in the checkpoint.

    Returns:
        tuple: ``(object, name)``, the form ``torch.serialization.add_safe_globals`` accepts.
    """
    parts = name.split('.')
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj, name
    raise ValueError(f'Cannot import the extra safe global {name!r} (from {EXTRA_SAFE_GLOBALS_ENV} '
                     'or extra_safe_globals): write its full dotted name, e.g. "package.module.Class".')


def check_checkpoint_file(path):
    """Raise :class:`CheckpointReadError` early unless ``path`` looks like a readable checkpoint.

    Args:
        path (str): Local file path.
    """
    if not osp.isfile(path):
        state = 'is a directory, not a file' if osp.isdir(path) else 'does not exist'
        raise CheckpointNotFoundError(
            f'Checkpoint {path!r} {state} (absolute path: {osp.abspath(path)!r}). Fix: give the path of '
            'the .pth file (check for typos and the working directory), or download it first.')
    if path.endswith('.safetensors'):
        return
    with open(path, 'rb') as f:
        head = f.read(16)
    if not head:
        raise CheckpointReadError(f'Checkpoint {path!r} is empty (0 bytes). ' + _REDOWNLOAD)
    if head.startswith(b'PK\x03\x04'):  # torch.save's zip format
        if not zipfile.is_zipfile(path):
            raise CheckpointReadError(
                f'Checkpoint {path!r} is truncated or corrupted ({osp.getsize(path)} bytes, the end '
                'of its zip archive is missing), as an interrupted download, copy or save leaves it. '
                + _REDOWNLOAD)
    elif not head.startswith(b'\x80'):  # nor a legacy (pre-1.6) torch.save pickle
        raise CheckpointReadError(
            f'{path!r} is not a PyTorch checkpoint: it starts with {head!r} (a config, a log, an '
            'HTML error page saved by a failed download?). Fix: give the path of a .pth file written '
            'by torch.save or mmengine; download it again if it came from the web.')


def load_checkpoint_file(filename, map_location='cpu', extra_safe_globals=()):
    """Load a local checkpoint with ``weights_only=True`` and the allow-list of this module.

    Args:
        filename (str | os.PathLike): Local checkpoint path (``~`` is expanded).
        map_location: Same as for :func:`torch.load`. Defaults to ``'cpu'``.
        extra_safe_globals (Sequence[str]): Full dotted names of further globals to allow for this
            call only, for files you trust. Names listed (comma-separated) in the environment variable
            ``MMDET_VANILLANET_EXTRA_SAFE_GLOBALS`` are added as well. Empty by default.

    Returns:
        The unpickled checkpoint (usually a dict).

    Raises:
        UnsafeCheckpointError: The file references a global outside the allow-list.
        CheckpointReadError: The file is missing, empty, truncated or not a checkpoint.
    """
    path = osp.expanduser(os.fspath(filename))
    check_checkpoint_file(path)
    return _load_weights_only(path, path, map_location, extra_safe_globals)


def _load_weights_only(source, name, map_location, extra_safe_globals=()):
    """``torch.load(source, weights_only=True)`` with the allow-list; errors name ``name`` and the fix."""
    names = [n.strip() for n in os.environ.get(EXTRA_SAFE_GLOBALS_ENV, '').split(',')]
    names += list(extra_safe_globals)
    registered = set(torch.serialization.get_safe_globals())
    # torch's safe_globals() removes its entries on exit, so hand it only the new ones
    extras = [g for g in (_resolve_global(n) for n in names if n) if g not in registered]
    try:
        with torch.serialization.safe_globals(extras):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = [m.group(1) for m in (re.search(p, str(err)) for p in _REFUSAL_PATTERNS) if m]
        if not found:
            raise CheckpointReadError(f'Checkpoint {name!r} holds malformed pickle data. '
                                      + _REDOWNLOAD) from None
        offender = found[0] if '.' in found[0] or '<' in found[0] else 'builtins.' + found[0]
        raise UnsafeCheckpointError(name, offender) from None
    except EOFError:
        raise CheckpointReadError(f'Checkpoint {name!r} is truncated (it ends mid-record). '
                                  + _REDOWNLOAD) from None
    except RuntimeError as err:
        if 'PytorchStreamReader' not in str(err):
            err.add_note(f'while loading checkpoint {name!r}')
            raise
        raise CheckpointReadError(f'Checkpoint {name!r} is corrupted ({err}). ' + _REDOWNLOAD) from None


def load_from_local_weights_only(filename, map_location):
    """mmengine ``CheckpointLoader`` backend for plain local paths (replaces ``load_from_local``).

    Args:
        filename (str): Local checkpoint path.
        map_location: Same as for :func:`torch.load`.

    Returns:
        The unpickled checkpoint, via :func:`load_checkpoint_file`.
    """
    return load_checkpoint_file(filename, map_location=map_location)


URL_PREFIXES = ('http://', 'https://')
MODEL_ZOO_PREFIXES = ('modelzoo://', 'torchvision://', 'open-mmlab://', 'openmmlab://', 'mmcls://')
OBJECT_STORAGE_PREFIXES = (r'(\S+\:)?s3://', r'(\S+\:)?petrel://')


class CheckpointDownloadError(CheckpointReadError):
    """A checkpoint address could not be downloaded, or what it served is no checkpoint (deleted again).

    Every process of a distributed run raises it with the same message.

    Args:
        message (str): What failed for which address, where the cache file is, and the fix.
    """


def url_cache_path(url, model_dir=None):
    """The cache file of ``url``: ``<model_dir>/<hash of the full address>/<file name of the address>``.

    Keyed by the whole address (scheme, host, path and query), so two addresses never share a file, even
    where their file names are equal.

    Args:
        url (str): ``http(s)://`` address of the checkpoint.
        model_dir (str | None): cache folder; None: torch's hub cache, ``<TORCH_HOME>/hub/checkpoints``.
    """
    filename = osp.basename(urlparse(url).path)
    if not filename:
        raise CheckpointDownloadError(f'Cannot name a cache file after {url!r}: it ends with "/". Fix: give the '
                                  'address of the checkpoint file itself.')
    model_dir = model_dir or osp.join(torch.hub.get_dir(), 'checkpoints')
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return osp.join(model_dir, f'url-{key}', filename)


def download_checkpoint(url, model_dir=None, progress=False):
    """Download ``url`` into its cache file (:func:`url_cache_path`) unless it is there; check it on arrival.

    The download is atomic (``torch.hub.download_url_to_file``: a partial file never takes the cache
    name). A download that is not a checkpoint file (an HTML error or login page, say) is deleted at once.

    Args:
        url (str): ``http(s)://`` address of the checkpoint.
        model_dir (str | None): cache folder instead of torch's. Default: None.
        progress (bool): show a progress bar. Default: False.

    Returns:
        str: the local path.

    Raises:
        CheckpointDownloadError: the download failed, or what arrived is not a checkpoint.
    """
    cached = url_cache_path(url, model_dir)
    if osp.exists(cached):
        return cached
    os.makedirs(osp.dirname(cached), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, cached, progress=progress)
    except (OSError, HTTPException, ValueError) as err:  # urllib's HTTP and URL errors, timeouts, a full disk
        raise CheckpointDownloadError(
            f'Cannot download checkpoint {url!r} (to {cached!r}): {type(err).__name__}: {err}. Fix: check the '
            'address and the network, or download the file yourself and give its local path.') from err
    try:
        check_checkpoint_file(cached)
    except CheckpointReadError as err:
        _delete_cached(cached)
        raise CheckpointDownloadError(f'The download of {url!r} was deleted from the cache ({cached}): {err}') \
            from None
    return cached


def _first_failure(message, world_size):
    """The first failure message of any process (None: every process succeeded), the same on every process.

    Each process calls this whatever happened to it, so nobody waits for a process that gave up.

    Args:
        message (str | None): this process's failure, or None.
        world_size (int): number of processes.
    """
    if world_size == 1:
        return message
    messages = [None] * world_size
    torch.distributed.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


def _load_cached(url, map_location):
    """Load the cache file of ``url`` (downloaded if missing). Returns (checkpoint, None) or (None, the error)."""
    path = url_cache_path(url)
    deleted = f'Its download was deleted from the cache ({path}). '
    try:
        return load_checkpoint_file(download_checkpoint(url), map_location=map_location), None
    except CheckpointDownloadError as err:
        return None, err
    except UnsafeCheckpointError as err:
        return None, UnsafeCheckpointError(url, err.offender, note=deleted)
    except CheckpointReadError as err:
        return None, CheckpointDownloadError(f'{err} (It was downloaded from {url!r}.) {deleted}Run again to '
                                             'download it anew.')


def load_from_url_weights_only(url, map_location=None):
    """mmengine ``CheckpointLoader`` backend for ``http(s)://`` (replaces ``load_from_http``).

    Rank 0 downloads into the cache (:func:`url_cache_path`) while the other processes of a distributed
    run wait; then every process loads the file (a process on another machine downloads it there first).
    Any failure, on any process, is raised by every process (a download that failed as a
    :class:`CheckpointDownloadError` with rank 0's message): no process waits for one that gave up. A
    cached file that does not load (refused by the allow-list, malformed) is deleted, so that the next
    run downloads it again, and the error says where it was.

    Args:
        url (str): the checkpoint's address.
        map_location: Same as for :func:`torch.load`.

    Returns:
        The unpickled checkpoint, via :func:`load_checkpoint_file`.
    """
    rank, world_size = get_dist_info()
    message = None
    if rank == 0:
        try:
            download_checkpoint(url)
        except CheckpointDownloadError as err:
            message = str(err)
    message = _first_failure(message, world_size)
    if message is not None:
        raise CheckpointDownloadError(message)
    checkpoint, error = _load_cached(url, map_location)
    # after every process has read the file, a bad one is deleted
    failure = _first_failure(None if error is None else str(error), world_size)
    if failure is None:
        return checkpoint
    if error is None:
        raise CheckpointDownloadError(f'Another process of this distributed run could not load {url!r}: {failure}')
    _delete_cached(url_cache_path(url))
    raise error


def _delete_cached(path):
    """Delete a cache file and its address's folder (another process of this machine may have done so)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    with contextlib.suppress(OSError):  # not empty, or gone
        os.rmdir(osp.dirname(path))


def model_zoo_url(name):
    """The address (or mmengine-home-relative path) that mmengine's model-zoo tables give ``name``.

    Args:
        name (str): ``torchvision://resnet50``, ``open-mmlab://...``, ``mmcls://...`` (or ``modelzoo://``).
    """
    scheme, model = name.split('://', 1)
    if scheme in ('modelzoo', 'torchvision'):
        urls = mmengine_checkpoint.get_torchvision_models()
    elif scheme == 'mmcls':
        urls = mmengine_checkpoint.get_mmcls_models()
    else:
        urls = mmengine_checkpoint.get_external_models()
        model = mmengine_checkpoint.get_deprecated_model_names().get(model, model)
    if model not in urls:
        raise ValueError(f'{name!r} names no model of mmengine\'s {scheme}:// table ({len(urls)} models).')
    return urls[model]


def load_from_model_zoo_weights_only(name, map_location=None):
    """mmengine ``CheckpointLoader`` backend for the model-zoo schemes: resolve the name, then load safely.

    Args:
        name (str): e.g. ``open-mmlab://resnet50_caffe``.
        map_location: Same as for :func:`torch.load`.
    """
    url = model_zoo_url(name)
    if url.startswith(URL_PREFIXES):
        checkpoint = load_from_url_weights_only(url, map_location=map_location)
    else:  # open-mmlab names can point into mmengine's home folder
        checkpoint = load_checkpoint_file(osp.join(mmengine_checkpoint._get_mmengine_home(), url),
                                          map_location=map_location)
    if name.startswith('mmcls://'):
        checkpoint = mmengine_checkpoint._process_mmcls_checkpoint(checkpoint)
    return checkpoint


def load_from_object_storage_weights_only(filename, map_location=None):
    """mmengine ``CheckpointLoader`` backend for ``s3://`` / ``petrel://``: read the bytes, load weights-only.

    Args:
        filename (str): the object's address.
        map_location: Same as for :func:`torch.load`.
    """
    backend = get_file_backend(filename, backend_args={'backend': 'petrel'})
    with io.BytesIO(backend.get(filename)) as buffer:
        return _load_weights_only(buffer, filename, map_location)


def refuse_pavi(filename, map_location=None):
    """``pavi://`` checkpoints are not loaded: pavi's client is not part of this stack."""
    raise CheckpointReadError(f'Cannot load {filename!r}: pavi:// checkpoints are not supported by the safe loader '
                              'of mmdet_vanillanet. Fix: download the file and give its local path.')


# mmengine scheme prefix(es) -> the loader that replaces mmengine's (all weights-only)
SAFE_LOADERS = {
    '': load_from_local_weights_only,
    URL_PREFIXES: load_from_url_weights_only,
    MODEL_ZOO_PREFIXES: load_from_model_zoo_weights_only,
    OBJECT_STORAGE_PREFIXES: load_from_object_storage_weights_only,
    'pavi://': refuse_pavi,
}


def read_checkpoint(filename, map_location='cpu'):
    """Read a checkpoint from a local path or any scheme mmengine knows, always weights-only.

    Args:
        filename (str | os.PathLike): path or URL.
        map_location: Same as for :func:`torch.load`. Defaults to ``'cpu'``.
    """
    filename = os.fspath(filename)
    if '://' not in filename:
        return load_checkpoint_file(filename, map_location=map_location)
    return CheckpointLoader.load_checkpoint(filename, map_location=map_location, logger='current')


def install_safe_loading():
    """Allow-list :data:`SAFE_GLOBALS` in torch and make every mmengine checkpoint loader weights-only.

    Runs on import of :mod:`mmdet_vanillanet.checkpoint`; calling it again changes nothing.
    Afterwards plain ``torch.load`` accepts mmengine's, mmdet 2.x's and the published VanillaNet
    checkpoints, and every mmengine path that reads a checkpoint (``load_from``, ``resume``, ``init_cfg``
    pretrained weights, ``load_checkpoint``, mmdet's ``DetInferencer``), local or URL, goes through
    :func:`load_checkpoint_file` (see :data:`SAFE_LOADERS`).
    """
    torch.serialization.add_safe_globals(SAFE_GLOBALS)
    for prefixes, loader in SAFE_LOADERS.items():
        if CheckpointLoader._schemes.get(prefixes if isinstance(prefixes, str) else prefixes[0]) is not loader:
            CheckpointLoader.register_scheme(prefixes=prefixes, loader=loader, force=True)
