"""Real multi-process DDP (CPU, gloo) through the CLI: stateful language modelling keeps contiguous streams per rank.

Lightning's DDP launcher re-runs the command line once per extra process, so the run is a subprocess
(``python -m bnlstm_lit fit ... --trainer.strategy=ddp --trainer.devices=2``); a probe callback (``ddp_probe``) saves
what each rank saw.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlstm_lit.data import PTBChar

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def test_stateful_streams_are_contiguous_per_rank_under_ddp(shared_data: Path, tmp_path: Path) -> None:
    ptb = shared_data / "ptb"
    batch, length, steps = 4, 20, 3
    probe = tmp_path / "probe"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "bnlstm_lit", "fit",
        f"--config={ROOT / 'configs' / 'ptb_bnlstm.yaml'}", f"--config={ROOT / 'configs' / 'debug.yaml'}",
        f"--data.init_args.data_dir={ptb}", "--data.init_args.mode=stateful",
        f"--data.init_args.seq_length={length}", f"--data.init_args.batch_size={batch}",
        f"--trainer.limit_train_batches={steps}", "--trainer.limit_val_batches=2",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=ddp_probe.BatchProbe", f"--trainer.callbacks.output_dir={probe}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    records = [torch.load(probe / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in records] == [2, 2]
    # what each rank must have read: its own B of the 2B equal contiguous streams the training split is cut into,
    # batch 2 continuing batch 1 in every row
    dm = PTBChar(str(ptb), seq_length=length, batch_size=batch)
    dm.setup("fit")
    tokens = dm.splits["train"].long()
    row_length = (len(tokens) - 1) // (2 * batch)
    for rank, record in enumerate(records):
        assert record["carry"] == [False, True]
        seen = torch.cat(record["inputs"], dim=1)  # (B, 2L)
        for i in range(batch):
            start = (rank * batch + i) * row_length
            assert torch.equal(seen[i], tokens[start : start + 2 * length]), (rank, i)
    # validation metrics are synchronized: every rank logged the same val/bpc
    assert records[0]["metrics"]["val/bpc"] == pytest.approx(records[1]["metrics"]["val/bpc"], rel=1e-6)
