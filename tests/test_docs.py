"""The documentation site (mkdocs.yml, docs/) builds in strict mode, offline; its API pages come from the docstrings.

Strict mode turns every warning into an error: a broken link between pages, a cross-reference to an API object that
does not exist, a page missing from the navigation, a docstring section griffe cannot parse. The docs tools come with
the ``dev`` extra; the build test is skipped only where they are not installed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

DOCS_TOOLS = ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "griffe")


def _docs_tools_missing() -> list[str]:
    missing = []
    for name in DOCS_TOOLS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is absent
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _docs_tools_missing()
    if missing:
        pytest.skip(f"the docs tools are not installed ({', '.join(missing)}): pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("docs") / "site"
    start = time.perf_counter()
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
    run = subprocess.run(
        [*command, "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    assert seconds < 120, f"the docs build took {seconds:.0f} s"
    return out


def page(site: Path, name: str) -> str:
    path = site / name / "index.html" if name else site / "index.html"
    assert path.is_file(), f"{path.relative_to(site)} was not built"
    return path.read_text(encoding="utf-8")


def test_user_guide_notes_and_api_pages_are_built(site: Path) -> None:
    for name in (
        "",
        "guide/install",
        "guide/layer",
        "guide/cli",
        "guide/scaling",
        "guide/checkpoints",
        "guide/extending",
        "notes/choices",
        "nn",
        "gpu",
        "benchmarks/cpu_mnist_ptb",
        "results",
        *(f"api/{module}" for module in ("nn", "tasks", "models", "data", "callbacks", "cli", "report")),
    ):
        page(site, name)
    assert (site / "cnn_synthetic_curves.png").is_file(), "the figure the reader notes show"


def test_api_pages_render_the_docstrings(site: Path) -> None:
    nn = page(site, "api/nn")
    assert 'id="bnlstm_lit.nn.BNLSTM"' in nn and 'id="bnlstm_lit.nn.SequenceBatchNorm"' in nn
    assert "One BN-LSTM step." in nn, "BNLSTMCell's docstring"
    # Google-style sections are parsed (a table of parameters), not printed as text
    assert "Args:" not in nn and "Parameters:" in re.sub(r"<[^>]+>", "", nn)
    assert 'id="bnlstm_lit.tasks.CharLanguageModel"' in page(site, "api/tasks")
    assert 'id="bnlstm_lit.callbacks.PopulationStatistics"' in page(site, "api/callbacks")


def test_sphinx_roles_in_docstrings_become_links(site: Path) -> None:
    """``:class:`~bnlstm_lit.tasks.BNLSTMTask``` in a docstring is a link to that object's section, not raw text."""
    tasks = page(site, "api/tasks")
    assert ":class:" not in tasks and ":meth:" not in tasks
    assert re.search(r'<a class="autorefs[^"]*"[^>]*href="#bnlstm_lit\.tasks\.BNLSTMTask"', tasks)


def test_site_loads_no_asset_from_the_network(site: Path) -> None:
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        remote = re.findall(r'<(?:script|link)\b[^>]*(?:src|href)="(?:https?:)?//[^"]*"', text)
        assert not remote, f"{html.relative_to(site)} loads {remote}"


def _python_block(markdown: str, heading: str) -> str:
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block under {heading!r}"
    return blocks[0]


def test_the_guide_shows_the_readmes_layer_snippet() -> None:
    """The layer page of the guide starts from the README's snippet (tests/nn/test_readme_snippet.py runs it)."""
    readme = _python_block(README.read_text(), "## The layer on its own")
    guide = _python_block((DOCS / "guide" / "layer.md").read_text(), "# The layer on its own")
    assert guide == readme


def test_readme_links_into_docs_resolve() -> None:
    links = re.findall(r"\]\(((?:docs/)[^)#]+)(?:#[^)]*)?\)", README.read_text())
    assert links, "the README links into docs/"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"the README links to missing pages: {missing}"
