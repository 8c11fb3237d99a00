"""download.py: md5 helpers and download_url, offline through file:// URLs (urllib opens them like http ones)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from bnlstm_lit.data.download import check_file, download_url, file_md5
from offline_data import data_root

T10K_LABELS = data_root() / "mnist" / "t10k-labels-idx1-ubyte.gz"


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, str]:
    """A 3 MiB + 5 byte file (several download chunks plus a partial one) and its md5."""
    data = os.urandom(3 * 2**20 + 5)
    path = tmp_path / "src" / "payload.bin"
    path.parent.mkdir()
    path.write_bytes(data)
    return path, hashlib.md5(data).hexdigest()


def test_file_md5_matches_hashlib_for_any_chunk_size(source: tuple[Path, str]) -> None:
    path, md5 = source
    assert file_md5(path) == md5
    assert file_md5(path, chunk_size=7) == md5  # chunk boundaries must not change the digest


def test_file_md5_of_the_real_mnist_file() -> None:
    if not T10K_LABELS.is_file():
        pytest.skip(f"MNIST data not found at {T10K_LABELS}")
    assert file_md5(T10K_LABELS) == "ec29112dd5afa0611ce80d1b7f02629c"  # SOURCES.md, section 1


def test_check_file(source: tuple[Path, str], tmp_path: Path) -> None:
    path, md5 = source
    assert check_file(path, md5)
    assert check_file(path, md5.upper())
    assert check_file(path, None)
    assert not check_file(path, "0" * 32)
    assert not check_file(tmp_path / "missing.bin", md5)
    assert not check_file(tmp_path / "missing.bin", None)
    assert not check_file(tmp_path, None)  # a folder is not a file


def test_download_verifies_and_places_the_file(source: tuple[Path, str], tmp_path: Path) -> None:
    path, md5 = source
    dest = tmp_path / "out" / "nested" / "payload.bin"  # folders are created
    assert download_url(path.as_uri(), dest, md5, progress=False) == dest
    assert dest.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["payload.bin"]  # no temporary file left


def test_download_replaces_an_existing_file(source: tuple[Path, str], tmp_path: Path) -> None:
    path, md5 = source
    dest = tmp_path / "payload.bin"
    dest.write_bytes(b"stale")
    download_url(path.as_uri(), dest, md5, progress=False)
    assert file_md5(dest) == md5


def test_checksum_mismatch_leaves_nothing_behind(source: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = source
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "payload.bin"
    with pytest.raises(RuntimeError, match="md5 mismatch") as info:
        download_url(path.as_uri(), dest, "0" * 32, progress=False)
    assert str(dest) in str(info.value)
    assert path.as_uri() in str(info.value)
    assert list(out.iterdir()) == []  # neither the file nor a temporary file


def test_failed_download_keeps_the_previous_file(source: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = source
    dest = tmp_path / "payload.bin"
    dest.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        download_url(path.as_uri(), dest, "0" * 32, progress=False)
    assert dest.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name != "src"] == ["payload.bin"]


def test_falls_back_to_the_next_mirror(source: tuple[Path, str], tmp_path: Path) -> None:
    path, md5 = source
    bad = tmp_path / "corrupt.bin"
    bad.write_bytes(b"not the file")
    mirrors = [(tmp_path / "absent.bin").as_uri(), bad.as_uri(), path.as_uri()]  # missing, wrong md5, good
    dest = tmp_path / "out" / "payload.bin"
    download_url(mirrors, dest, md5, progress=False)
    assert file_md5(dest) == md5
    assert [p.name for p in dest.parent.iterdir()] == ["payload.bin"]


def test_every_mirror_failing_names_each_url(tmp_path: Path) -> None:
    urls = [(tmp_path / "absent1.bin").as_uri(), "nope://example.org/file.bin"]
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(RuntimeError, match="file.bin") as info:
        download_url(urls, dest, None, progress=False)
    for url in urls:
        assert url in str(info.value)
    assert list(dest.parent.iterdir()) == []


def test_no_url_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no URL"):
        download_url([], tmp_path / "file.bin", None)


def test_progress_bar_with_tqdm(source: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, md5 = source
    download_url(path.as_uri(), tmp_path / "payload.bin", md5, progress=True)
    assert "payload.bin" in capsys.readouterr().err


def test_plain_progress_without_tqdm(
    source: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, md5 = source
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `from tqdm import tqdm` raise ImportError
    download_url(path.as_uri(), tmp_path / "payload.bin", md5, progress=True)
    err = capsys.readouterr().err
    assert "payload.bin: 3.0/3.0 MiB (100%)" in err


# ---- safe extraction: names never become paths, links are refused, nothing partial is left -----------------------
def _hostile_archive(path: Path, payload: bytes) -> None:
    """A tar with traversal, absolute and link members beside one good member ``data/good.txt``."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name in ("data/good.txt", "../../escaped.txt", "/tmp/absolute-escape.txt", "data/../../up.txt"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("data/link.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("data/hard.txt")
        hard.type = tarfile.LNKTYPE
        hard.linkname = "../../etc/passwd"
        tar.addfile(hard)


def test_extraction_reads_only_the_named_members_to_the_chosen_paths(tmp_path: Path) -> None:
    from bnlstm_lit.data.download import extract_members

    payload = b"hello\n"
    archive = tmp_path / "in" / "hostile.tgz"
    archive.parent.mkdir()
    _hostile_archive(archive, payload)
    target = tmp_path / "out" / "deep"
    md5 = hashlib.md5(payload).hexdigest()
    extract_members(archive, {"data/good.txt": (target / "good.txt", md5)})
    assert (target / "good.txt").read_bytes() == payload
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["in/hostile.tgz", "out/deep/good.txt"]  # nothing escaped, nothing else extracted
    assert not Path("/tmp/absolute-escape.txt").exists()


@pytest.mark.parametrize("member", ["data/link.txt", "data/hard.txt"])
def test_links_are_refused_and_leave_nothing(tmp_path: Path, member: str) -> None:
    from bnlstm_lit.data.download import extract_members

    archive = tmp_path / "hostile.tgz"
    _hostile_archive(archive, b"x")
    dest = tmp_path / "out" / "file.txt"
    with pytest.raises(RuntimeError, match=f"member {member} is not a regular file"):
        extract_members(archive, {member: (dest, "0" * 32)})
    assert not dest.exists() and not any(dest.parent.glob(".*part"))


def test_a_member_with_the_wrong_md5_leaves_no_partial_file(tmp_path: Path) -> None:
    from bnlstm_lit.data.download import extract_members

    archive = tmp_path / "hostile.tgz"
    _hostile_archive(archive, b"payload")
    dest = tmp_path / "out" / "good.txt"
    with pytest.raises(RuntimeError, match="has md5"):
        extract_members(archive, {"data/good.txt": (dest, "0" * 32)})
    assert not dest.exists() and list(dest.parent.iterdir()) == []
