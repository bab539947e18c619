"""The package keeps its shape (hpl_jax/__init__.py, "The package, by layer"): `import hpl_jax` stays light, each
layer imports only the layers below it (read from the source, function-local imports included), no two modules
import each other round a cycle, and the top level holds only the commands' thin entry points and errors.py."""
import ast
import functools
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "hpl_jax")
# `python -m hpl_jax.<command>`: thin entry points, imported by nothing.
ENTRY_MODULES = ("main", "evaluate", "convert_weights", "sweep", "report", "visualize", "mlrc", "mlrc_report")
LAYERS = ("errors", "core", "grouping", "models", "data", "trainer", "experiments", "benchmarks")
# What each layer may import besides itself. "api" is hpl_jax/__init__.py, "entry" the entry points.
MAY_IMPORT = {
    "errors": set(),
    "core": {"errors"},
    "grouping": {"errors", "core"},
    "models": {"errors"},
    "data": {"errors"},
    "trainer": {"errors", "core", "grouping", "models", "data", "api"},
    "experiments": {"errors", "core", "grouping", "models", "data", "trainer", "api"},
    "benchmarks": {"errors", "core", "grouping", "models", "data", "trainer", "experiments", "api"},
    "api": {"core", "grouping"},
    "entry": {"errors", "core", "grouping", "models", "data", "trainer", "experiments", "api"},
}
# Outside the standard library, the only packages a layer's source names (scikit-learn and SciPy stay beside the core).
THIRD_PARTY = {
    "errors": set(),
    "core": {"jax", "numpy", "flax.struct"},
    "grouping": {"jax", "numpy", "sklearn", "scipy"},
}
HEAVY = ("tensorflow", "orbax", "ml_collections", "sklearn", "scipy")


def _run_python(code):
    finished = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


