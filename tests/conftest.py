import pytest
from mmengine.registry import init_default_scope


@pytest.fixture(autouse=True)
def mmdet_default_scope():
    """Every test starts in mmdet's registry scope, whatever a previous test's Runner left behind."""
    init_default_scope('mmdet')
