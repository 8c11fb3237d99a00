"""Evaluation under DDP counts every example once (real processes, CPU ``gloo``).

The splits have sizes that no 2 x batch size divides (13 validation and 7 test examples, batch 4). A 2-process
``validate`` and ``test`` must give the 1-process metrics and count exactly the 1-process examples (or characters):
no rank reads a padding repeat, none drops a share of its own.

Run as a script, this file is the per-rank program (Lightning's DDP launcher re-runs it for rank 1):

    python tests/test_ddp_eval.py TASK OUT DEVICES DATA_DIR

It validates and tests a freshly seeded model (TASK ``adding``: the adding problem; ``charlm``: a character LM in
paper mode on the text files in DATA_DIR) and saves, per rank, the returned metrics and how many examples (``adding``)
or scored characters (``charlm``) that rank evaluated to ``OUT.rank<r>``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
VAL, TEST, BATCH, LENGTH = 13, 7, 4, 10


class EvaluationCount(Callback):
    """How many examples (``(inputs, targets)`` batches) or scored characters (:class:`TextBatch`) this rank
    evaluated, per stage."""

    def __init__(self) -> None:
        self.counts = {"validate": 0, "test": 0}

    @staticmethod
    def _size(batch: Any) -> int:
        targets = getattr(batch, "targets", None)
        return int(targets.numel()) if targets is not None else len(batch[1])

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.counts["validate"] += self._size(args[2])

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.counts["test"] += self._size(args[2])


def _task(kind: str, data_dir: str) -> tuple[L.LightningModule, L.LightningDataModule]:
    from bnlstm_lit.data import AddingProblem, TextFiles
    from bnlstm_lit.nn import BNLSTMSettings
    from bnlstm_lit.tasks import CharLanguageModel, SequenceRegression

    rnn = BNLSTMSettings(hidden_size=8)
    if kind == "adding":
        adding = AddingProblem(seq_len=6, train_size=8, val_size=VAL, test_size=TEST, batch_size=BATCH)
        return SequenceRegression(2, 1, 6, rnn=rnn), adding
    text = TextFiles(data_dir, seq_length=LENGTH, batch_size=BATCH, mode="paper")
    size = text.input_size
    return CharLanguageModel(size, size, LENGTH, rnn=rnn), text


def main(kind: str, out: str, devices: int, data_dir: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)  # every rank builds the same model
    model, data = _task(kind, data_dir)
    counter = EvaluationCount()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[counter],
    )  # fmt: skip
    metrics = {**trainer.validate(model, datamodule=data, verbose=False)[0]}
    metrics |= trainer.test(model, datamodule=data, verbose=False)[0]
    record = {"metrics": {k: float(v) for k, v in metrics.items()}, "counts": counter.counts}
    torch.save(record, f"{out}.rank{trainer.global_rank}")


def run(kind: str, out: Path, devices: int, data_dir: Path) -> list[dict[str, Any]]:
    """Every rank's record of a ``devices``-process run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), kind, str(out), str(devices), str(data_dir)]
    done = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(devices)]


def check_two_processes_equal_one(kind: str, tmp_path: Path, data_dir: Path) -> list[dict[str, Any]]:
    """Both ranks report the 1-process metrics, and together evaluated what the 1-process run did."""
    [one] = run(kind, tmp_path / "one", 1, data_dir)
    two = run(kind, tmp_path / "two", 2, data_dir)
    for stage in ("validate", "test"):
        counted = [record["counts"][stage] for record in two]
        assert all(counted), (stage, counted)  # every rank had something to evaluate
        assert sum(counted) == one["counts"][stage], (stage, counted, one["counts"][stage])
    for record in two:
        assert record["metrics"].keys() == one["metrics"].keys()
        for name, value in one["metrics"].items():
            assert record["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    return [one, *two]


@pytest.mark.parametrize(("size", "batch", "world"), [(13, 4, 2), (7, 4, 2), (5, 4, 2), (3, 4, 2), (12, 4, 3)])
def test_shares_are_whole_one_process_batches_without_repeats(size: int, batch: int, world: int) -> None:
    from bnlstm_lit.data.samplers import EvaluationShard

    order = list(range(100, 100 + size))
    shares = [list(EvaluationShard(order, batch, world, rank)) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == order  # each example once
    assert all(shares)
    if -(-size // batch) >= world:  # enough batches: every rank reads whole batches of the one-process batching
        batches = [order[i : i + batch] for i in range(0, size, batch)]
        assert [share[i : i + batch] for share in shares for i in range(0, len(share), batch)] == sorted(
            batches, key=lambda b: (batches.index(b) % world, batches.index(b))
        )


def test_fewer_examples_than_processes_is_an_error() -> None:
    from bnlstm_lit.data.samplers import EvaluationShard

    with pytest.raises(ValueError, match="cannot give each of 3 processes one"):
        EvaluationShard(range(2), 4, 3, 0)


def test_classification_style_task_counts_each_example_once(tmp_path: Path) -> None:
    one, *_ = check_two_processes_equal_one("adding", tmp_path, tmp_path)
    assert one["counts"] == {"validate": VAL, "test": TEST}


def test_paper_mode_language_model_scores_each_character_once(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sentence = "the cat sat on the mat and the dog ate the hat "
    # evaluation examples: (N - 1) // LENGTH of them, from offset 0 (13 validation, 7 test)
    for name, size in (("train.txt", 400), ("valid.txt", VAL * LENGTH + 1), ("test.txt", TEST * LENGTH + 1)):
        (corpus / name).write_text((sentence * 10)[:size])
    one, *_ = check_two_processes_equal_one("charlm", tmp_path, corpus)
    # a lone last validation example is left out (batch statistics need two): 12 of 13, every test example
    assert one["counts"] == {"validate": (VAL - 1) * LENGTH, "test": TEST * LENGTH}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
