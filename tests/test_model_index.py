"""model-index.yml and configs/metafile.yml (OpenMMLab's format): they parse, name files that exist, and
agree with the configs, the released detectors and the parameter counts measured here."""
from pathlib import Path

import pytest
import torch
import yaml
from mmengine.config import Config
from mmengine.registry import init_default_scope
from released_detectors import RELEASED, RELEASES

from mmdet.registry import MODELS

import mmdet_vanillanet  # noqa: F401  (registration)

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {'retinanet': {'box AP': 43.0}, 'mask-rcnn': {'box AP': 44.3, 'mask AP': 40.1}}


def models():
    index = yaml.safe_load((ROOT / 'model-index.yml').read_text())
    found = []
    for imported in index['Import']:
        assert (ROOT / imported).is_file(), imported
        metafile = yaml.safe_load((ROOT / imported).read_text())
        for collection in metafile['Collections']:
            assert (ROOT / collection['README']).is_file()
        found += metafile['Models']
    return found


def fused_parameters_m(config):
    cfg = Config.fromfile(str(ROOT / config))
    init_default_scope('mmdet')
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
        model.backbone.switch_to_deploy()
    return sum(p.numel() for p in model.parameters()) / 1e6


def test_every_model_names_existing_files_and_the_released_detectors():
    entries = {Path(m['Config']).as_posix(): m for m in models()}
    assert set(entries) == {spec['config'] for spec in RELEASED.values()}
    for name, spec in RELEASED.items():
        model = entries[spec['config']]
        assert (ROOT / model['Config']).is_file()
        assert model['Weights'] == RELEASES + spec['checkpoint']
        assert model['Training Log'] == RELEASES + spec['log']
        metrics = {k: v for result in model['Results'] for k, v in result['Metrics'].items()}
        assert metrics == PUBLISHED[name]
        assert model['Metadata']['Parameters (M, fused)'] == pytest.approx(fused_parameters_m(model['Config']),
                                                                          abs=0.005)
