"""Docs that stay true: README.md and docs/*.md link to files that exist and name code that exists (docs/equations.md
points at a definition for every equation), every `python -m hpl_jax.<command>` they, the configs' docstrings and the
launch scripts show names a real module whose `--help` works and real flags, every `--config=` path loads with the
overrides beside it, and the own-loop example runs and learns. docs/method.md has its sections, every section of it
cited by name exists and it holds the published numbers; LICENSE, CITATION.cff and pyproject.toml agree on the license.
(The package's shape and `import hpl_jax`: tests/test_package.py.)"""
import ast
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
# Records of past runs, kept as they were written (module names of their day included).
RECORDS = sorted(glob.glob(os.path.join(ROOT, "docs", "device_check_h200*.md")))
# Commands shown outside the pages: the configs' docstrings and the launch scripts.
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "launch", "*")))
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


def _script_lines(text):
    """Every line of a config or launch script, continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def _commands(text, lines=_command_lines):
    """(module, tokens after it) of each `python -m hpl_jax.X ...` shown (in a script also `"$PYTHON" -m ...`)."""
    found = []
    for line in lines(text):
        for match in re.finditer(r'(?:python3?|"\$[^"\s]*") -m (hpl_jax(?:\.[a-z_]+)+)', line):
            rest = re.split(r"&&|\||;|`|\s#", line[match.end():])[0]
            try:
                tokens = shlex.split(rest)
            except ValueError:
                tokens = rest.split()
            found.append((match.group(1), tokens))
    return found


def _config_uses(text, lines=_command_lines):
    """(config path, [override field paths]) of every `--config=PATH` (or `PATH:ARGUMENT`) shown, with the
    `--config.x.y=...` beside it."""
    uses = []
    for line in lines(text):
        tokens = line.split()
        for token in tokens:
            path = token[len("--config="):].split(":")[0]
            if token.startswith("--config=") and path.endswith(".py") and "$" not in path:
                overrides = [t[len("--config."):].split("=")[0] for t in tokens if t.startswith("--config.")]
                uses.append((path, overrides))
    return uses


def _shown(find):
    """[(file, *found)] of `find(text, lines)` over the pages, the configs' docstrings and the launch scripts."""
    found = [(page, *item) for page in PAGES for item in find(open(page).read(), _command_lines)]
    return found + [(script, *item) for script in SCRIPTS for item in find(open(script).read(), _script_lines)]


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
def _help(module):
    """(whether `python -m module --help` printed its usage, the flags it lists, its output's tail). argparse exits 0;
    absl exits 1 by design after printing the usage, so its usage line and no traceback count there."""
    finished = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    printed_usage = finished.returncode == 0 or (
        finished.returncode == 1 and "Try --helpfull to get a list of all flags." in finished.stdout
        and "Traceback" not in finished.stderr)
    return printed_usage, frozenset(FLAG.findall(finished.stdout + finished.stderr)), finished.stderr[-2000:]


@pytest.mark.slow
def test_every_command_shown_names_a_module_and_its_flags():
    commands = _shown(_commands)
    assert len({page for page, _, _ in commands if page in PAGES}) > 5, "README and docs/ show the commands"
    assert len({page for page, _, _ in commands if page in SCRIPTS}) > 10, "configs/ and launch/ show the commands"
    missing = sorted({module for _, module, _ in commands if importlib.util.find_spec(module) is None})
    assert not missing, f"commands shown for modules that do not exist: {missing}"
    modules = sorted({module for _, module, _ in commands})
    assert {f"hpl_jax.{name}" for name in ("main", "evaluate", "convert_weights", "sweep", "report", "visualize",
                                           "mlrc", "mlrc_report")} <= set(modules), "an entry point nobody shows"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        helps = dict(zip(modules, pool.map(_help, modules)))
    broken = [f"{module}: {helps[module][2]}" for module in modules if not helps[module][0]]
    assert not broken, "python -m MODULE --help failed:\n" + "\n".join(broken)
    unknown = []
    for page, module, tokens in commands:
        flags = helps[module][1]
        for token in tokens:
            if not token.startswith("--") or token.startswith("--config."):
                continue
            name = token[2:].split("=")[0]
            if name not in flags and not (name.startswith("no") and name[2:] in flags):
                unknown.append(f"{_page_id(page)}: {module} {token}")
    assert not unknown, "flags the commands do not define:\n" + "\n".join(unknown)


