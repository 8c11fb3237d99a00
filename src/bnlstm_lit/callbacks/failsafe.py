"""Failing safely: a non-finite loss or gradient stops the run (keeping the last good state) or skips the step.

:class:`NonFiniteGuard` decides once per optimizer step, after backward and before gradient clipping and the update;
:class:`NonFiniteError` is what a stopped run raises out of ``trainer.fit``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

Action = Literal["stop", "skip"]
_ACTIONS = ("stop", "skip")
#: parameters named in a message (the count of all of them is given too)
_NAMES_SHOWN = 5


class NonFiniteError(RuntimeError):
    """A training step had a non-finite loss or gradient (raised by :class:`NonFiniteGuard`, out of ``trainer.fit``).

    Besides the message: ``step`` (the global step whose update was refused), ``batch_idx``, ``parameters`` (names
    of the parameters with non-finite gradients, on the raising rank), ``loss_finite`` (False when the training loss
    was non-finite; None when not known), and ``checkpoint`` (the path of the kept checkpoint, or None when it could
    not be written).
    """

    def __init__(
        self,
        message: str,
        *,
        step: int = -1,
        batch_idx: int = -1,
        parameters: tuple[str, ...] = (),
        loss_finite: bool | None = None,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.batch_idx = batch_idx
        self.parameters = parameters
        self.loss_finite = loss_finite
        self.checkpoint = checkpoint


class NonFiniteWarning(UserWarning):
    """Warned (on rank 0) for every step :class:`NonFiniteGuard` skips."""


def _all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one host synchronisation per device."""
    per_device: dict[torch.device, list[Tensor]] = {}
    for tensor in tensors:
        if tensor.is_sparse:
            tensor = tensor.coalesce().values()
        per_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    return all(bool(torch.stack(flags).all()) for flags in per_device.values())


