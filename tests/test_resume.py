"""Exact resume: a run killed after N steps and resumed from its last checkpoint reaches the same parameters,
buffers (running statistics), optimizer state and metrics as the same run uninterrupted (CPU, fixed seed).

Each run is a real ``python -m bnlstm_lit fit`` process; the interrupted one dies abruptly mid-epoch (``os._exit``
in a callback, before the step's checkpoint is written), so the resumed run re-does that step from the last
checkpoint. The runs cross an epoch boundary, use dropout and h_0 noise (the global random state) and the BN-LSTM's
per-step statistics.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offline_data import data_root

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED = data_root()  # the offline data copies (tests/offline_data.py)
TOTAL, KILL = 7, 3  # optimizer steps; the interrupted run dies at the end of step KILL (4 batches per epoch)
# (step 3: mid-epoch 0; step 6: mid-epoch 1, where the epoch's order must be set before the loader's first batch)


def fit(config: str, root: Path, *extra: str, kill: int | None = None, resume: Path | None = None) -> int:
    args = [
        sys.executable, "-m", "bnlstm_lit", "fit", f"--config={CONFIGS / config}", f"--config={CONFIGS / 'debug.yaml'}",
        f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", f"--trainer.max_steps={TOTAL}",
        "--trainer.max_epochs=-1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
        "--trainer.logger=false",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'every_step'}",
        "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=-1", *extra,
    ]  # fmt: skip
    if kill is not None:
        args += ["--trainer.callbacks+=resume_probe.KillAfter", f"--trainer.callbacks.step={kill}"]
    if resume is not None:
        args.append(f"--ckpt_path={resume}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if kill is None:
        assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode


def final(root: Path) -> dict:
    return torch.load(root / "every_step" / "last.ckpt", weights_only=True)


def assert_same_run(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == TOTAL
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), f"{name} differs"
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True
    ):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), f"optimizer {key} differs"
    callbacks = {k: v for k, v in a["callbacks"].items() if k.startswith("ModelCheckpoint{'monitor'")}
    for key, state in callbacks.items():  # the monitored metric: the validation runs saw the same numbers
        assert state["best_model_score"] == b["callbacks"][key]["best_model_score"]


CASES = {
    # BN-LSTM, 2 layers with dropout and h_0 noise: the global random state must be restored too
    "adding": ("adding_bnlstm.yaml", ["--model.init_args.rnn.num_layers=2", "--model.init_args.rnn.dropout=0.3",
                                      "--model.init_args.rnn.h0_noise_std=0.1"]),
    "ptb": ("ptb_bnlstm.yaml", [f"--data.init_args.data_dir={SHARED / 'ptb'}"]),
}  # fmt: skip


@pytest.mark.parametrize(("case", "kill"), [("adding", 3), ("adding", 6), ("ptb", 6)])
def test_killed_and_resumed_run_equals_the_uninterrupted_run(case: str, kill: int, tmp_path: Path) -> None:
    config, extra = CASES[case]
    if case == "ptb" and not (SHARED / "ptb").is_dir():
        pytest.skip(f"PTB data not found in {SHARED / 'ptb'}")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir()
    broken.mkdir()
    fit(config, straight, *extra)
    assert fit(config, broken, *extra, kill=kill) == 75  # died at the end of step `kill`
    last = torch.load(broken / "every_step" / "last.ckpt", weights_only=True)
    assert last["global_step"] == kill - 1  # its own checkpoint was never written
    fit(config, broken, *extra, resume=broken / "every_step" / "last.ckpt")
    assert_same_run(final(straight), final(broken))


def test_a_resume_without_the_saved_random_state_differs(tmp_path: Path) -> None:
    """The control: dropping the checkpoint's random state (an older checkpoint) changes the run, so the test above
    can fail."""
    config, extra = CASES["adding"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir()
    broken.mkdir()
    fit(config, straight, *extra)
    assert fit(config, broken, *extra, kill=KILL) == 75
    path = broken / "every_step" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["bnlstm_rng"]
    torch.save(checkpoint, path)
    fit(config, broken, *extra, resume=path)
    a, b = final(straight)["state_dict"], final(broken)["state_dict"]
    assert any(not torch.equal(a[name], b[name]) for name in a)
