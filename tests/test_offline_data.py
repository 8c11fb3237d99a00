"""The data folder of the real-data tests is a setting (tests/offline_data.py): ``--data-dir`` over
``$BNLSTM_LIT_TEST_DATA`` over the default offline copy beside the checkout, and a session that skipped tests for
missing data says so in one line at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offline_data import DEFAULT, ENV, data_root

TESTS = Path(__file__).resolve().parent

PROBE = """
import os
from pathlib import Path

import pytest

from offline_data import data_root


def test_the_option_wins_over_the_environment_variable():
    assert data_root() == Path(os.environ["EXPECTED_DATA_ROOT"])


def test_reads_mnist(shared_data):
    path = shared_data / "mnist"
    if not path.is_dir():
        pytest.skip(f"MNIST files not found in {path}")


def test_reads_ptb(shared_data):
    path = shared_data / "ptb"
    if not path.is_dir():
        pytest.skip(f"PTB files not found in {path}")


def test_skipped_for_another_reason():
    pytest.skip("not about data")
"""


def test_default_and_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert DEFAULT == TESTS.parent.parent / "shared" / "data"
    monkeypatch.delenv(ENV, raising=False)
    assert data_root() == DEFAULT
    monkeypatch.setenv(ENV, str(tmp_path))
    assert data_root() == tmp_path.resolve()


def test_data_dir_option_skips_and_summarizes(tmp_path: Path) -> None:
    """One pytest run on a generated test file with this suite's conftest: --data-dir at an empty folder (the
    environment variable names another), two tests skipped for missing data, one for another reason."""
    suite, empty, other = tmp_path / "suite", tmp_path / "empty", tmp_path / "other"
    for folder in (suite, empty, other):
        folder.mkdir()
    for name in ("conftest.py", "offline_data.py"):
        shutil.copy(TESTS / name, suite / name)
    (suite / "test_probe.py").write_text(PROBE)
    (suite / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, ENV: str(other), "EXPECTED_DATA_ROOT": str(empty.resolve())}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", f"--data-dir={empty}", str(suite)],
        cwd=suite, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed, 3 skipped" in done.stdout, done.stdout[-3000:]
    lines = [line for line in done.stdout.splitlines() if "skipped for missing data" in line]
    assert lines == [
        f"2 tests skipped for missing data in {empty.resolve()}: set {ENV} or --data-dir to a folder with mnist/, "
        "ptb/, text8/text8_prefix.zip, cnn_sample/ (mnist/ and ptb/ as the DataModules' download, "
        "data.init_args.download=true, writes them)"
    ], done.stdout[-3000:]
