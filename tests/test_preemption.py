"""Preemption: SIGTERM saves a checkpoint that resumes exactly and ends the process promptly, with status 143.

Real ``python -m bnlstm_lit`` processes on the adding problem (tiny, no data files). Lightning's SIGTERM handler
sets ``trainer.received_sigterm``; its loops stop after the current batch, and the shipped configs'
``ModelCheckpoint(save_on_exception=True)`` saves on the way out. The population-statistics pass, which Lightning's
loops do not drive, stops before its next batch. The fit runs reuse the exact-resume tests' command and comparison
(``test_resume.py``); the signal comes from ``preemption_probe`` (at the end of a chosen step, from inside the run)
or from this process (once the probe's marker says the statistics pass is under way).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from bnlstm_lit.cli import SIGTERM_EXIT_STATUS
from test_resume import CASES, CONFIGS, ROOT, TOTAL, assert_same_run, final, fit

TERM = 6  # SIGTERM at the end of step 6: mid-epoch 1 (4 batches per epoch), after epoch 0's validation
#: test_resume.fit asserts status 0 unless it was given a KillAfter step; one past the run's end never fires
NO_KILL = TOTAL + 1


def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_exactly(tmp_path: Path) -> None:
    config, extra = CASES["adding"]  # BN-LSTM, 2 layers, dropout and h_0 noise: the random state matters too
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir()
    broken.mkdir()
    term = ["--trainer.callbacks+=preemption_probe.TermAfter", f"--trainer.callbacks.step={TERM}"]
    with ThreadPoolExecutor(2) as pool:  # the uninterrupted twin and the preempted run side by side
        twin = pool.submit(fit, config, straight, *extra)
        status = fit(config, broken, *extra, *term, kill=NO_KILL)
        twin.result()
    assert status == SIGTERM_EXIT_STATUS == 143
    # the config's ModelCheckpoint saved on the way out: the file of step TERM, and last.ckpt with it
    saved = sorted((broken / "checkpoints").glob(f"epoch=1-step={TERM}*.ckpt"))
    assert len(saved) == 1, sorted(p.name for p in (broken / "checkpoints").iterdir())
    last = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == TERM
    # the DataModule counts the batches of epoch 1 whose steps were taken, no more, no fewer
    assert last["AddingProblem"]["train_position"] == {"epoch": 1, "batches": TERM - 4, "epoch_batches": 4}
    fit(config, broken, *extra, resume=saved[0])
    assert_same_run(final(straight), final(broken))


def evaluate(subcommand: str, root: Path) -> subprocess.Popen[str]:
    """``subcommand`` (test, validate, predict) of the adding BN-LSTM with its population-statistics pass slowed
    down (50 batches, 0.4 s each: 20 s in all) and announced by ``root/pass.started``."""
    args = [
        sys.executable, "-m", "bnlstm_lit", subcommand, f"--config={CONFIGS / 'adding_bnlstm.yaml'}",
        f"--config={CONFIGS / 'debug.yaml'}", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.limit_train_batches=1000",
        "--trainer.callbacks+=preemption_probe.SlowStatisticsPass",
        f"--trainer.callbacks.marker={root / 'pass.started'}", "--trainer.callbacks.delay=0.4",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    return subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


#: signal to SIGTERMException out of the pass: the batch in progress (0.4 s) and no more
STOP = 1.5
#: signal to exit: the stop, then Python's own shutdown, ~2.5 s for any bnlstm-lit run on a busy 2-core machine
EXIT = 8.0


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_sigterm_during_the_statistics_pass_ends_the_process_at_once(subcommand: str, tmp_path: Path) -> None:
    process = evaluate(subcommand, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "pass.started").exists():
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the statistics pass did not start"
            time.sleep(0.05)
        sent = time.time()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=EXIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{subcommand} still running {EXIT} s after SIGTERM")
        exited = time.time() - sent
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert process.returncode == SIGTERM_EXIT_STATUS, output[-3000:]
    assert "population statistics estimated" not in output  # stopped, not finished
    when, name = (tmp_path / "pass.stopped").read_text().split()
    assert name == "SIGTERMException"
    assert float(when) - sent < STOP, f"stopped {float(when) - sent:.2f} s after SIGTERM, exited after {exited:.2f} s"
