"""The shape of the code, checked statically: no import cycle among the package's and
the benchmarks' modules (imports inside functions count: hiding one there does not
break a cycle), and no tracked Python file over 500 lines."""
import ast
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 500


def tracked_python_files():
    try:
        out = subprocess.run(['git', 'ls-files', '*.py'], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('not a git checkout: the layout checks read git ls-files')
    return [f for f in out.split() if os.path.exists(os.path.join(REPO, f))]


def module_name(path):
    """``chainer_vfbn/fused/unit.py`` -> ``chainer_vfbn.fused.unit``."""
    parts = path[:-3].split('/')
    if parts[-1] == '__init__':
        parts = parts[:-1]
    return '.'.join(parts)


def imported_names(path):
    """Every module name ``path`` imports, anywhere in the file, with the folder it
    is in (a benchmark's bare ``import common`` means a file beside it)."""
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [node.module + '.' + alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = module_name(path).split('.')
            base = base[:len(base) - node.level + (path.endswith('__init__.py'))]
            module = '.'.join(base + ([node.module] if node.module else []))
            names.append(module)
            names += [module + '.' + alias.name for alias in node.names]
    return names


def import_graph(files):
    """``{module: {modules of the repository it imports}}`` for the package and
    benchmarks/."""
    modules = {module_name(f): f for f in files}
    graph = {}
    for f in files:
        if not f.startswith(('chainer_vfbn/', 'benchmarks/')):
            continue
        here = module_name(f).rsplit('.', 1)[0]
        edges = set()
        for name in imported_names(f):
            for candidate in (name, here + '.' + name, 'benchmarks.device_check.' + name):
                if candidate in modules and candidate != module_name(f):
                    edges.add(candidate)
                    break
        graph[module_name(f)] = edges
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_a_hidden_import():
    """The checker itself: a two-module circle, one side of it inside a function."""
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
    assert find_cycle(graph) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None
    source = 'def f():\n    from chainer_vfbn import runs\n'
    tree_names = [n for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.ImportFrom)
                  for n in [node.module] + [node.module + '.' + a.name for a in node.names]]
    assert 'chainer_vfbn.runs' in tree_names


def test_no_import_cycle_in_the_package_or_the_benchmarks():
    graph = import_graph(tracked_python_files())
    assert 'chainer_vfbn.pipeline' in graph and graph['chainer_vfbn.pipeline'], \
        'the import graph is empty: the checker reads nothing'
    cycle = find_cycle(graph)
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_no_tracked_python_file_over_500_lines():
    long = {}
    for f in tracked_python_files():
        with open(os.path.join(REPO, f)) as fh:
            n = sum(1 for _ in fh)
        if n > MAX_LINES:
            long[f] = n
    assert not long, 'over %d lines (split along a seam): %s' % (MAX_LINES, long)
