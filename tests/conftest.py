"""Fixtures shared by the whole test suite (keep this file small)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

#: The offline data copies next to the checkout (../shared/data, SPEC §4). Tests never download.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
