"""The documentation is tested: every Python example in docs/ and README.md runs, and the site builds.

How a page is run (one test per page):

- Fenced code blocks are read in page order. Blocks in ```` ```python ```` (or ``py``) without a title
  run with ``exec`` in one namespace per page, so a later block sees what an earlier one defined. They
  run in a fresh temporary folder (the working directory), so ``save_pretrained("out/")`` writes there.
- A block with a file title, ```` ```python title="peftkit_rankone/layer.py" ````, is a file of an
  example package: it is written under the page's temporary folder, which is put on ``sys.path``, and
  a later block imports it. Every Python file written this way must be imported (or, under
  ``tests/``, run with pytest) by the end of the page, so no example code goes unchecked. A ``toml``
  block with a title is written the same way and must parse.
- A ```` ```text ```` block right after the comment ``<!-- expected-output -->`` must match what the
  Python block before it printed (trailing spaces and blank edges aside; ``...`` stands for any text).
- A ```` ```console ```` block holds ``$ peftkit ...`` commands, each followed by its output. Each
  runs in-process (the page's folder as working directory, ``NAME=value`` prefixes as environment)
  and its output must match; ``...`` in the shown output stands for any text (a path, a long tail).
- A Python block preceded by ``<!-- not-run: REASON -->`` is skipped; the reason must say why. Use it
  only for what cannot run offline in seconds (a real model download), never to hide a feature.

Plugins registered by a page are forgotten after it: the plugin host is reset between pages, and
environment variables are restored. Examples run with one torch thread: their models are tiny. A
separate test runs ``mkdocs build --strict`` into a temporary folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PYTHON_LANGS = {"python", "py", "python3"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
TITLE = re.compile(r"""title\s*=\s*["']([^"']+)["']""")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(?P<reason>.*?)\s*-->$")
EXPECTED_OUTPUT = "<!-- expected-output -->"


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    lang: str
    title: str | None
    code: str
    marker: str | None  # the HTML comment on the last non-blank line before the fence, if any
    output: str = field(default="", compare=False)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    found = sorted(DOCS.rglob("*.md"))
    readme = ROOT / "README.md"
    return found + ([readme] if readme.is_file() else [])


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i, last_text = [], 0, None
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            if lines[i].strip():
                last_text = lines[i].strip()
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        lang = info.split()[0].lstrip(".{").lower() if info else ""
        title = TITLE.search(info)
        body, j = [], i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        marker = last_text if last_text and last_text.startswith("<!--") else None
        blocks.append(Block(page, i + 2, lang, title.group(1) if title else None, "\n".join(body) + "\n", marker))
        last_text, i = None, j + 1
    return blocks


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def _matches_shown(actual: str, shown: str) -> bool:
    pattern = re.escape(_normalise(shown)).replace(re.escape("..."), ".*")
    return re.fullmatch(pattern, _normalise(actual), flags=re.DOTALL) is not None


def console_commands(block: Block) -> list[tuple[str, str]]:
    """The ``(command, shown output)`` pairs of a console block."""
    pairs: list[tuple[str, list[str]]] = []
    for line in block.code.splitlines():
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        else:
            assert pairs, f"{block.where}: a console block starts with a '$ ' command line"
            pairs[-1][1].append(line)
    return [(command, "\n".join(shown)) for command, shown in pairs]


def run_cli(command: str, where: str) -> str:
    """Run ``[NAME=value ...] peftkit ARGS`` in this process, as a shell would; return what it printed."""
    from click.testing import CliRunner
    from peftkit import plugins
    from peftkit.cli import make_cli

    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[:1] == ["peftkit"], f"{where}: console blocks show peftkit commands only (use bash for others): {command}"
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        plugins.reset()
        result = CliRunner().invoke(make_cli(), words[1:], prog_name="peftkit", catch_exceptions=False)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        plugins.reset()
    return result.output


def _installed_view(folder: Path) -> Path:
    """What ``pip install -e .`` makes visible of the page's package: its entry points, as a dist-info folder.

    The page's own ``pyproject.toml`` decides them, so a wrong entry point fails the page's test file.
    """
    site = folder / ".installed"
    site.mkdir(exist_ok=True)
    pyproject = folder / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n", encoding="utf-8"
        )
        groups = project.get("entry-points", {})
        lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) for group, entries in groups.items()]
        (info / "entry_points.txt").write_text("\n".join(lines), encoding="utf-8")
    return site


def _run_pytest_file(path: Path, folder: Path) -> None:
    """Run a test file the page wrote (a conformance suite) in a fresh interpreter, the package "installed".

    One example per property on the CPU keeps it quick; the page's package has its full run in its own CI.
    """
    paths = [str(_installed_view(folder)), str(folder), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--peftkit-device", "cpu",
         "--peftkit-examples", "1", str(path)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"


@pytest.fixture
def clean_plugins():
    from peftkit import plugins

    plugins.reset()
    yield
    plugins.reset()


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(
    page: Path, tmp_path: Path, monkeypatch, clean_plugins, peftkit_one_thread
) -> None:
    blocks = blocks_of(page)
    module_name = "docs_page_" + re.sub(r"\W", "_", str(page.relative_to(ROOT)))
    module = types.ModuleType(module_name)
    module.__file__ = str(page)
    monkeypatch.setitem(sys.modules, module_name, module)  # dataclasses defined in a page look it up
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    before, environ = set(sys.modules), dict(os.environ)
    written: list[Path] = []
    previous: Block | None = None
    try:
        for block in blocks:
            if block.marker and NOT_RUN.match(block.marker):
                reason = NOT_RUN.match(block.marker)["reason"]
                assert len(reason) >= 15, f"{block.where}: a not-run block must say why it cannot run: {block.marker}"
                assert block.lang in PYTHON_LANGS, f"{block.where}: not-run marks only Python blocks"
                previous = None
                continue
            if block.marker == EXPECTED_OUTPUT:
                assert previous is not None, f"{block.where}: expected output follows no Python block that ran"
                assert _matches_shown(previous.output, block.code), (
                    f"{block.where}: the example before it printed\n{previous.output}\nbut the page shows\n{block.code}"
                )
                continue
            if block.title and block.lang in PYTHON_LANGS | {"toml"}:
                target = tmp_path / block.title
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.code, encoding="utf-8")
                if block.lang == "toml":
                    tomllib.loads(block.code)
                else:
                    compile(block.code, block.where, "exec")
                    written.append(target)
                continue
            if block.lang == "console":
                for command, shown in console_commands(block):
                    printed = run_cli(command, block.where)
                    assert _matches_shown(printed, shown), (
                        f"{block.where}: `{command}` printed\n{printed}\nbut the page shows\n{shown}"
                    )
                continue
            if block.lang not in PYTHON_LANGS:
                continue
            # Pad with blank lines so a traceback's line numbers are the page's.
            code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                try:
                    exec(code, module.__dict__)
                except Exception as exc:
                    raise AssertionError(f"the example at {block.where} failed: {type(exc).__name__}: {exc}") from exc
            block.output, previous = stdout.getvalue(), block

        imported = {Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
        for path in written:
            if path.relative_to(tmp_path).parts[0] == "tests":
                _run_pytest_file(path, tmp_path)
            else:
                assert path.resolve() in imported, (
                    f"{page.relative_to(ROOT)} shows {path.relative_to(tmp_path)}, but no example on the page imports it"
                )
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for name in set(sys.modules) - before:
            if str(tmp_path) in str(getattr(sys.modules[name], "__file__", "") or ""):
                del sys.modules[name]


def test_every_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        assert str(page.relative_to(DOCS)) in config, f"{page.relative_to(ROOT)} is not in mkdocs.yml's nav"


def test_site_builds_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs tools are not installed: pip install mkdocs mkdocs-material")
    pytest.importorskip("material", reason="the docs theme is not installed: pip install mkdocs-material")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()


def test_parser_reads_titles_markers_and_indented_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        textwrap.dedent(
            """\
            Text.

            <!-- not-run: needs a download of a real model -->
            ```python
            import nothing_here
            ```

            !!! note
                ```py title="pkg/mod.py"
                X = 1
                ```
            """
        )
    )
    first, second = blocks_of(page)
    assert (first.lang, first.marker, first.line) == ("python", "<!-- not-run: needs a download of a real model -->", 5)
    assert (second.lang, second.title, second.code, second.marker) == ("py", "pkg/mod.py", "X = 1\n", None)