class NonFiniteGuard(Callback):
    """Stop (default) or skip an optimizer step whose training loss or gradients are not finite.

    **What is checked**, once per optimizer step (with ``accumulate_grad_batches > 1``: once per accumulation window,
    covering all its micro-batches):

    * the training loss of every micro-batch, as handed to backward (``on_before_backward``: the loss the training
      step returned, divided by ``accumulate_grad_batches`` and multiplied by a mixed-precision loss scale, which
      keeps it finite or not). This also catches a loss that is ±inf or nan while its gradients are finite (e.g. a
      non-finite term that does not depend on the parameters);
    * the gradient of every parameter of the optimizer that is about to step (``on_before_optimizer_step``: after
      backward -- after the all-reduce under DDP and the unscaling under AMP -- and *before* gradient clipping and the
      update, so clipping cannot turn a nan gradient into a nan update unseen). Exception: when a mixed-precision
      GradScaler is enabled (``precision="16-mixed"``) gradients are not checked, since inf/nan gradients are then
      the scaler's normal overflow signal and it already skips those steps and lowers its scale; the loss still is.

    The decision is reduced over all processes (a step is bad when it is bad on any rank: one small all-reduce per
    optimizer step under DDP), so every rank stops, or skips, the same step. Under plain DDP the gradients are
    all-reduced before the check and so identical on all ranks anyway; the reduction also covers a loss that is
    non-finite on one rank only and sharded gradients (FSDP).

    **action="stop"** (default): the update is not applied. The state before the step -- parameters, optimizer state
    and module buffers (see ``restore_buffers``) as they were after the last good step -- is saved with
    ``trainer.save_checkpoint`` to ``<dirpath>/nonfinite-step<N>.ckpt``, N the global step of the bad update (so it
    holds what a run with ``max_steps=N`` would end with). Then :class:`NonFiniteError` is raised: its message names
    the global step, the epoch and batch index, whether the loss was non-finite, the parameters with non-finite
    gradients (the first few and their count), the kept checkpoint, and how to skip instead. Lightning re-raises it
    unchanged out of ``trainer.fit`` after its usual exception handling (callbacks' ``on_exception``, loggers
    finalized with status "failed"), so what was already written -- earlier checkpoints of a ModelCheckpoint, its
    ``last.ckpt``, logs -- stays on disk. Resuming from the kept checkpoint (``ckpt_path``) restarts at the refused
    step, so resume with ``action="skip"`` or fix the cause first (mid-epoch, Lightning replays the same batches only
    with a resumable dataloader, and warns otherwise).

    **action="skip"**: every gradient of the stepping optimizer is set to None, which makes torch optimizers (SGD,
    Adam(W), RMSprop, ... also fused/foreach) leave those parameters *and* their optimizer state (moments, step
    counters) untouched; buffers are restored as well. The global step of the skip is appended to :attr:`skipped`, a
    :class:`NonFiniteWarning` names it, and the running count is logged as ``train/skipped_steps``. A skipped step
    still counts as a step for Lightning (``global_step``, ``max_steps``, LR schedulers stepping per step, logging
    cadence), and the logged training loss/metrics of the bad batch are not undone. ``max_skips`` bounds the total
    number of skipped steps of a run (kept in checkpoints, so it survives a resume): the next non-finite step after
    ``max_skips`` skips stops the run as action="stop" does.

    Args:
        action: "stop" or "skip" (see above).
        max_skips: with action="skip", how many steps may be skipped in the run before the next non-finite one stops
            it; None (default) for no limit. Ignored by action="stop".
        restore_buffers: put the module's buffers (e.g. the BN running statistics, which a nan batch poisons in its
            forward pass) back to their values before the bad step, before saving / skipping. Costs one copy of the
            buffers per optimizer step.
        dirpath: where the kept checkpoint goes; default: the ModelCheckpoint's directory when one is configured,
            else ``<log_dir>/checkpoints`` (``<default_root_dir>/checkpoints`` without a logger).

    Scope: automatic optimization, and manual optimization with one optimizer step per batch (with several, the
    loss and buffer snapshot of the batch are consumed by its first step).
    """

    def __init__(
        self,
        action: Action = "stop",
        max_skips: int | None = None,
        restore_buffers: bool = True,
        dirpath: str | None = None,
    ) -> None:
        if action not in _ACTIONS:
            raise ValueError(f"NonFiniteGuard: action must be one of {list(_ACTIONS)}, got {action!r}")
        if max_skips is not None and (isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 1):
            raise ValueError(f"NonFiniteGuard: max_skips must be a positive integer or null, got {max_skips!r}")
        self.action = action
        self.max_skips = max_skips
        self.restore_buffers = restore_buffers
        self.dirpath = dirpath
        #: global steps skipped in this run (action="skip")
        self.skipped: list[int] = []
        self._window_open = False  # an optimizer step's (accumulation window's) first batch has started
        self._losses: list[Tensor] = []  # detached losses handed to backward in the window
        self._snapshot: dict[str, tuple[Tensor, Tensor]] = {}  # name: (buffer, its copy at the window's start)
        self._snapshot_valid = False
        self._batch_idx = -1

    # ---- state ------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before a checkpoint's callback state is restored
            self.skipped = []
            self._window_open = False
            self._losses = []
            self._snapshot_valid = False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = [int(s) for s in state_dict.get("skipped", [])]

    # ---- observation ------------------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        if self._window_open:
            return
        self._window_open = True
        self._losses = []
        if self.restore_buffers:
            self._take_snapshot(pl_module)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._losses.append(loss.detach())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.action == "skip":
            pl_module.log("train/skipped_steps", float(len(self.skipped)), on_step=True, on_epoch=False)

    # ---- the decision -----------------------------------------------------------------------------------------
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        losses, self._losses = self._losses, []
        restorable, self._snapshot_valid = self._snapshot_valid, False
        self._window_open = False
        params = [p for group in optimizer.param_groups for p in group["params"]]
        loss_finite = _all_finite(losses)
        check_grads = not _scaler_enabled(trainer)
        grads_finite = not check_grads or _all_finite(p.grad for p in params if p.grad is not None)
        if not trainer.strategy.reduce_boolean_decision(not (loss_finite and grads_finite), all=False):
            return

        step = trainer.global_step
        names = _parameter_names(pl_module)
        bad_params = tuple(
            names.get(id(p), "<unnamed>")
            for p in params
            if check_grads and p.grad is not None and not _all_finite([p.grad])
        )
        if restorable:
            self._restore_snapshot()
        what = self._describe(trainer, step, loss_finite, losses, bad_params)
        if self.action == "skip" and (self.max_skips is None or len(self.skipped) < self.max_skips):
            for p in params:
                p.grad = None
            self.skipped.append(step)
            rank_zero_warn(
                f"NonFiniteGuard: skipped the update: {what}; the parameters and optimizer state are unchanged "
                f"({len(self.skipped)} step(s) skipped so far).",
                category=NonFiniteWarning,
            )
            return

        path, saved = self._keep_checkpoint(trainer, step)
        if self.action == "skip":
            reason = (
                f" after {len(self.skipped)} skipped step(s) {self.skipped} reached max_skips={self.max_skips} "
                "(raise max_skips, or set it to null for no limit)"
            )
            advice = ""
        else:
            reason = ""
            advice = ' To skip such steps instead, use NonFiniteGuard(action="skip") (in a config: `action: skip`).'
        kept = (
            f"The last good state (before this step) is kept in {path}."
            if saved is None
            else f"Could not keep a checkpoint of the last good state in {path}: {saved!r}."
        )
        error = NonFiniteError(
            f"NonFiniteGuard: stopped the run{reason}: {what}; the update was not applied. {kept}{advice}",
            step=step,
            batch_idx=self._batch_idx,
            parameters=bad_params,
            loss_finite=loss_finite,
            checkpoint=str(path) if saved is None else None,
        )
        raise error from saved

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _describe(
        self, trainer: L.Trainer, step: int, loss_finite: bool, losses: list[Tensor], bad_params: tuple[str, ...]
    ) -> str:
        problems = []
        if not loss_finite:
            bad = [(i, x) for i, x in enumerate(losses) if not _all_finite([x])]
            values = ", ".join(
                (str(float(x)) if x.numel() == 1 else "non-finite values")
                + (f" in micro-batch {i + 1} of {len(losses)}" if len(losses) > 1 else "")
                for i, x in bad
            )
            problems.append(f"non-finite training loss ({values})")
        if bad_params:
            shown = ", ".join(bad_params[:_NAMES_SHOWN]) + (", ..." if len(bad_params) > _NAMES_SHOWN else "")
            problems.append(f"non-finite gradients in {len(bad_params)} parameter(s) ({shown})")
        if not problems:  # only another rank saw it
            problems.append("a non-finite loss or gradient on another process")
        return (
            f"{' and '.join(problems)} at global step {step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        )

    def _take_snapshot(self, pl_module: L.LightningModule) -> None:
        """Copy every buffer, reusing the copies of the previous window where they still fit."""
        snapshot: dict[str, tuple[Tensor, Tensor]] = {}
        with torch.no_grad():
            for name, buffer in pl_module.named_buffers():
                previous = self._snapshot.get(name)
                copy = None if previous is None else previous[1]
                if copy is None or (copy.shape, copy.dtype, copy.device) != (buffer.shape, buffer.dtype, buffer.device):
                    copy = buffer.detach().clone()
                else:
                    copy.copy_(buffer)
                snapshot[name] = (buffer, copy)
        self._snapshot = snapshot
        self._snapshot_valid = True

    def _restore_snapshot(self) -> None:
        with torch.no_grad():
            for buffer, copy in self._snapshot.values():
                buffer.copy_(copy)

    def _keep_checkpoint(self, trainer: L.Trainer, step: int) -> tuple[Path, BaseException | None]:
        if self.dirpath is not None:
            directory = Path(self.dirpath)
        elif isinstance(trainer.checkpoint_callback, ModelCheckpoint) and trainer.checkpoint_callback.dirpath:
            directory = Path(trainer.checkpoint_callback.dirpath)
        else:
            directory = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        path = directory / f"nonfinite-step{step}.ckpt"
        try:
            trainer.save_checkpoint(path)  # every rank calls it (collective); rank 0 writes
        except Exception as error:  # the run stops anyway: say so in the error rather than hide the cause
            return path, error
        return path, None


def _scaler_enabled(trainer: L.Trainer) -> bool:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler is not None and bool(scaler.is_enabled())


def _parameter_names(module: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters()}
