"""setup.py declares what the package imports, at versions this environment satisfies."""
import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION_OF = {'cv2': 'opencv-python'}


def imported_roots():
    roots = set()
    for path in (ROOT / 'mmdet_vanillanet').rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split('.')[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split('.')[0])
    return roots - set(sys.stdlib_module_names) - {'mmdet_vanillanet'}


def declared(folder):
    """Requirements of setup.py (install_requires and extras), as setuptools reads them from the file."""
    out = subprocess.run([sys.executable, 'setup.py', '-q', 'egg_info', '--egg-base', str(folder)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (folder / 'mmdet_vanillanet.egg-info' / 'requires.txt').read_text()
    return [Requirement(line) for line in text.splitlines() if line and not line.startswith('[')]


def test_every_imported_package_is_declared_and_installed_at_a_declared_version(tmp_path):
    requirements = {re.sub(r'[-_.]+', '-', r.name).lower(): r for r in declared(tmp_path)}
    for root in sorted(imported_roots()):
        name = DISTRIBUTION_OF.get(root, root).lower()
        assert name in requirements, f'mmdet_vanillanet imports {root!r}, which setup.py does not declare'
        version = importlib.metadata.version(name)
        assert requirements[name].specifier.contains(version, prereleases=True), (name, version)
