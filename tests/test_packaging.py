"""setup.py declares what the package imports, at versions this environment satisfies; the environment is the
one requirements/constraints.txt pins, and README's "Tested versions" and install examples say so."""
import ast
import importlib.metadata
import re
import site
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION_OF = {'cv2': 'opencv-python'}
CONSTRAINTS = ROOT / 'requirements' / 'constraints.txt'
# what a CUDA build of torch brings along; the constraints describe the tested CPU stack
CUDA_ONLY = re.compile(r'(nvidia-.*|triton)$')


def normalized(name):
    return re.sub(r'[-_.]+', '-', name).lower()


def pins():
    """Package name -> version of every line of requirements/constraints.txt (each must be name==version)."""
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split('#')[0].strip()
        if line:
            requirement = Requirement(line)
            specifiers = list(requirement.specifier)
            assert len(specifiers) == 1 and specifiers[0].operator == '==', f'{line!r}: pin as name==version'
            found[normalized(requirement.name)] = specifiers[0].version
    return found


def readme_table(title):
    """The rows (first cell, second cell) of the first Markdown table under README's ``## title``."""
    text = (ROOT / 'README.md').read_text()
    lines = text.split(f'## {title}\n', 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('|'))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith('|')), len(lines))
    cells = [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[start + 2:end]]
    return [(row[0], row[1]) for row in cells]


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


def test_every_installed_package_is_pinned_at_its_installed_version():
    pinned = pins()
    # what pip installed into the environment (not, say, setuptools' vendored copies once they are on sys.path)
    installed = {normalized(d.metadata['Name']): d.version
                 for d in importlib.metadata.distributions(path=site.getsitepackages())}
    installed.pop('mmdet-vanillanet', None)
    unpinned = sorted(name for name in installed if name not in pinned and not CUDA_ONLY.match(name))
    assert not unpinned, f'installed, but without a line in requirements/constraints.txt: {unpinned}'
    other = {name: (installed[name], version) for name, version in pinned.items()
             if name in installed and Version(installed[name]).public != Version(version).public}
    assert not other, f'installed versions differ from requirements/constraints.txt (installed, pinned): {other}'


def test_requirements_files_name_pinned_packages_and_make_install_uses_the_pins():
    pinned = pins()
    for path in sorted((ROOT / 'requirements').glob('*.txt')):
        if path == CONSTRAINTS:
            continue
        for line in path.read_text().splitlines():
            line = line.split('#')[0].strip()
            if line:
                requirement = Requirement(line)
                name = normalized(requirement.name)
                assert name in pinned, f'{path.name}: {name} has no line in requirements/constraints.txt'
                assert requirement.specifier.contains(pinned[name]), (path.name, line, pinned[name])
    installs = [line for line in (ROOT / 'Makefile').read_text().splitlines() if '$(PIP) install' in line]
    assert len(installs) == 6 and all('-c $(CONSTRAINTS)' in line for line in installs), installs


def test_readme_tested_versions_are_the_pinned_ones(tmp_path):
    pinned = pins()
    rows = dict(readme_table('Tested versions'))
    python = rows.pop('Python')
    requires_python = SpecifierSet(re.search(r'^Requires-Python: (.+)$', package_info(tmp_path), re.M).group(1))
    assert requires_python == SpecifierSet(f'>={python}'), (python, str(requires_python))
    assert sys.version_info[:2] >= tuple(map(int, python.split('.')))
    assert {'torch', 'mmcv', 'mmengine', 'mmdet', 'numpy', 'opencv-python'} <= set(rows)
    for package, version in rows.items():
        name = normalized(package.split(' (')[0])
        assert version.split()[0].rstrip(',') == pinned[name], f'README says {package} {version}, ' \
            f'requirements/constraints.txt {pinned[name]}'


def test_readme_cuda_example_installs_the_pinned_torch_that_setup_py_accepts(tmp_path):
    example = re.search(r"make install TORCH_SPEC='torch==(\S+) [^']*'", (ROOT / 'README.md').read_text()).group(1)
    assert example == pins()['torch']
    torch_requirement = next(r for r in declared(tmp_path) if r.name == 'torch')
    assert torch_requirement.specifier.contains(example), (str(torch_requirement), example)


def package_info(folder):
    """setup.py's PKG-INFO (metadata such as Requires-Python), as setuptools writes it."""
    declared(folder)
    return (folder / 'mmdet_vanillanet.egg-info' / 'PKG-INFO').read_text()
