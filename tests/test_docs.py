"""Docs that stay true: README.md and docs/*.md link to files that exist, every `python -m hpl_jax.<command>` they
show names a real module and real flags, every `--config=` path loads with the overrides beside it, the package's
public API imports without TensorFlow, and the own-loop example runs and learns."""
import concurrent.futures
import functools
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"--(?:\[no\])?([A-Za-z0-9_]+)")


def _page_id(path):
    return os.path.relpath(path, ROOT)


def _command_lines(text):
    """Shell lines of the page's code blocks (continuations joined) and its inline code spans."""
    lines = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.split(" #")[0].strip() for line in joined.splitlines()]
    lines += INLINE_CODE.findall(text)
    return [line for line in lines if line]


def _commands(text):
    """(module, tokens after it) of each `python -m hpl_jax.X ...` shown."""
    found = []
    for line in _command_lines(text):
        for match in re.finditer(r"python3? -m (hpl_jax(?:\.[a-z_]+)+)", line):
            rest = line[match.end():].split("&&")[0].split("|")[0].split(";")[0]
            try:
                tokens = shlex.split(rest)
            except ValueError:
                tokens = rest.split()
            found.append((match.group(1), tokens))
    return found


def _config_uses(text):
    """(config path, [override field paths]) of every `--config=PATH` shown, with the `--config.x.y=...` beside it."""
    uses = []
    for line in _command_lines(text):
        tokens = line.split()
        for token in tokens:
            if token.startswith("--config=") and token.endswith(".py"):
                overrides = [t[len("--config."):].split("=")[0] for t in tokens if t.startswith("--config.")]
                uses.append((token[len("--config="):], overrides))
    return uses


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page):
    text = open(page).read()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
        if not os.path.exists(path):
            broken.append(target)
    assert not broken, f"{_page_id(page)} links to missing files: {broken}"


@functools.lru_cache(maxsize=None)
def _known_flags(module):
    """The flags `python -m module --help` lists (absl and argparse both print them as --name)."""
    finished = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    return frozenset(FLAG.findall(finished.stdout + finished.stderr))


@pytest.mark.slow
def test_every_command_shown_names_a_module_and_its_flags():
    commands = [(page, module, tokens) for page in PAGES for module, tokens in _commands(open(page).read())]
    assert len(commands) > 20, "README and docs/ show the commands"
    missing = sorted({module for _, module, _ in commands if importlib.util.find_spec(module) is None})
    assert not missing, f"commands shown for modules that do not exist: {missing}"
    modules = sorted({module for _, module, _ in commands})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        flags = dict(zip(modules, pool.map(_known_flags, modules)))
    unknown = []
    for page, module, tokens in commands:
        for token in tokens:
            if not token.startswith("--") or token.startswith("--config."):
                continue
            name = token[2:].split("=")[0]
            if name not in flags[module] and not (name.startswith("no") and name[2:] in flags[module]):
                unknown.append(f"{_page_id(page)}: {module} {token}")
    assert not unknown, "flags the commands do not define:\n" + "\n".join(unknown)


def test_every_config_shown_loads_with_its_overrides():
    uses = {(path, tuple(overrides)) for page in PAGES for path, overrides in _config_uses(open(page).read())}
    assert uses, "README shows --config= commands"
    sys.path.insert(0, ROOT)
    problems = []
    for path, overrides in sorted(uses):
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            problems.append(f"{path}: no such file")
            continue
        spec = importlib.util.spec_from_file_location("shown_config", full)
        config_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(config_module)
        config = config_module.get_config()
        for field in overrides:
            node = config
            for part in field.split("."):
                if part not in node:
                    problems.append(f"{path}: --config.{field} is not a field")
                    break
                node = node[part]
    assert not problems, "\n".join(problems)


def test_public_api_imports_without_tensorflow():
    code = ("import sys, hpl_jax; missing = [n for n in hpl_jax.__all__ if not hasattr(hpl_jax, n)]; "
            "print(missing, 'tensorflow' in sys.modules)")
    finished = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert finished.stdout.split("\n")[0] == "[] False"


@pytest.mark.slow
def test_own_training_loop_example_learns(capsys):
    spec = importlib.util.spec_from_file_location("own_training_loop", os.path.join(ROOT, "docs", "own_training_loop.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    untrained, trained = example.main(epochs=3)
    assert trained > untrained + 0.05, (untrained, trained)
    assert "test Recall@1 (unseen classes)" in capsys.readouterr().out


def test_the_package_exports_hide_no_submodule():
    """An export named like a submodule (a function `kmeans` beside the module `hpl_jax.kmeans`) would hand every
    later `from hpl_jax import <name>` the function instead of the module."""
    import pkgutil

    import hpl_jax

    submodules = {info.name for info in pkgutil.iter_modules(hpl_jax.__path__)}
    assert not submodules & set(hpl_jax.__all__)
