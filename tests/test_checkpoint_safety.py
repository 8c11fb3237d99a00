"""Checkpoints are never half-written, load without running pickled code, and evaluate on their own.

* A real process saving large checkpoints is killed (SIGKILL) in the middle of its saves, several times: every
  ``*.ckpt`` left on disk loads with ``torch.load(weights_only=True)`` and holds one consistent training state, with
  :class:`~bnlstm_lit.checkpoint.AtomicCheckpointIO` and with Lightning's default IO (its fsspec transaction stages
  the file in ``$TMPDIR`` and renames it: atomic only while ``$TMPDIR`` is on the checkpoints' filesystem -- the
  ``slow`` test shows ``last.ckpt`` destroyed when it is not).
* A save that fails midway leaves the previous file intact and no temporary file behind.
* The checkpoints our configs write load weights-only without any allowlist; a malicious checkpoint is refused and
  its payload never runs.
* ``validate``/``test``/``predict`` through the CLI from a checkpoint alone, with the hyper-parameters stored in it.

This file is also the child process of the kill test: ``python tests/test_checkpoint_safety.py DIR IO MB``.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bnlstm_lit import checkpoint as module
from bnlstm_lit.checkpoint import (
    AtomicCheckpointIO,
    CheckpointCLIMixin,
    UnsafeCheckpointError,
    _temp_prefix,
    atomic_torch_save,
    load_checkpoint,
    with_checkpoint_defaults,
)
from bnlstm_lit.cli import BNLSTMCLI
from bnlstm_lit.data import AddingProblem
from bnlstm_lit.nn import BNLSTMSettings
from bnlstm_lit.tasks import SequenceRegression

#: the project's CLI with the checkpoint policy (BNLSTMCLI itself once it derives from CheckpointCLIMixin)
CheckpointCLI = (
    BNLSTMCLI
    if issubclass(BNLSTMCLI, CheckpointCLIMixin)
    else type("CheckpointCLI", (CheckpointCLIMixin, BNLSTMCLI), {})
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEBUG = CONFIGS / "debug.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]

#: size of the kill test's checkpoints: large enough that one save takes a while (~0.1-0.3 s on a laptop disk)
CHECKPOINT_MB = 160

#: SIGKILL, /proc, pid probes: the kill tests and the clean-up of killed saves are POSIX matters
POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX only")

# a run from a checkpoint in another root cannot reload the ModelCheckpoint's bookkeeping, and says so: expected here
RELOAD_WARNING = "ignore:The dirpath has changed:UserWarning"
# an evaluation from a checkpoint alone has none of the fit's callbacks, and Lightning says so: expected here
CALLBACKS_WARNING = "ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint"


# ====================================================================================== 1. killed in the middle


@dataclass
class KillReport:
    kills: int = 0
    mid_save: int = 0  #: kills that landed between the temporary file's creation and its rename
    checked: list[str] = field(default_factory=list)  #: checkpoint files verified after the last kill
    leaked: int = 0  #: temporary files the killed processes left behind


def staged(folder: Path) -> set[str]:
    """Temporary files of a save in progress (or of a killed one): ours ``.*.tmp``, fsspec's ``tmp*``."""
    return {p.name for p in folder.iterdir() if p.suffix == ".tmp" or p.name.startswith("tmp")}


def check_checkpoints(directory: Path) -> list[str]:
    """Every ``*.ckpt`` in ``directory`` loads weights-only and is one consistent state; returns their names."""
    names = []
    for path in sorted(directory.glob("*.ckpt")):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # raises on a truncated file
        step = checkpoint["global_step"]
        state = checkpoint["state_dict"]
        assert step >= 1, path.name
        assert state["w"].item() == step, f"{path.name}: w={state['w'].item()} at global_step={step}"
        big = state["big"]
        assert big.numel() == CHECKPOINT_MB * 2**20 // 4
        assert big.min().item() == big.max().item() == step, f"{path.name}: big is not all {step}"
        if path.name != "last.ckpt":
            assert path.name.endswith(f"step={step}.ckpt"), f"{path.name} holds global_step={step}"
        names.append(path.name)
    return names


