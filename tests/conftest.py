"""Fixtures shared by the whole test suite (keep this file small)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from offline_data import ENV, LAYOUT, data_root

# The native kernel (bnlstm_lit.nn.native_build) is built into a cache folder of this test session, not the user's
# ~/.cache (collecting tests/nn/test_kernel.py already builds it), unless BNLSTM_LIT_CACHE_DIR is set. Set here, at
# import, so that test modules and the CLI subprocesses the tests start see it; removed when the session ends.
_KERNEL_CACHE = None
if not os.environ.get("BNLSTM_LIT_CACHE_DIR"):
    _KERNEL_CACHE = tempfile.mkdtemp(prefix="bnlstm_lit_test_kernel_")
    os.environ["BNLSTM_LIT_CACHE_DIR"] = _KERNEL_CACHE


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--data-dir",
        metavar="DIR",
        help=f"the offline data copies the real-data tests read (default: ${ENV}, else the copy beside the checkout)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # the option wins over the environment variable; written into it so every reader (offline_data.data_root, the
    # CLI subprocesses) sees one setting
    option = config.getoption("--data-dir", default=None)
    if option:
        os.environ[ENV] = str(Path(option).expanduser().resolve())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _KERNEL_CACHE is not None:
        shutil.rmtree(_KERNEL_CACHE, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after the durations report, just above the final counts
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One line at the end when tests were skipped because their data is not in the data folder."""
    root = str(data_root())
    skipped = [report for report in terminalreporter.stats.get("skipped", []) if root in _skip_reason(report)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} test{'s' * (len(skipped) != 1)} skipped for missing data in {root}: set {ENV} or "
            f"--data-dir to a folder with {', '.join(LAYOUT)} (mnist/ and ptb/ as the DataModules' download, "
            "data.init_args.download=true, writes them)",
            yellow=True,
        )


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data folder (``--data-dir``, ``$BNLSTM_LIT_TEST_DATA``, or the default offline copy beside the
    checkout); the test is skipped where it is absent."""
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"offline data not found in {root}")
    return root


@pytest.fixture
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run the test inside ``tmp_path``, so relative outputs (runs/, lightning_logs/) never land in the checkout."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread for every test: tiny tensors only gain contention from more (several times slower on 2
    busy cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cnn_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN question corpus in the exact .question format (no real corpus exists offline), for the configs
    whose data_dir is data/cnn; read it with ``--data.init_args.completeness=off``."""
    from bnlstm_lit.data import synthetic_corpus

    root = tmp_path_factory.mktemp("cnn_corpus")
    synthetic_corpus(root, 48, 16, 16, seed=0)
    return root
