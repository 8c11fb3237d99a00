"""Checkpoint files that are never half-written, loaded without running pickled code, and usable on their own.

:class:`AtomicCheckpointIO` replaces Lightning's default ``TorchCheckpointIO`` (``Trainer(plugins=[...])``):

* **Saving** writes a temporary file *in the checkpoint's own directory*, flushes and ``fsync``\\ s it, renames it onto
  the target with :func:`os.replace` (atomic on POSIX and Windows) and ``fsync``\\ s the directory. A process killed at
  any moment leaves either the previous file or the new one, complete, under the target name; a save that fails
  removes its temporary file. (Lightning's default stages the file with :func:`tempfile.mkstemp` in the *system*
  temporary directory and moves it with :func:`shutil.move`: where ``$TMPDIR`` is on another filesystem than the
  checkpoints -- a tmpfs ``/tmp``, a container volume, a cluster's shared disk -- the move is a copy that truncates
  the target first, so a kill during the copy leaves a corrupt ``last.ckpt``; it never calls ``fsync``, and every
  killed save leaves a checkpoint-sized file behind in ``$TMPDIR``.) Remote (fsspec) paths go to the parent class.
* **Loading** uses ``torch.load(weights_only=True)`` unless told otherwise, whatever torch's default or
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say: a checkpoint that needs more than tensors and plain Python values is
  refused with :class:`UnsafeCheckpointError`, which names the file and the type and says how to allow it. Every
  checkpoint bnlstm_lit writes loads this way without an allowlist. ``--weights_only=false`` on the command line (or
  ``trainer.test(..., weights_only=False)``) loads a *trusted* file in full.

:class:`CheckpointCLIMixin` puts both in the command line: every Trainer it builds uses AtomicCheckpointIO, and
``validate``/``test``/``predict`` run from a checkpoint alone (``bnlstm-lit test --ckpt_path FILE``): the task's and
the DataModule's ``class_path`` and arguments stored in the checkpoint become the defaults of ``--model`` and
``--data``, which any ``--config`` or flag still overrides (LightningCLI itself then applies the task's stored
hyper-parameters over the config, so the network always matches the weights).

A checkpoint also stays with its run (:mod:`bnlstm_lit.runs`): ``fit --ckpt_path FILE`` continues the run folder
``<save_dir>/<name>/version_N`` the file lies in (same logs, same ``checkpoints/``, best score and top-k restored);
``fit --ckpt_path last`` takes the newest ``last.ckpt`` of all the runs under the configured root; and
``validate``/``test``/``predict --ckpt_path FILE`` log into the file's run folder and start from that run's saved
``config.yaml`` (its callbacks -- the population-statistics protocol --, data and trainer settings), before any
``--config`` or flag, which still win for what they set. One info line names the run folder and config picked up.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from bnlstm_lit.runs import continue_run, name_checkpoints_by_metric, resolve_last_checkpoint, run_config, run_folder

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointCLIMixin",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "checkpoint_cli_defaults",
    "load_checkpoint",
    "use_atomic_checkpoint_io",
    "with_checkpoint_defaults",
]

#: Suffix of the temporary files a save writes next to its target (never ``.ckpt``: ModelCheckpoint ignores them).
TEMP_SUFFIX = ".tmp"

#: Subcommands that read a checkpoint (``fit --ckpt_path`` resumes, and its model comes from the config as usual).
EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")


# ------------------------------------------------------------------------------------------------------------ saving


@functools.cache
def _umask() -> int:
    """The process' umask, read once (reading it means setting it: not something to race other threads on)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; Windows cannot open a directory and needs no such step)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temp_prefix(target: Path) -> str:
    """``.<name>.<host>.<pid>.``: hidden, tied to its target, and to the process that writes it."""
    return f".{target.name}.{_host()}.{os.getpid()}."