def test_every_config_shown_loads_with_its_overrides():
    uses = {(path, tuple(overrides)) for _, path, overrides in _shown(_config_uses)}
    assert len(uses) > 20, "README, docs/, configs/ and launch/ show --config= commands"
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


# --------------------------------------------------------------------------------- code the docs name
CODE_NAME = re.compile(r"\bhpl_jax(?:[./][A-Za-z_][A-Za-z0-9_]*)+|\btests/[\w/]+\.py")
POINTER = re.compile(r"^(hpl_jax/[\w/]+\.py)(?::\s*(\w+))?$|^hpl_jax/[\w/]+/$")


@functools.lru_cache(maxsize=None)
def _bindings(path):
    """{name: the dotted name it was imported from, or None for a definition} at the top level of a module (its
    `if` and `try` blocks included). A module with a `__getattr__` also binds the strings it holds (its lazy
    exports: hpl_jax/__init__.py's table)."""
    tree = ast.parse(open(path).read(), path)
    names = {}

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names[node.name] = None
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update({n.id: None for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)})
            elif isinstance(node, ast.Import):
                names.update({alias.asname or alias.name.split(".")[0]: alias.name if alias.asname
                              else alias.name.split(".")[0] for alias in node.names})
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names})
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + [n for handler in getattr(node, "handlers", []) for n in handler.body])

    visit(tree.body)
    if "__getattr__" in names:
        names.update({node.value: None for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier()})
    return names


