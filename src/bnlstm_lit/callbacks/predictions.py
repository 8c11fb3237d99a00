"""Writing what ``predict`` returns: every output to ``predictions.pt``, sampled text to stdout and ``samples.txt``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

from bnlstm_lit.console import info, write_stdout


class PredictionWriter(BasePredictionWriter):
    """Save the predictions of a ``predict`` run as one ``torch.save`` file.

    Each rank writes ``predictions.pt`` (``predictions-rank{r}.pt`` under DDP) in ``output_dir`` -- by default the
    run's log directory -- holding the per-batch outputs of ``predict_step`` concatenated along the batch axis
    (dicts key by key; lists, such as sampled texts, one after the other). The file is written to a temporary name
    and renamed into place, so an interrupted run never leaves a half-written file.

    Args:
        output_dir: folder for the file (created if needed); None: ``trainer.log_dir``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.last_path: Path | None = None

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = "predictions.pt" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.pt"
        path = folder / name
        tmp = path.with_name(f".{name}.part")
        try:
            torch.save(_concatenate(predictions, len(trainer.num_predict_batches) > 1), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # only left if saving failed
        self.last_path = path
        info(f"[bnlstm_lit] predictions written to {path}")


class SampleWriter(Callback):
    """Print the texts a ``predict`` run samples to stdout and write the same to ``samples.txt``.

    Reads the outputs of ``predict_step`` that hold ``"text"`` (a list of sampled continuations) and, optionally,
    ``"prompt"`` (the priming text of each): :class:`~bnlstm_lit.tasks.CharLanguageModel` adds this callback itself.
    At the end of the run, rank zero prints every sample -- its priming text and continuation, after a line
    ``--- sample k of N ---`` -- to stdout, which then holds the samples and nothing else (progress and log records
    go to stderr), and writes the same text to ``samples.txt`` in ``output_dir`` (by default the run's log directory,
    beside ``predictions.pt``), through a temporary name and a rename.

    Args:
        output_dir: folder for ``samples.txt`` (created if needed); None: ``trainer.log_dir``.
        filename: the file's name.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "samples.txt") -> None:
        self.output_dir = output_dir
        self.filename = filename
        self.samples: list[str] = []  # the last run's, priming text and continuation each
        self.last_path: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples = []

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or not isinstance(outputs.get("text"), list):
            return
        texts = outputs["text"]
        prompts = outputs.get("prompt")
        if not isinstance(prompts, list) or len(prompts) != len(texts):
            prompts = [""] * len(texts)
        self.samples.extend(f"{prompt}{text}" for prompt, text in zip(prompts, texts, strict=True))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.samples or not trainer.is_global_zero:
            return
        text = format_samples(self.samples)
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.filename
        tmp = path.with_name(f".{self.filename}.part")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # only left if writing failed
        self.last_path = path
        write_stdout(text)
        info(f"[bnlstm_lit] {len(self.samples)} sample{'s' if len(self.samples) > 1 else ''} written to {path}")


def format_samples(samples: list[str]) -> str:
    """The samples as plain text: each after a line ``--- sample k of N ---`` and ending with a newline of its own."""
    n = len(samples)
    return "".join(f"--- sample {k} of {n} ---\n{sample}\n" for k, sample in enumerate(samples, 1))


def _concatenate(batches: list[Any], several_dataloaders: bool) -> Any:
    """Per-batch outputs of ``predict`` -> one object with the batch axis concatenated (a list of such objects, one
    per dataloader, when there are several)."""
    return [_join(b) for b in batches] if several_dataloaders else _join(batches)


def _join(batches: list[Any]) -> Any:
    """Tensors are concatenated along dim 0, dicts key by key, lists (e.g. of sampled strings) one after the other."""
    if not batches:
        return batches
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {key: _join([b[key] for b in batches]) for key in first}
    if isinstance(first, list):
        return [item for batch in batches for item in batch]
    return batches