def _remove_stale_temps(directory: Path) -> None:
    """Remove the temporary files that processes of this host, now dead, left in ``directory`` (best effort).

    POSIX only: elsewhere ``os.kill(pid, 0)`` does not probe a process, it terminates it.
    """
    if os.name != "posix":
        return
    pattern = re.compile(rf"^\..+\.{re.escape(_host())}\.(\d+)\.[A-Za-z0-9_]+{re.escape(TEMP_SUFFIX)}$")
    with suppress(OSError):
        for entry in os.scandir(directory):
            match = pattern.match(entry.name)
            if match is None or int(match.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:  # the writer is gone: its file can never be completed
                with suppress(OSError):
                    os.unlink(entry.path)
            except OSError:  # alive (or not ours to signal): leave it
                continue


def atomic_torch_save(obj: Any, path: str | os.PathLike[str], *, fsync: bool = True, mode: int | None = None) -> None:
    """``torch.save(obj, path)`` such that ``path`` is, at every moment, absent, its old content or its new content.

    The object is written to a temporary file in the same directory (same filesystem, so the final rename is
    atomic), which is flushed, ``fsync``-ed (``fsync=True``), given ``mode`` (default: ``0o666`` less the umask, or
    the mode of the file it replaces) and renamed onto ``path``; then the directory is ``fsync``-ed. On any error,
    including ``KeyboardInterrupt``, the temporary file is removed and the error propagates.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
    fd, temp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            if fsync:
                os.fsync(file.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp)
        raise
    if fsync:
        _fsync_directory(target.parent)
    _remove_stale_temps(target.parent)


# ----------------------------------------------------------------------------------------------------------- loading


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects that loading with ``weights_only=True`` does not allow (see the message)."""

    def __init__(self, path: _PATH, reason: str) -> None:
        self.path = path
        self.reason = reason
        self.global_name: str | None = None
        match = re.search(r"GLOBAL ([\w.]+)", reason)
        blocked = re.search(r"whose module ([\w.]+) is blocked", reason)
        if match:
            self.global_name = match.group(1)
        if match and blocked:
            what = (
                f"it refers to {self.global_name}, from a module ({blocked.group(1)}) that weights-only loading never "
                "allows: no checkpoint needs it, and unpickling it would run code. Do not load this file unless you "
                "know exactly where it comes from."
            )
        elif match:
            name = self.global_name
            what = (
                f"it contains {name}, which loading with weights_only=True does not allow (unpickling an arbitrary "
                "object can run arbitrary code). If you trust this file, either allow the type before loading: "
                f"`torch.serialization.add_safe_globals([{name}])` (or the `torch.serialization.safe_globals` context "
                "manager), or load it in full with weights_only=False (`--weights_only=false` on the command line, "
                "`trainer.test(..., weights_only=False)`, or `AtomicCheckpointIO(weights_only=False)`)."
            )
        else:
            what = (
                "it cannot be loaded with weights_only=True. If you trust this file, load it with "
                "weights_only=False (`--weights_only=false` on the command line). torch said: " + reason.strip()
            )
        super().__init__(f"Refusing to load the checkpoint {path}: {what}")


def load_checkpoint(
    path: _PATH,
    map_location: Any = "cpu",
    *,
    weights_only: bool = True,
    loader: Callable[..., Any] | None = None,
) -> Any:
    """Load a checkpoint (local or fsspec path), weights-only by default, with a clear error for what it refuses.

    ``loader`` is Lightning's loader (``path, map_location=, weights_only=``); default: plain :func:`torch.load`
    through fsspec.
    """
    if loader is None:
        from lightning.fabric.utilities.cloud_io import _load

        loader = _load
    try:
        return loader(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if not weights_only or isinstance(err, UnsafeCheckpointError):
            raise
        raise UnsafeCheckpointError(path, str(err)) from None


# -------------------------------------------------------------------------------------------------------- the plugin


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` with atomic, durable local saves and safe loads.

    Args:
        weights_only: what loading uses when the caller (``trainer.fit/validate/test/predict(weights_only=None)``,
            the default everywhere in Lightning) does not say: ``True`` -- only tensors and plain Python values.
        fsync: ``fsync`` the file and its directory on save, so a saved checkpoint also survives a power loss or a
            kernel crash (costs the time to reach the disk).
    """

    def __init__(self, weights_only: bool = True, fsync: bool = True) -> None:
        super().__init__()
        self.weights_only = weights_only
        self.fsync = fsync

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            # remote stores: fsspec's transaction (object stores publish an upload only once complete)
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        local = get_filesystem(path)._strip_protocol(str(path))
        atomic_torch_save(checkpoint, local, fsync=self.fsync)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        fs = get_filesystem(path)
        if not fs.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        checkpoint: dict[str, Any] = load_checkpoint(
            path, map_location, weights_only=self.weights_only if weights_only is None else weights_only
        )
        return checkpoint


# ----------------------------------------------------------------------------------- the CLI from a checkpoint alone


def _class_path_is_trusted(class_path: Any) -> bool:
    """Ours (``bnlstm_lit.``), or a class of a module already imported: the CLI imports it, so never a new module."""
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module = class_path.rpartition(".")[0]
    return module == "bnlstm_lit" or module.startswith("bnlstm_lit.") or module in sys.modules


def checkpoint_cli_defaults(path: _PATH) -> dict[str, dict[str, Any]]:
    """``{"model": {"class_path": ...}, "data": {"class_path": ..., "init_args": {...}}}`` from a checkpoint.

    Read weights-only. The model's ``init_args`` are left to LightningCLI (it applies the checkpoint's
    hyper-parameters itself once ``--model`` names a class). A class outside bnlstm_lit whose module is not imported
    yet is left out, with a warning naming it (pass ``--model``/``--data`` yourself if you trust it): reading a
    checkpoint never imports new code.
    """
    checkpoint = load_checkpoint(path)
    defaults: dict[str, dict[str, Any]] = {}
    for key, hparams_key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        hparams = checkpoint.get(hparams_key)
        if not isinstance(hparams, dict) or "_class_path" not in hparams:
            continue
        class_path = hparams["_class_path"]
        if not _class_path_is_trusted(class_path):
            warnings.warn(
                f"The checkpoint {path} names the {key} class {class_path!r}, which is neither part of bnlstm_lit nor "
                f"already imported: it is not imported on a checkpoint's word. If you trust it, pass "
                f"--{key}={class_path} yourself.",
                stacklevel=2,
            )
            continue
        defaults[key] = {"class_path": class_path}
        if key == "data":
            defaults[key]["init_args"] = {k: v for k, v in hparams.items() if not k.startswith("_")}
    return defaults


def _subcommand_and_ckpt_path(args: Sequence[str]) -> tuple[int | None, str | None]:
    index = next((i for i, arg in enumerate(args) if arg in (*EVALUATION_SUBCOMMANDS, "fit")), None)
    if index is None:
        return None, None
    ckpt_path = None
    rest = list(args[index + 1 :])
    for i, arg in enumerate(rest):
        if arg.startswith("--ckpt_path="):
            ckpt_path = arg.split("=", 1)[1]
        elif arg == "--ckpt_path" and i + 1 < len(rest):
            ckpt_path = rest[i + 1]
    return index, ckpt_path


def with_checkpoint_defaults(args: Sequence[str]) -> list[str]:
    """``args`` with the checkpoint's defaults inserted right after the subcommand: ``--config=<run>/config.yaml``
    and ``--trainer.default_root_dir=<save_dir>`` when the file lies in a run folder
    ``<save_dir>/<name>/<version>/checkpoints/`` (see :mod:`bnlstm_lit.runs`), then ``--model=...`` and ``--data=...``
    from the checkpoint itself.

    Only for ``validate``/``test``/``predict`` with ``--ckpt_path FILE`` on the command line (not ``best``/``last``,
    nor a path given in a config file); everything after the subcommand (``--config``, flags) still overrides.
    """
    args = list(args)
    index, ckpt_path = _subcommand_and_ckpt_path(args)
    if index is None or args[index] not in EVALUATION_SUBCOMMANDS or not ckpt_path:
        return args
    if not _is_local_file_protocol(ckpt_path) or not Path(ckpt_path).is_file():
        return args  # "best", "last", a remote path: Lightning resolves it, the config must name the model
    inserted = []
    folder, config = run_folder(ckpt_path), run_config(ckpt_path)
    if config is not None:
        inserted.append(f"--config={config}")
    if folder is not None:  # the default logger's <save_dir>: it logs into the run (runs.continue_run)
        inserted.append(f"--trainer.default_root_dir={folder.parent.parent}")
    for key, value in checkpoint_cli_defaults(ckpt_path).items():
        try:
            inserted.append(f"--{key}={json.dumps(value)}")
        except TypeError:  # arguments a command line cannot carry (not saved by the CLI): the class alone
            inserted.append(f"--{key}={value['class_path']}")
    return [*args[: index + 1], *inserted, *args[index + 1 :]]


def use_atomic_checkpoint_io(trainer: L.Trainer) -> bool:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` if it has Lightning's plain default IO; returns whether.

    A CheckpointIO configured on purpose (a subclass, a wrapper such as ``AsyncCheckpointIO`` -- give it
    ``AtomicCheckpointIO()`` to wrap) is left alone.
    """
    if type(trainer.strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return True


class CheckpointCLIMixin(LightningCLI):
    """The checkpoint policy of a LightningCLI; use it as the first base: ``class BNLSTMCLI(CheckpointCLIMixin,
    LightningCLI)``.

    * Every Trainer it builds saves and loads through :class:`AtomicCheckpointIO` (unless a CheckpointIO plugin was
      configured: ``--trainer.plugins``).
    * ``validate``/``test``/``predict --ckpt_path FILE`` take the run's saved config, and the task's and the data's
      classes and arguments from the checkpoint, where the command line and configs do not give them.
    * A command with ``--ckpt_path`` continues the checkpoint's run folder; ``--ckpt_path last`` is the newest
      ``last.ckpt`` of all runs (:func:`~bnlstm_lit.runs.resolve_last_checkpoint`,
      :func:`~bnlstm_lit.runs.continue_run`).
    * Best-checkpoint names carry the monitored value (:func:`~bnlstm_lit.runs.name_checkpoints_by_metric`).
    """

    _picked_config: Path | None = None

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is not None and not isinstance(args, (list, tuple)):  # a dict or Namespace: nothing to add to
            super().parse_arguments(parser, args)
            return
        given = list(sys.argv[1:] if args is None else args)
        argv = with_checkpoint_defaults(given)
        index, ckpt_path = _subcommand_and_ckpt_path(given)
        evaluating = index is not None and given[index] in EVALUATION_SUBCOMMANDS
        self._picked_config = run_config(ckpt_path) if evaluating else None  # what with_checkpoint_defaults inserted
        # parse directly: LightningCLI warns when args= and a command line are both given, and these *are* argv
        self.config = parser.parse_args(argv)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer)
        name_checkpoints_by_metric(trainer)
        self._continue_the_checkpoints_run(trainer)
        return trainer

    def _continue_the_checkpoints_run(self, trainer: L.Trainer) -> None:
        """Resolve ``ckpt_path="last"`` over all runs, and log into the checkpoint's run folder (see the class doc)."""
        subcommand = getattr(self, "subcommand", None)
        if not subcommand or "ckpt_path" not in self.config_init.get(subcommand, {}):
            return
        ckpt_path = self.config_init[subcommand]["ckpt_path"]
        if ckpt_path == "last":
            found = resolve_last_checkpoint(trainer)
            if found is not None:
                ckpt_path = self.config_init[subcommand]["ckpt_path"] = found
                self.config[subcommand]["ckpt_path"] = found  # the config saved with the run names the file
        folder = continue_run(trainer, ckpt_path, subcommand)
        if folder is not None or self._picked_config is not None:
            config = f", settings from {self._picked_config} (then --config and flags)" if self._picked_config else ""
            rank_zero_info(f"[bnlstm_lit] {subcommand} --ckpt_path {ckpt_path}: run folder {trainer.log_dir}{config}")
