"""Download and verify data files: md5 checks, mirror fallback, progress bar, atomic placement.

Shared by every DataModule that fetches a corpus (MNIST, Penn Treebank, text8, CNN). The contract of
:func:`download_url` is that ``dest`` either holds a complete, verified file or is left exactly as it was: the bytes go
to a hidden temporary file in the same folder (so the final :func:`os.replace` is a same-filesystem, atomic rename) and
that file is removed on every failure path, including Ctrl-C.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Protocol

__all__ = ["check_file", "download_url", "extract_members", "file_md5", "tar_member_name"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB: large enough to keep hashing/copying fast, small enough to keep memory flat
# Some servers (yann.lecun.com among them) answer 403 to urllib's default "Python-urllib/x.y" agent.
_USER_AGENT = "bnlstm_lit/0.1 (dataset download via urllib)"


def file_md5(path: str | os.PathLike[str], chunk_size: int = _CHUNK) -> str:
    """Hex md5 of a file, read in ``chunk_size`` chunks so that large corpora never sit in memory whole."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: str | os.PathLike[str], md5: str | None) -> bool:
    """True if ``path`` is an existing regular file whose md5 is ``md5`` (any existing file when ``md5`` is None)."""
    path = Path(path)
    if not path.is_file():
        return False
    return md5 is None or file_md5(path) == md5.lower()


class _Progress(Protocol):
    def update(self, n: int) -> object: ...
    def close(self) -> None: ...


class _PlainProgress:
    """Fallback progress line on stderr when tqdm is not importable; redrawn at most every 0.5 s."""

    def __init__(self, total: int | None, desc: str, stream: IO[str]) -> None:
        self.total, self.desc, self.stream = total, desc, stream
        self.done = 0
        self._last_draw = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last_draw >= 0.5:
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        mib = self.done / 2**20
        if self.total:
            text = f"{mib:.1f}/{self.total / 2**20:.1f} MiB ({100 * self.done / self.total:.0f}%)"
        else:
            text = f"{mib:.1f} MiB"
        self.stream.write(f"\r{self.desc}: {text}")
        self.stream.flush()

    def close(self) -> None:
        self._draw()
        self.stream.write("\n")
        self.stream.flush()


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int | None, desc: str, enabled: bool) -> _Progress:
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm  # optional: installed with lightning, but not a dependency of ours
    except ImportError:
        return _PlainProgress(total, desc, sys.stderr)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)


def _fetch(url: str, out: IO[bytes], desc: str, progress: bool, timeout: float) -> str:
    """Stream ``url`` into ``out``; return the md5 of the bytes written (hashed on the fly, no second read)."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = _progress_bar(total, desc, progress)
        try:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
    # Without an md5 this is the only guard against a connection that closed early.
    if total is not None and received != total:
        raise OSError(f"incomplete download: received {received} of {total} bytes")
    return digest.hexdigest()


def download_url(
    url_or_mirrors: str | Sequence[str],
    dest: str | os.PathLike[str],
    md5: str | None,
    progress: bool = True,
    *,
    timeout: float = 60.0,
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Download a file to ``dest``, trying each mirror in order until one gives bytes with the expected md5.

    Args:
        url_or_mirrors: one URL, or URLs of the same file tried in order (any scheme urllib opens, ``file://`` too).
        dest: final path; its folder is created if needed. An existing file there is replaced only on success.
        md5: expected hex md5 of the file, or None to accept any complete download (discouraged).
        progress: show a progress bar on stderr (tqdm when importable, a plain text line otherwise).
        timeout: seconds a connection may stay silent before the mirror counts as failed.
        check: optional validation of the downloaded file before it is moved into place (for files without a known
            md5, e.g. a zip whose member CRC is known); it raises ValueError (or OSError, RuntimeError) to reject it.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        RuntimeError: every mirror failed or gave bytes with the wrong md5; the message names ``dest``, each URL
            tried and why it failed. No file, partial or temporary, is left behind.
    """
    urls = [url_or_mirrors] if isinstance(url_or_mirrors, str) else list(url_or_mirrors)
    if not urls:
        raise ValueError(f"download_url: no URL given for {dest}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for url in urls:
        # Same folder as dest so os.replace is an atomic rename; unique name so concurrent downloads do not collide.
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        log.info("Downloading %s from %s", dest.name, url)
        try:
            with open(tmp, "xb") as out:
                actual = _fetch(url, out, desc=dest.name, progress=progress, timeout=timeout)
            if md5 is not None and actual != md5.lower():
                failures.append(f"{url}: md5 mismatch (expected {md5.lower()}, got {actual})")
                continue
            if check is not None:
                try:
                    check(tmp)
                except (ValueError, RuntimeError) as err:
                    failures.append(f"{url}: the file failed its check: {err}")
                    continue
            os.replace(tmp, dest)
            return dest
        # URLError, HTTPError, timeouts and disk errors are OSErrors; ValueError is urllib's "unknown url type".
        except (OSError, ValueError, http.client.HTTPException) as err:
            failures.append(f"{url}: {type(err).__name__}: {err}")
        finally:
            tmp.unlink(missing_ok=True)  # gone already after a successful os.replace
    tried = "\n".join(f"  - {failure}" for failure in failures)
    raise RuntimeError(f"Could not download {dest} ({len(urls)} URL(s) tried, none gave a valid file):\n{tried}")


def tar_member_name(member: tarfile.TarInfo) -> str:
    """A tar member's name without leading ``./``."""
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name


def extract_members(archive: str | os.PathLike[str], members: dict[str, tuple[Path, str]]) -> None:
    """Extract regular-file members of a tar archive to chosen paths, each checked against its md5.

    ``members`` maps a member name (a leading ``./`` is ignored) to ``(destination, md5)``. Only those members are
    read, their names never become paths (no traversal), links and devices are refused, and each file is written to
    a hidden temporary name (hashed on the way) and renamed into place after its md5 matched, so a failure leaves no
    partial file.
    """
    archive = Path(archive)
    with tarfile.open(archive, "r:*") as tar:
        by_name = {tar_member_name(m): m for m in tar.getmembers()}
        for name, (dest, md5) in members.items():
            member = by_name.get(name)
            if member is None or not member.isfile():
                what = "missing" if member is None else "not a regular file"
                raise RuntimeError(f"{archive}: member {name} is {what}")
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
            digest = hashlib.md5(usedforsecurity=False)
            try:
                with source, open(tmp, "xb") as out:
                    while chunk := source.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                if digest.hexdigest() != md5.lower():
                    raise RuntimeError(f"{archive}: member {name} has md5 {digest.hexdigest()}, expected {md5}")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