def start_child(directory: Path, io: str, temp_dir: Path, log: Any) -> subprocess.Popen[bytes]:
    import bnlstm_lit  # the child imports the very package under test

    package_root = str(Path(bnlstm_lit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": package_root, "OMP_NUM_THREADS": "1", "TMPDIR": str(temp_dir)}
    command = [sys.executable, __file__, str(directory), io, str(CHECKPOINT_MB)]
    return subprocess.Popen(command, env=env, stdout=log, stderr=log)


def kill_while_saving(tmp_path: Path, io: str, rng: random.Random, want_mid_save: int, attempts: int) -> KillReport:
    """Start the child, let it save a few checkpoints, SIGKILL it at a random moment shortly after a save began
    (a new temporary file appeared) and check every checkpoint on disk; again in the same folder, until
    ``want_mid_save`` kills landed mid-save or ``attempts`` kills were spent."""
    directory, temp_dir = tmp_path / "checkpoints", tmp_path / "tmp"
    directory.mkdir(exist_ok=True)
    temp_dir.mkdir(exist_ok=True)  # $TMPDIR of the child: fsspec's staging files land here, not in /tmp
    watched = directory if io == "atomic" else temp_dir  # where a save stages its file
    report = KillReport()
    with (tmp_path / "child.log").open("ab") as log:
        while report.mid_save < want_mid_save and report.kills < attempts:
            before = staged(watched)
            saves_to_skip = rng.randint(2, 6)  # per step: top-k, then last: from the 3rd, a whole last.ckpt exists
            delay = rng.uniform(0.0, 0.05)  # a save takes ~0.1-0.3 s: mostly inside it, sometimes after it
            proc = start_child(directory, io, temp_dir, log)
            try:
                seen: set[str] = set()
                deadline = time.monotonic() + 120
                temp: Path | None = None
                while temp is None:
                    assert proc.poll() is None, f"the child exited ({proc.returncode}): see {tmp_path}/child.log"
                    assert time.monotonic() < deadline, "the child never saved"
                    for name in sorted(staged(watched) - before - seen):
                        seen.add(name)
                        if len(seen) > saves_to_skip:
                            temp = watched / name
                    time.sleep(0.0005)
                time.sleep(delay)
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            report.kills += 1
            report.mid_save += temp.exists()  # still there after the kill: the save was cut before its rename
            report.checked = check_checkpoints(directory)
            assert "last.ckpt" in report.checked, "the kill left no last.ckpt"
    report.leaked = len(staged(watched))
    return report


@pytest.fixture
def big_files(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, emptied of the kill tests' 160 MB files afterwards (``child.log`` stays, for a failure)."""
    yield tmp_path
    for name in ("checkpoints", "tmp"):
        shutil.rmtree(tmp_path / name, ignore_errors=True)


@POSIX
@pytest.mark.parametrize("io", ["atomic", "default"])
def test_a_process_killed_while_saving_leaves_every_checkpoint_whole(io: str, big_files: Path) -> None:
    """SIGKILL at random moments of real saves (160 MB each): every file left loads and is one consistent state.

    ``default`` is Lightning's own TorchCheckpointIO with ``$TMPDIR`` on the checkpoints' filesystem (as here):
    it holds too, by fsspec's rename -- and leaves every interrupted save's temporary file in ``$TMPDIR``.
    """
    tmp_path = big_files
    report = kill_while_saving(tmp_path, io, random.Random(f"kill-{io}"), want_mid_save=3, attempts=6)
    # the test proved something only if kills did land in the middle of a save
    assert report.mid_save >= 3, report
    assert "last.ckpt" in report.checked and any(name.startswith("epoch=") for name in report.checked), report
    if io == "atomic":
        # only the last killed process' file can remain: the next save clears those of dead writers
        assert report.leaked <= 1, sorted(staged(tmp_path / "checkpoints"))
        assert not staged(tmp_path / "tmp"), "AtomicCheckpointIO used $TMPDIR"
    else:
        assert report.leaked >= report.mid_save  # fsspec never removes the staging file of a killed save


def other_filesystem_tmp(tmp_path: Path, needed: int) -> Path:
    """A folder on a filesystem other than ``tmp_path``'s (``/dev/shm``), or skip."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as tmp_path")
    if shutil.disk_usage(shm).free < needed:
        pytest.skip("not enough room in /dev/shm")
    return shm


@POSIX
@pytest.mark.slow
def test_lightning_default_io_destroys_last_ckpt_when_tmpdir_is_another_filesystem(big_files: Path) -> None:
    """Why AtomicCheckpointIO exists. fsspec stages the file in ``$TMPDIR`` and ``shutil.move``-s it; across
    filesystems that is a copy which *truncates the target first*: killed during the copy, ``last.ckpt`` is left
    empty or cut. (If this test ever fails, Lightning/fsspec made the default safe.)"""
    tmp_path = big_files
    shm = other_filesystem_tmp(tmp_path, needed=8 * CHECKPOINT_MB * 2**20)
    directory = tmp_path / "checkpoints"
    last = directory / "last.ckpt"
    full = CHECKPOINT_MB * 2**20
    temp_dir = Path(shm) / f"bnlstm-lit-test-{os.getpid()}"
    temp_dir.mkdir()
    broken = 0
    try:
        with (tmp_path / "child.log").open("ab") as log:
            for _ in range(3):
                proc = start_child(directory, "default", temp_dir, log)
                try:
                    complete, deadline = False, time.monotonic() + 120
                    while proc.poll() is None and time.monotonic() < deadline:
                        try:
                            size = last.stat().st_size
                        except FileNotFoundError:
                            continue
                        if size >= full:
                            complete = True  # a whole last.ckpt exists ...
                        elif complete:
                            break  # ... and is being overwritten in place: shorter than a whole one
                finally:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=30)
                try:
                    torch.load(last, map_location="cpu", weights_only=True)
                except Exception:
                    broken += 1
                    break
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert broken, "last.ckpt survived every kill: the default IO no longer truncates across filesystems"


# ====================================================================================== 2. a save that fails


def small_checkpoint(value: float) -> dict[str, Any]:
    return {"state_dict": {"w": torch.full((1000,), value)}, "global_step": int(value)}


@pytest.fixture
def previous(tmp_path: Path) -> tuple[Path, bytes]:
    """A checkpoint written by AtomicCheckpointIO, and its bytes."""

    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(small_checkpoint(1.0), path)
    return path, path.read_bytes()


def failing_torch_save(exception: BaseException) -> Callable[..., None]:
    """torch.save that writes half of the real bytes, then raises ``exception``."""
    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        raise exception

    return save


@pytest.mark.parametrize("failure", ["torch.save", "torch.save:KeyboardInterrupt", "os.fsync", "os.replace"])
def test_a_failed_save_leaves_the_previous_file_and_no_temporary(
    failure: str, previous: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, old_bytes = previous
    if failure.startswith("torch.save"):
        exception: BaseException = KeyboardInterrupt() if failure.endswith("KeyboardInterrupt") else OSError("full")
        monkeypatch.setattr(module.torch, "save", failing_torch_save(exception))
    else:
        exception = OSError(f"{failure} failed")

        def fail(*args: Any, **kwargs: Any) -> None:
            raise exception

        monkeypatch.setattr(module.os, failure.split(".")[1], fail)
    with pytest.raises(type(exception)):
        module.AtomicCheckpointIO().save_checkpoint(small_checkpoint(2.0), path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_save_replaces_the_file_durably(previous: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """The new content replaces the old one through a rename, after an fsync of the file; then the folder's."""

    path, _ = previous
    os.chmod(path, 0o640)
    calls: list[tuple[str, Any]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")) if Path("/proc/self/fd").is_dir() else fd))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        calls.append(("replace", Path(dst)))
        assert Path(src).parent == Path(dst).parent and Path(src).name.startswith(".last.ckpt.")
        real_replace(src, dst)

    monkeypatch.setattr(module.os, "fsync", fsync)
    monkeypatch.setattr(module.os, "replace", replace)
    module.AtomicCheckpointIO().save_checkpoint(small_checkpoint(2.0), str(path))
    assert [name for name, _ in calls] == ["fsync", "replace", "fsync"]
    if Path("/proc/self/fd").is_dir():
        assert calls[0][1].parent == path.parent and calls[0][1].suffix == ".tmp"  # the temporary file
        assert calls[2][1] == path.parent  # the folder: the rename itself survives a crash
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert os.stat(path).st_mode & 0o777 == 0o640  # a replaced file keeps its permissions


def test_a_new_file_gets_ordinary_permissions(tmp_path: Path) -> None:
    """Not mkstemp's 0600: what ``open(path, "wb")`` would have given."""

    atomic_torch_save({"x": 1}, tmp_path / "a.ckpt", fsync=False)
    (tmp_path / "b").write_bytes(b"")
    assert os.stat(tmp_path / "a.ckpt").st_mode & 0o777 == os.stat(tmp_path / "b").st_mode & 0o777


@POSIX
def test_temporary_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    """A save clears what killed saves (of this host) left in its folder, and nothing else."""

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _temp_prefix(tmp_path / "x").split(".")[2]  # ".x.<host>.<pid>."

    def temp(target: str, pid: int, host: str = host) -> Path:
        path = tmp_path / f".{target}.{host}.{pid}.k3y_9abc.tmp"
        path.write_bytes(b"partial")
        return path

    stale = [temp("last.ckpt", dead.pid), temp("epoch=0-step=3.ckpt", dead.pid)]  # killed writers'
    kept = [
        temp("last.ckpt", os.getppid()),  # a live process' save in progress
        temp("last.ckpt", dead.pid, host="another-host"),  # another machine's (shared disk): pid means nothing
        tmp_path / "notes.tmp",  # not ours
    ]
    kept[-1].write_text("mine")
    atomic_torch_save({"x": 1}, tmp_path / "last.ckpt", fsync=False)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"x": 1}


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty", "ignore:You're resuming from")
def test_the_trainer_saves_and_resumes_through_atomic_io(tmp_path: Path) -> None:
    """``Trainer(plugins=[AtomicCheckpointIO()])``: ModelCheckpoint writes through it, fit resumes from it, and a
    failing save during training leaves the previous ``last.ckpt``."""

    def trainer(max_steps: int) -> L.Trainer:
        callback = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=1)
        return L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
            plugins=[AtomicCheckpointIO()],
        )

    first = trainer(2)
    assert isinstance(first.strategy.checkpoint_io, AtomicCheckpointIO)
    first.fit(BigModel(megabytes=1))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = trainer(3)
    model = BigModel(megabytes=1)
    resumed.fit(model, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 3 and model.w.item() == 3.0  # continued from w == 2
    assert {p.name for p in tmp_path.iterdir()} == {"last.ckpt", "epoch=0-step=3.ckpt"}

    old = (tmp_path / "last.ckpt").read_bytes()
    failing = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=0)],
        plugins=[AtomicCheckpointIO()],
    )  # only last.ckpt is saved: the failing save is the one overwriting it
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", failing_torch_save(OSError("No space left on device")))
        with pytest.raises(OSError, match="No space left"):
            failing.fit(BigModel(megabytes=1), ckpt_path=tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == old
    assert not staged(tmp_path)


def test_remote_paths_go_through_fsspec(tmp_path: Path) -> None:
    plugin = AtomicCheckpointIO()
    path = f"memory://bnlstm-lit-{os.getpid()}/ckpt/last.ckpt"
    plugin.save_checkpoint(small_checkpoint(3.0), path)
    assert plugin.load_checkpoint(path)["global_step"] == 3
    plugin.remove_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        plugin.load_checkpoint(path)


class KeptIO(TorchCheckpointIO):
    """A CheckpointIO configured on purpose: the CLI must keep it."""


@pytest.mark.filterwarnings(RELOAD_WARNING, CALLBACKS_WARNING)
def test_the_cli_saves_through_atomic_io_unless_told_otherwise(fitted: Callable[[str], Any], tmp_path: Path) -> None:
    fit_cli, _, last = fitted("adding_bnlstm.yaml")
    assert type(fit_cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO  # the fit that wrote `last`
    args = ["validate", f"--ckpt_path={last}", f"--trainer.default_root_dir={tmp_path}", *QUIET, *LIMITS]
    kept = call_cli([*args, f"--trainer.plugins={__name__}.KeptIO"], CheckpointCLI)
    assert type(kept.trainer.strategy.checkpoint_io) is KeptIO


# ====================================================================================== 3. loading safely


def call_cli(args: list[str], cli_class: type = BNLSTMCLI) -> Any:
    """The CLI in-process with one intra-op thread and a neutral ``sys.argv``."""
    threads, argv = torch.get_num_threads(), sys.argv
    torch.set_num_threads(1)
    sys.argv = ["bnlstm-lit"]
    try:
        return cli_class(args=args)
    finally:
        torch.set_num_threads(threads)
        sys.argv = argv


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Callable[[str], Any]:
    """``fit`` of a shipped config with the debug overlay (CLI with the checkpoint policy), once per module:
    (cli, best checkpoint, last checkpoint)."""
    cache: dict[str, Any] = {}

    def fit(config: str) -> Any:
        if config not in cache:
            extra = []
            if config.startswith("ptb"):
                shared = request.getfixturevalue("shared_data") / "ptb"
                if not shared.is_dir():
                    pytest.skip(f"shared PTB data not found in {shared}")
                extra = [f"--data.init_args.data_dir={shared}"]
            root = tmp_path_factory.mktemp(config.removesuffix(".yaml"))
            cli = call_cli(
                [
                    "fit",
                    f"--config={CONFIGS / config}",
                    f"--config={DEBUG}",
                    f"--trainer.default_root_dir={root}",
                    *QUIET,
                    *extra,
                ],
                CheckpointCLI,
            )
            callback = cli.trainer.checkpoint_callback
            cache[config] = (cli, Path(callback.best_model_path), Path(callback.last_model_path))
        return cache[config]

    return fit


@pytest.fixture
def no_allowlist() -> Iterator[None]:
    """Weights-only loading with torch's built-in allowlist only (none added by us or an earlier test)."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.add_safe_globals(saved)


@pytest.mark.parametrize("config", ["adding_bnlstm.yaml", "ptb_bnlstm.yaml"])
def test_our_checkpoints_load_weights_only_without_an_allowlist(
    config: str, fitted: Callable[[str], Any], no_allowlist: None
) -> None:
    cli, best, last = fitted(config)
    assert best != last and best.is_file() and last.is_file()
    for path in (best, last):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert checkpoint["state_dict"].keys() == cli.model.state_dict().keys()
        assert (
            checkpoint["hyper_parameters"]["_class_path"] == f"{type(cli.model).__module__.rsplit('.', 1)[0]}."
            f"{type(cli.model).__name__}"
        )
        assert checkpoint["datamodule_hyper_parameters"]["batch_size"] == 8  # the debug overlay's
        assert checkpoint["optimizer_states"] and checkpoint["loops"]  # a full training state, resumable
        assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == checkpoint["global_step"]
    if config.startswith("ptb"):  # the DataModule's state: the vocabulary the weights were trained with
        vocabulary = torch.load(last, weights_only=True)[type(cli.datamodule).__name__]["vocabulary"]
        assert isinstance(vocabulary, str) and len(vocabulary) == cli.model.hparams["input_size"]


def write_marker(path: str) -> None:
    Path(path).write_text("pwned")


class Payload:
    """Unpickling this calls ``write_marker(marker)``: arbitrary code, as a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (write_marker, (self.marker,))


class BlockedPayload(Payload):
    """Unpickling this calls ``os.mkdir(marker)``, a function of a module weights-only loading blocks outright."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


@pytest.fixture
def malicious(fitted: Callable[[str], Any], tmp_path: Path) -> tuple[Path, Path]:
    """A real checkpoint of ours with a payload slipped into its hyper-parameters; (checkpoint, marker)."""
    _, _, last = fitted("adding_bnlstm.yaml")
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    marker = tmp_path / "marker"
    checkpoint["hyper_parameters"]["rnn"]["hidden_size"] = Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_the_payload_is_live(malicious: tuple[Path, Path]) -> None:
    """The control: full unpickling does run it (so the refusals below are what keeps the marker away)."""
    path, marker = malicious
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_a_malicious_checkpoint_is_refused_with_a_clear_error(
    malicious: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, marker = malicious
    # even where the environment asks torch for full unpickling by default
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError) as error:
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    message = str(error.value)
    name = f"{__name__}.write_marker"
    assert str(path) in message and name in message and error.value.global_name == name
    assert "add_safe_globals" in message and "weights_only=False" in message
    assert isinstance(error.value, pickle.UnpicklingError)  # what torch raises: existing handlers still apply
    # Lightning's own default IO, asked nothing (weights_only=None, as every trainer.fit/validate/... passes),
    # defers to torch's default: which this environment variable turns into full unpickling
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        TorchCheckpointIO().load_checkpoint(path)
    assert marker.exists()


def test_a_checkpoint_calling_a_blocked_module_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "made-by-the-payload"
    torch.save({"state_dict": {}, "x": BlockedPayload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"mkdir.*never allows") as error:
        load_checkpoint(tmp_path / "evil.ckpt")
    assert "evil.ckpt" in str(error.value)
    assert not marker.exists()


def test_the_trainer_refuses_a_malicious_checkpoint(malicious: tuple[Path, Path]) -> None:
    """``trainer.validate(ckpt_path=...)`` -> strategy.load_checkpoint -> our IO, with weights_only=None."""

    path, marker = malicious
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        limit_val_batches=1,
    )
    model = SequenceRegression(2, 1, 50, rnn=BNLSTMSettings(hidden_size=16))
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        trainer.validate(model, datamodule=AddingProblem(seq_len=50, batch_size=8), ckpt_path=path)
    assert not marker.exists()


@pytest.mark.filterwarnings(RELOAD_WARNING, CALLBACKS_WARNING)
def test_the_cli_refuses_a_malicious_checkpoint(malicious: tuple[Path, Path], tmp_path: Path) -> None:
    path, marker = malicious
    args = [
        "validate",
        f"--ckpt_path={path}",
        f"--config={CONFIGS / 'adding_bnlstm.yaml'}",
        f"--config={DEBUG}",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    ]
    with pytest.raises(pickle.UnpicklingError):  # plain LightningCLI too reads the hyper-parameters weights-only
        call_cli(args)
    with pytest.raises(UnsafeCheckpointError, match="write_marker"):
        call_cli(args, CheckpointCLI)
    assert not marker.exists()


@dataclass
class Trusted:
    """A harmless type a user might put in a checkpoint: refused until allowed."""

    scale: float = 2.0


def test_a_trusted_type_loads_once_allowed_as_the_error_says(tmp_path: Path) -> None:
    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {}, "extra": Trusted()}, path)
    plugin = AtomicCheckpointIO()
    with pytest.raises(UnsafeCheckpointError, match=rf"add_safe_globals\(\[{__name__}\.Trusted\]\)"):
        plugin.load_checkpoint(path)
    with torch.serialization.safe_globals([Trusted]):
        assert plugin.load_checkpoint(path)["extra"] == Trusted()
    assert plugin.load_checkpoint(path, weights_only=False)["extra"] == Trusted()  # explicitly trusted: full unpickling
    assert AtomicCheckpointIO(weights_only=False).load_checkpoint(path)["extra"] == Trusted()


# ====================================================================================== 4. from a checkpoint alone


def data_only_config(config: str, tmp_path: Path) -> Path:
    """The ``data:`` section of a shipped config (with the debug overlay's batch size) as a config of its own."""
    data = yaml.safe_load((CONFIGS / config).read_text())["data"]
    data["init_args"]["batch_size"] = 8
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    return path


LIMITS = ["--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--trainer.limit_predict_batches=2"]


def assert_restored(cli: Any, fit_cli: Any, checkpoint: Path) -> None:
    """The CLI built the fitted network (hyper-parameters from the checkpoint) and loaded its weights."""
    assert type(cli.model) is type(fit_cli.model)
    hparams = {k: v for k, v in fit_cli.model.hparams.items() if not k.startswith("_")}
    assert {k: cli.model.hparams[k] for k in hparams} == hparams
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert cli.model.state_dict().keys() == state.keys()
    for key, value in cli.model.state_dict().items():
        assert torch.equal(value.cpu(), state[key]), key


@pytest.mark.filterwarnings(RELOAD_WARNING, CALLBACKS_WARNING)
def test_the_cli_evaluates_with_the_checkpoints_hyper_parameters(fitted: Callable[[str], Any], tmp_path: Path) -> None:
    """BNLSTMCLI as it is (LightningCLI's own ckpt_path handling): ``--model=<class>`` and the data config suffice;
    the network's sizes (rnn.hidden_size 16, not the class default 100, nor a config's 32) come from the checkpoint."""
    fit_cli, _, last = fitted("adding_bnlstm.yaml")
    data = data_only_config("adding_bnlstm.yaml", tmp_path)
    cli = call_cli(
        [
            "test",
            f"--ckpt_path={last}",
            "--model=bnlstm_lit.tasks.SequenceRegression",
            f"--config={data}",
            f"--trainer.default_root_dir={tmp_path / 'a'}",
            *QUIET,
            *LIMITS,
        ]
    )
    assert_restored(cli, fit_cli, last)
    assert torch.isfinite(cli.trainer.callback_metrics["test/mse"])
    # a config that disagrees with the checkpoint's architecture: the checkpoint wins (the weights need it)
    cli = call_cli(
        [
            "test",
            f"--ckpt_path={last}",
            f"--config={CONFIGS / 'adding_bnlstm.yaml'}",
            f"--config={DEBUG}",
            "--model.init_args.rnn.hidden_size=32",
            f"--trainer.default_root_dir={tmp_path / 'b'}",
            *QUIET,
        ]
    )
    assert cli.model.hparams["rnn"]["hidden_size"] == 16
    assert_restored(cli, fit_cli, last)


@pytest.mark.filterwarnings(RELOAD_WARNING, CALLBACKS_WARNING)
@pytest.mark.parametrize("config", ["adding_bnlstm.yaml", "ptb_bnlstm.yaml"])
def test_validate_test_predict_from_the_checkpoint_alone(
    config: str, fitted: Callable[[str], Any], tmp_path: Path
) -> None:
    """With CheckpointCLIMixin: ``bnlstm-lit test --ckpt_path FILE`` and nothing else (trainer flags aside)."""
    fit_cli, best, _ = fitted(config)
    language = config.startswith("ptb")
    extra = ["--data.init_args.full_chunk_length=50"] if language else []  # bounded by limit_test_batches anyway
    metrics = {}
    for subcommand in ("validate", "test", "predict"):
        cli = call_cli(
            [
                subcommand,
                f"--ckpt_path={best}",
                f"--trainer.default_root_dir={tmp_path / subcommand}",
                *QUIET,
                *LIMITS,
                *extra,
            ],
            CheckpointCLI,
        )
        assert_restored(cli, fit_cli, best)
        assert type(cli.datamodule) is type(fit_cli.datamodule)
        fit_data = {k: v for k, v in fit_cli.datamodule.hparams.items() if not k.startswith("_")}
        if language:
            fit_data["full_chunk_length"] = 50
        assert {k: cli.datamodule.hparams[k] for k in fit_data} == fit_data
        metrics[subcommand] = dict(cli.trainer.callback_metrics)
        if subcommand == "predict":
            predictions = cli.trainer.predict_loop.predictions
            assert predictions and all(output is not None for output in predictions)
    val_metric = "val/bpc" if language else "val/mse"
    assert torch.isfinite(metrics["validate"][val_metric])
    # validation from the checkpoint reproduces the fit's own last validation (same weights, same statistics)
    torch.testing.assert_close(metrics["validate"][val_metric], fit_cli.trainer.callback_metrics[val_metric])
    test_metric = "test/bpc_full" if language else "test/mse"
    assert torch.isfinite(metrics["test"][test_metric])


def test_the_mixin_leaves_other_command_lines_alone(fitted: Callable[[str], Any], tmp_path: Path) -> None:
    _, _, last = fitted("adding_bnlstm.yaml")
    for args in (
        ["fit", f"--ckpt_path={last}", "--config=x.yaml"],  # resuming: the config names the model
        ["test", "--ckpt_path=last", "--config=x.yaml"],  # resolved by Lightning
        ["test", "--config=x.yaml"],
        ["report", "figures"],
    ):
        assert with_checkpoint_defaults(args) == args
    added = with_checkpoint_defaults(["--config=top.yaml", "predict", "--ckpt_path", str(last), "--config=x.yaml"])
    assert added[:2] == ["--config=top.yaml", "predict"] and added[-3:] == ["--ckpt_path", str(last), "--config=x.yaml"]
    # the run's saved config and root first (bnlstm_lit.runs), then the checkpoint's own classes, which win over them
    run = last.parent.parent
    assert added[2:4] == [f"--config={run / 'config.yaml'}", f"--trainer.default_root_dir={run.parent.parent}"]
    assert added[4] == '--model={"class_path": "bnlstm_lit.tasks.SequenceRegression"}'
    assert added[5].startswith('--data={"class_path": "bnlstm_lit.data.AddingProblem", "init_args": {')


def test_the_mixin_never_imports_a_module_named_by_a_checkpoint(tmp_path: Path) -> None:
    module = "bnlstm_lit_test_never_imported"
    (tmp_path / f"{module}.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": f"{module}.Task"}}, path)
    sys.path.insert(0, str(tmp_path))
    try:
        args = ["test", f"--ckpt_path={path}", f"--model={module}.Task"]  # the user may name it: not an error
        with pytest.warns(UserWarning, match=rf"{module}\.Task.*--model={module}\.Task"):
            assert with_checkpoint_defaults(args) == args
    finally:
        sys.path.remove(str(tmp_path))
    assert module not in sys.modules and not (tmp_path / "imported").exists()


def test_load_from_checkpoint_rebuilds_the_model_with_identical_outputs(fitted: Callable[[str], Any]) -> None:
    """``Task.load_from_checkpoint`` and even ``LightningModule.load_from_checkpoint`` (the checkpoint names the
    class) rebuild the network from the stored hyper-parameters, weights-only, with the same outputs."""

    fit_cli, best, _ = fitted("adding_bnlstm.yaml")
    inputs, _ = next(iter(fit_cli.datamodule.test_dataloader()))
    fit_cli.model.eval()
    with torch.no_grad():
        expected = fit_cli.model(inputs)
    for cls in (SequenceRegression, L.LightningModule):
        model = cls.load_from_checkpoint(best, map_location="cpu", weights_only=True)
        assert type(model) is SequenceRegression and model.hparams["rnn"]["hidden_size"] == 16
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(inputs), expected)


