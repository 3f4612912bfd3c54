"""Imports inside the library run one way, downward (README, "Layout"), and nothing imports the benchmark."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'mmdet_vanillanet'

# lowest first; a module may import modules of its own layer or below
LAYERS = [
    ['arch', 'cpu_support'],
    # inside checkpoint/: the error and the reading of files, what weights say, whether they fit, loading them
    ['checkpoint.weights_error', 'checkpoint.safe_load'],
    ['checkpoint.weights_description', 'checkpoint.state_dict_selection'],
    ['checkpoint.weights_fit'],
    ['checkpoint'],
    ['models'],
    ['detectors', 'output_comparison'],
    ['engine', 'datasets'],
    ['convert', 'deploy', 'export', 'visualization'],
    ['precision'],
    ['tool_setup', 'demo'],
    ['analysis'],
]


def module_name(path):
    parts = list(path.relative_to(PACKAGE).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def layer_of(name):
    """The layer of a dotted module name inside the package (longest prefix in LAYERS)."""
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + '.')) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f'{name} is in no layer of this test'
    return best[0]


def imported_modules(path):
    """Dotted names (inside the package) that the file imports, relative imports resolved."""
    package = module_name(path).split('.')
    if path.name != '__init__.py':
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                target = base + (node.module.split('.') if node.module else [])
            elif node.module.startswith('mmdet_vanillanet'):
                target = node.module.split('.')[1:]
            else:
                continue
            for alias in node.names:  # `from . import models` names a module
                candidate = '.'.join(target + [alias.name])
                exists = (PACKAGE / Path(*target, alias.name)).with_suffix('.py').exists() or \
                    (PACKAGE / Path(*target, alias.name)).is_dir()
                found.add(candidate if exists else '.'.join(target))
        elif isinstance(node, ast.Import):
            found |= {a.name[len('mmdet_vanillanet.'):] for a in node.names if a.name.startswith('mmdet_vanillanet.')}
    return {name for name in found if name}


def test_imports_run_downward_and_nothing_imports_the_benchmark():
    wrong = []
    for path in sorted(PACKAGE.rglob('*.py')):
        name = module_name(path)
        if not name:  # the package's __init__ imports its rooms to register them
            continue
        for target in imported_modules(path):
            if target.split('.')[0] == 'analysis' and name.split('.')[0] != 'analysis':
                wrong.append(f'{name} imports the benchmark ({target})')
            elif layer_of(target) > layer_of(name):
                wrong.append(f'{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})')
    assert not wrong, '\n'.join(wrong)


def room_of(name):
    """The room (sub-package, or top-level module) of a dotted module name inside the package."""
    return name.split('.')[0]


def test_no_cycle_between_rooms():
    """Rooms (sub-packages and top-level modules) import each other along a DAG: any import order works."""
    edges = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        name = module_name(path)
        if not name:
            continue
        for target in imported_modules(path):
            if room_of(target) != room_of(name):
                edges.setdefault(room_of(name), set()).add(room_of(target))

    def cycle_from(room, trail):
        if room in trail:
            return trail[trail.index(room):] + [room]
        for target in sorted(edges.get(room, ())):
            found = cycle_from(target, trail + [room])
            if found:
                return found
        return None

    cycles = [cycle_from(room, []) for room in sorted(edges)]
    assert not any(cycles), ' -> '.join(next(c for c in cycles if c))