def _module_file(dotted):
    """The source of module `dotted` (a package's __init__.py), the folder of a namespace package, or None."""
    base = os.path.join(ROOT, *dotted.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py"), base):
        if os.path.exists(candidate):
            return candidate
    return None


def _names_code(dotted):
    """True if `dotted` (hpl_jax.x.y...) is a module of the package or a name defined or imported in one."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        path = _module_file(".".join(parts[:k]))
        if path:
            break
    rest = parts[k:]
    if not rest:
        return True
    if not path.endswith(".py") or rest[0] not in _bindings(path):
        return False
    source = _bindings(path)[rest[0]]
    if source and source.split(".")[0] == "hpl_jax":
        return _names_code(".".join([source] + rest[1:]))
    return len(rest) == 1 or source is not None


def _defines(path, name):
    return name in _bindings(os.path.join(ROOT, path))


def _pointer_problems(spans, *, pointers_only=False):
    """What is wrong with the code pointers among inline code spans: `hpl_jax/x.py: name` and `hpl_jax/x.py` point at
    a file (and a name in it), `hpl_jax/x/` at a folder. `pointers_only` (docs/equations.md's code cells and
    paragraphs): every span must be a pointer, a bare `name` in the last file pointed at, or a config setting
    (`field = value`)."""
    problems, path = [], None
    for span in spans:
        pointer = POINTER.match(span)
        if pointer:
            path, name = pointer.groups()
            if not os.path.exists(os.path.join(ROOT, path or span)):
                problems.append(f"`{span}`: no such file or folder")
                path = None
            elif name and not _defines(path, name):
                problems.append(f"`{span}`: {path} defines no {name}")
        elif pointers_only and re.fullmatch(r"\w+", span) and path:
            if not _defines(path, span):
                problems.append(f"`{span}`: {path} defines no {span}")
        elif pointers_only and " = " not in span:
            problems.append(f"`{span}`: not a pointer `hpl_jax/<file>.py: <name>`")
    return problems


def test_equations_point_at_definitions_that_exist():
    """docs/equations.md: each row's code cell, and each paragraph after the table, holds only pointers, and each
    names a definition that exists."""
    text = open(os.path.join(ROOT, "docs", "equations.md")).read()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| docs/method.md")]
    assert len(rows) > 15, "docs/equations.md maps the equations in a table"
    problems = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 2, row
        found = _pointer_problems(INLINE_CODE.findall(cells[1]), pointers_only=True)
        assert INLINE_CODE.findall(cells[1]), f"a row without a pointer: {row}"
        problems += [f"{cells[0]}: {problem}" for problem in found]
    for paragraph in re.split(r"\n\s*\n", text.split(rows[-1], 1)[1]):
        problems += _pointer_problems(INLINE_CODE.findall(paragraph), pointers_only=True)
    assert not problems, "docs/equations.md:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", [page for page in PAGES if page not in RECORDS], ids=_page_id)
def test_code_the_pages_name_exists(page):
    """Every `hpl_jax/...` and `tests/...` path and `hpl_jax.x.y` name a page mentions exists; so does each
    `path.py: name`."""
    text = open(page).read()
    problems = []
    for name in sorted(set(CODE_NAME.findall(text))):
        if "/" in name:
            if not os.path.exists(os.path.join(ROOT, name)):
                problems.append(f"{name}: no such file")
        elif not _names_code(name):
            problems.append(f"{name}: no such module or name")
    problems += _pointer_problems(INLINE_CODE.findall(text))
    assert not problems, f"{_page_id(page)} names code that does not exist:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------- the method page and the citations
METHOD_PAGE = os.path.join(ROOT, "docs", "method.md")
# A section of the method page cited by name: its path, at most 4 characters (", "), then the heading in double quotes.
SECTION_CITATION = re.compile(r'docs/method\.md[^"\n]{0,4}"([^"\n]+)"')
HEADING = re.compile(r"^#{2,3} (.+?)\s*$", re.M)
METHOD_SECTIONS = ("Deep metric learning", "The base losses", "The hierarchy",
                   "How the groupings are found and refreshed", "Coarse-proxy bookkeeping", "Training recipe", "Model",
                   "Benchmarks and class splits", "The MLRC protocol", "Unknowns of the paper and the choices made",
                   "Published numbers", "References")


@functools.lru_cache(maxsize=None)
def _repository_text_files():
    """((path relative to ROOT, text), ...) of every file git tracks or would track (untracked but not ignored), binary
    files and files deleted from the working tree left out."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout (git ls-files: {listed.stderr.decode(errors='replace').strip()})")
    files = []
    for path in sorted(set(listed.stdout.decode().split("\0")) - {""}):
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):
            continue
        data = open(full, "rb").read()
        if b"\0" in data[:8192]:
            continue
        try:
            files.append((path, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return tuple(files)


def _method_headings():
    return HEADING.findall(open(METHOD_PAGE).read())


def test_method_page_is_the_only_method_description_cited():
    """The method is described in docs/method.md and nowhere outside the repository: no file names an upper-case
    method file (the name is built here so that this file does not hold it)."""
    outside_name = "METHOD" + ".md"
    offenders = [f"{path}:{text.count(chr(10), 0, text.index(outside_name)) + 1}"
                 for path, text in _repository_text_files() if outside_name in text]
    assert not offenders, f"files that cite {outside_name} instead of docs/method.md: {offenders}"


def test_method_page_has_its_sections():
    headings = _method_headings()
    missing = [name for name in METHOD_SECTIONS if name not in headings]
    assert not missing, f"docs/method.md lacks the sections {missing}; its headings: {headings}"


def test_sections_cited_in_the_method_page_exist():
    """Every section of docs/method.md a file of the repository cites by name (SECTION_CITATION) begins one of its `##`
    or `###` headings."""
    headings = _method_headings()
    citations, problems = 0, []
    for path, text in _repository_text_files():
        for match in SECTION_CITATION.finditer(text):
            citations += 1
            if not any(heading.startswith(match.group(1)) for heading in headings):
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{path}:{line}: {match.group(1)!r}")
    assert citations > 10, "code and docs cite the method page's sections by name"
    assert not problems, "sections cited that docs/method.md has no heading for:\n" + "\n".join(problems)


def _published_mlrc_numbers():
    """hpl_jax/experiments/mlrc_report.py's PUBLISHED table, read from its source (its import needs the data stack)."""
    tree = ast.parse(open(os.path.join(ROOT, "hpl_jax", "experiments", "mlrc_report.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PUBLISHED" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("hpl_jax/experiments/mlrc_report.py defines no PUBLISHED table")


def test_method_page_holds_the_published_numbers():
    """docs/method.md, "Published numbers": the HPL paper's MLRC rows (the same as the report prints beside a run's),
    the Recall@1 of the official Proxy-Anchor code and of HIER, and the note that none was reproduced here."""
    text = open(METHOD_PAGE).read()
    section = text.split("## Published numbers", 1)[1].split("\n## ", 1)[0]
    assert "not reproduced here" in section.lower()
    assert "third-party transcription" in section and "2103.13538" in section
    names = {"sop": "SOP", "cars": "Cars196", "cub": "CUB-200"}
    for dataset, methods in _published_mlrc_numbers().items():
        cells = [" / ".join(f"{value:.2f}" for value in methods[method])
                 for method in ("Proxy-Anchor", "HPL on Proxy-Anchor")]
        row = f"| {names[dataset]} | {cells[0]} | {cells[1]} |"
        assert row in section, f"docs/method.md lacks the published row {row}"
    for row in ("| Proxy-Anchor (a) | ResNet-50 | 69.9 | 87.7 | - | - |",
                "| Proxy-Anchor (a) | BN-Inception | 69.1 | 86.4 | 79.2 | 91.9 |",
                "| HIER on Proxy-Anchor (b) | ResNet-50 | 70.1 | 88.2 | 80.2 | 92.4 |"):
        assert row in section, f"docs/method.md lacks the published row {row}"
    assert "github.com/tjddus9597/Proxy-Anchor-CVPR2020" in section and "github.com/tjddus9597/HIER-CVPR23" in section


# ------------------------------------------------------------------------------------------- license and citation
APACHE_2 = "Apache-2.0"


def test_license_is_apache_2():
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert re.match(r"Apache License\s+Version 2\.0, January 2004\s", text.lstrip()), "LICENSE: the Apache License 2.0"
    assert "END OF TERMS AND CONDITIONS" in text


def test_citation_file_names_the_paper_and_the_release():
    import yaml  # flax depends on PyYAML

    citation = yaml.safe_load(open(os.path.join(ROOT, "CITATION.cff")))
    assert citation["cff-version"] == "1.2.0"
    assert citation["title"] == "hpl-jax" and citation["license"] == APACHE_2
    version = re.search(r'^__version__ = "([^"]+)"$', open(os.path.join(ROOT, "hpl_jax", "__init__.py")).read(), re.M)
    assert str(citation["version"]) == version.group(1), "CITATION.cff's version is hpl_jax.__version__"
    paper = citation["preferred-citation"]
    assert paper["type"] == "conference-paper" and paper["year"] == 2022
    assert paper["title"] == "Hierarchical Proxy-based Loss for Deep Metric Learning"
    assert [author["family-names"] for author in paper["authors"]] == ["Yang", "Bastan", "Zhu", "Gray", "Samaras"]
    assert "WACV" in paper["conference"]["name"]
    assert paper["url"] == "https://arxiv.org/abs/2103.13538"
    assert "arXiv:2103.13538" in [identifier["value"] for identifier in paper["identifiers"]]


def test_pyproject_declares_the_license():
    import tomllib

    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    declared = project.get("license")
    assert declared is not None, f"pyproject.toml's [project] declares no license; add license = \"{APACHE_2}\""
    assert declared == APACHE_2, f"pyproject.toml's license is {declared!r}; LICENSE and CITATION.cff say {APACHE_2}"
