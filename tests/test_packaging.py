"""The files a package is expected to carry: LICENSE, CHANGELOG.md and CITATION.cff agree with pyproject.toml, and
py.typed (PEP 561) is inside the installed package."""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_license_is_the_one_pyproject_names(project: dict[str, Any]) -> None:
    assert project["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text and 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    (holder,) = re.findall(r"^Copyright \(c\) \d{4} (.+)$", text, flags=re.MULTILINE)
    assert holder in [author["name"] for author in project["authors"]]


def test_changelog_has_the_current_version(project: dict[str, Any]) -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert text.startswith("# Changelog\n")
    releases = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert releases[0] == "Unreleased"
    assert project["version"] in releases, f"no section for {project['version']}: {releases}"
    assert re.search(rf"^## \[{re.escape(project['version'])}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, flags=re.MULTILINE)


def test_citation_cites_the_software_and_the_paper(project: dict[str, Any]) -> None:
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors", "type"):  # the schema's required keys, and what is cited
        assert cff[key], key
    assert cff["type"] == "software"
    assert str(cff["version"]) == project["version"]
    assert cff["license"] == project["license"]["text"]
    paper = cff["preferred-citation"]
    assert paper["title"] == "Recurrent Batch Normalization" and paper["year"] == 2017
    assert [a["family-names"] for a in paper["authors"]] == ["Cooijmans", "Ballas", "Laurent", "Gülçehre", "Courville"]
    assert "ICLR 2017" in paper["collection-title"]
    assert "arXiv:1603.09025" in [identifier["value"] for identifier in paper["identifiers"]]


def test_py_typed_is_in_the_installed_package() -> None:
    marker = resources.files("bnlstm_lit") / "py.typed"
    assert marker.is_file()
    # and a wheel carries it: package data of the top-level package
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["bnlstm_lit"]
