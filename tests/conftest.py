import os

import pytest
import torch
from mmengine.registry import init_default_scope


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs 2 worker processes) every worker computes on one thread, and so do
    the processes it starts: on a 2-core machine, two workers of two threads each would spin-wait for each other."""
    if os.environ.get('PYTEST_XDIST_WORKER'):
        os.environ.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def mmdet_default_scope():
    """Every test starts in mmdet's registry scope, whatever a previous test's Runner left behind."""
    init_default_scope('mmdet')


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures('one_thread')``): tiny
    models and tool runs in process run fastest on one thread, most of all on a shared CPU, where threads
    spin-waiting for each other made one training iteration 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