@functools.lru_cache(maxsize=None)
def _modules():
    """{dotted module name: file} of every module of the package (a package is its __init__.py)."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, name)
    return found


def _layer(module):
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return "entry" if parts[1] in ENTRY_MODULES else parts[1]


def _resolved(name):
    """The module of the package that importing `name` runs: the longest prefix that is a module."""
    while name not in _modules():
        name = name.rpartition(".")[0]
    return name


@functools.lru_cache(maxsize=None)
def _imports(module):
    """[(imported name, line)] of every import statement in `module`'s source, function-local ones included, and of
    every module it runs or imports by name (`runpy.run_module("x.y")`, `importlib.import_module("x.y")`); relative
    imports made absolute, `from X import y` as X.y when y is a module of the package."""
    path = _modules()[module]
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("run_module", "import_module") and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
                package = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                found.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in _modules() else base, node.lineno))
    return found


def _package_imports(module):
    """{imported module of the package: first line} of `module`, itself left out."""
    found = {}
    for name, line in _imports(module):
        if name == "hpl_jax" or name.startswith("hpl_jax."):
            target = _resolved(name)
            if target != module:
                found.setdefault(target, line)
    return found


def test_import_hpl_jax_loads_none_of_the_heavy_dependencies_and_the_lazy_exports_resolve():
    code = f"""if True:
        import json, sys
        import hpl_jax
        hpl_jax.kmeans.kmeans, hpl_jax.proxy_anchor_loss, hpl_jax.retrieval_metrics
        heavy = [name for name in {HEAVY!r} if name in sys.modules]
        import hpl_jax.grouping
        lazy = hpl_jax.refresh_hierarchy is hpl_jax.grouping.refresh_hierarchy
        unresolved = [name for name in hpl_jax.__all__ if not hasattr(hpl_jax, name)]
        try:
            hpl_jax.no_such_name
            refused = False
        except AttributeError:
            refused = True
        print(json.dumps({{"heavy": heavy, "lazy": lazy, "unresolved": unresolved, "refused": refused,
                           "listed": "refresh_hierarchy" in dir(hpl_jax)}}))
    """
    found = _run_python(code)
    assert found["heavy"] == [], f"import hpl_jax loads {found['heavy']}"
    assert found["lazy"] and found["listed"], "hpl_jax.refresh_hierarchy is not hpl_jax.grouping's"
    assert found["unresolved"] == [], f"hpl_jax.__all__ names missing attributes: {found['unresolved']}"
    assert found["refused"], "hpl_jax.no_such_name did not raise AttributeError"


def test_only_the_tfds_modules_import_tensorflow():
    """docs/datasets.md: only hpl_jax/data/input_pipeline.py and the In-Shop builder import TensorFlow; every other
    module of the library layers (the entry points and benchmarks define flags, so they are not imported here)."""
    tfds_modules = {"hpl_jax.data.input_pipeline", "hpl_jax.data.inshop"}
    library = sorted(m for m in _modules() if _layer(m) in set(LAYERS) - {"benchmarks"} and m not in tfds_modules)
    assert len(library) > 30
    code = f"""if True:
        import importlib, json, sys
        loaded_by = None
        for name in {library!r}:
            importlib.import_module(name)
            if "tensorflow" in sys.modules:
                loaded_by = name
                break
        print(json.dumps(loaded_by))
    """
    assert _run_python(code) is None, "TensorFlow imported by a module outside the TFDS pipeline"


def test_the_top_level_holds_the_entry_points_and_errors_only():
    top_level = sorted(m.split(".")[1] for m in _modules() if m.count(".") == 1 and _layer(m) in ("entry", "errors"))
    modules = sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py") and name != "__init__.py")
    assert len(modules) <= 10, f"{len(modules)} modules at hpl_jax/'s top level: {modules}"
    assert modules == top_level, "a top-level module that is neither an entry point (ENTRY_MODULES) nor errors.py"
    folders = sorted(name for name in os.listdir(PACKAGE) if os.path.isdir(os.path.join(PACKAGE, name))
                     and name != "__pycache__")
    assert folders == sorted(set(LAYERS) - {"errors"}), "a folder of hpl_jax/ that no layer rule covers"


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_each_layer_imports_only_the_layers_below_it(layer):
    members = [m for m in _modules() if _layer(m) == layer]
    assert members, f"no module in layer {layer}"
    wrong = [f"{module}:{line} imports {target}" for module in sorted(members)
             for target, line in sorted(_package_imports(module).items())
             if _layer(target) not in MAY_IMPORT[layer] and not (_layer(target) == layer != "entry")]
    assert not wrong, f"{layer} may import only {sorted(MAY_IMPORT[layer])} and itself:\n" + "\n".join(wrong)


@pytest.mark.parametrize("layer", sorted(THIRD_PARTY))
def test_the_lower_layers_import_only_their_few_packages(layer):
    allowed = THIRD_PARTY[layer]
    wrong = []
    for module in sorted(m for m in _modules() if _layer(m) == layer):
        for name, line in _imports(module):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__" or top == "hpl_jax":
                continue
            if not any(name == package or name.startswith(package + ".") for package in allowed):
                wrong.append(f"{module}:{line} imports {name}")
    assert not wrong, f"{layer} may import the standard library and {sorted(allowed)}:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {module: set(_package_imports(module)) for module in _modules()}
    assert sum(map(len, graph.values())) > 50
    state, path = {}, []

    def cycle_from(module):
        """A cycle reachable from `module` (depth-first; grey = on the current path), or None."""
        state[module] = "grey"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "grey":
                return path[path.index(target):] + [target]
            if target not in state:
                found = cycle_from(target)
                if found:
                    return found
        path.pop()
        state[module] = "black"
        return None

    for module in sorted(graph):
        if module not in state:
            found = cycle_from(module)
            assert found is None, "import cycle: " + " -> ".join(found)


def test_the_layer_checks_see_the_imports_they_judge():
    """The checks above are only as good as the import reading: it must see function-local and relative imports,
    and tell a module imported from a package from a name."""
    assert "hpl_jax.data.input_pipeline" in _package_imports("hpl_jax.data.datasets")  # inside a function
    assert set(_package_imports("hpl_jax.grouping")) == {"hpl_jax.grouping.hierarchy_metrics",
                                                         "hpl_jax.grouping.refresh"}
    assert "hpl_jax.core.kmeans" in _package_imports("hpl_jax.core.metrics")  # `from hpl_jax.core import kmeans`
    assert "hpl_jax.data" in _package_imports("hpl_jax.trainer.train")  # `from hpl_jax import data`
    assert "hpl_jax.experiments.sweep" in _package_imports("hpl_jax.sweep")  # `runpy.run_module(...)`
    assert all(_layer(m) == "entry" for m in ("hpl_jax." + name for name in ENTRY_MODULES))
    assert _layer("hpl_jax") == "api" and _layer("hpl_jax.core.losses") == "core"


def test_the_package_exports_hide_no_submodule():
    """An export named like a submodule (a function `kmeans` beside the module `hpl_jax.kmeans`) would hand every
    later `from hpl_jax import <name>` the function instead of the module."""
    import pkgutil

    import hpl_jax

    submodules = {info.name for info in pkgutil.iter_modules(hpl_jax.__path__)}
    assert not submodules & set(hpl_jax.__all__)


def _section(text, heading):
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert match, f"no section {heading!r}"
    return match.group(1)


@pytest.mark.parametrize("page, heading", [("README.md", "The package"),
                                           ("hpl_jax/__init__.py", None)], ids=["README", "docstring"])
def test_the_layer_maps_name_every_folder_and_entry_point(page, heading):
    text = open(os.path.join(ROOT, page)).read()
    text = _section(text, heading) if heading else text.split('"""')[1].split("The package, by layer")[1]
    missing = [f"{layer}/" for layer in LAYERS if layer != "errors" and f"{layer}/" not in text]
    missing += [f"{name}.py" for name in ENTRY_MODULES + ("errors",) if f"{name}.py" not in text
                and f"hpl_jax.{name}" not in text]
    assert not missing, f"{page}'s map of the package leaves out {missing}"
