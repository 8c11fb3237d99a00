"""Fixtures shared by the whole test suite (keep this file small)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

#: The offline data copies next to the checkout (../shared/data, SPEC §4). Tests never download.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The native kernel (bnlstm_lit.nn.native_build) is built into a cache folder of this test session, not the user's
# ~/.cache (collecting tests/nn/test_kernel.py already builds it), unless BNLSTM_LIT_CACHE_DIR is set. Set here, at
# import, so that test modules and the CLI subprocesses the tests start see it; removed when the session ends.
_KERNEL_CACHE = None
if not os.environ.get("BNLSTM_LIT_CACHE_DIR"):
    _KERNEL_CACHE = tempfile.mkdtemp(prefix="bnlstm_lit_test_kernel_")
    os.environ["BNLSTM_LIT_CACHE_DIR"] = _KERNEL_CACHE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _KERNEL_CACHE is not None:
        shutil.rmtree(_KERNEL_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; the test is skipped where the offline copies are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data not found in {SHARED_DATA}")
    return SHARED_DATA


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