# ====================================================================================== the kill test's child


class BigModel(L.LightningModule):
    """A model whose every checkpoint tells whether it is whole: ``w`` and every element of ``big`` equal the
    checkpoint's ``global_step`` (``w`` grows by exactly 1 per optimizer step, ``big`` is refilled before it)."""

    def __init__(self, megabytes: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("big", torch.zeros(megabytes * 2**20 // 4))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.big.fill_(float(self.global_step + 1))  # the step this batch completes: the checkpoint after it
        return -(self.w * batch).sum()  # gradient -1: SGD(lr=1) adds exactly 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.ones(10_000, 1), batch_size=1)


def child(directory: str, io: str, megabytes: str) -> None:
    """Train (up to 500 steps, until killed), saving a top-2 checkpoint and ``last.ckpt`` after every step."""

    torch.set_num_threads(1)
    checkpoint = ModelCheckpoint(
        dirpath=directory,
        every_n_train_steps=1,
        save_top_k=2,
        monitor="step",
        mode="max",
        save_last=True,
        enable_version_counter=False,  # a restarted child overwrites the files its killed predecessor left
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=500,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
        plugins=[AtomicCheckpointIO()] if io == "atomic" else None,
    )
    trainer.fit(BigModel(int(megabytes)))


if __name__ == "__main__":
    child(*sys.argv[1:])
