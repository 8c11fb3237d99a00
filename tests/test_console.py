"""Console output during a run: our info lines stand on their own line beside Lightning's TQDM progress bar, and the
bar can be kept off stdout."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnlstm_lit.console import StderrProgressBar, progress_bar_off_stdout
from quiet import quiet_trainer

#: A tiny fit with Lightning's default progress bar, printing our info lines while the training bar is live
#: (population statistics before validation, the statistics in use at the start of validation).
FIT = textwrap.dedent(
    """
    import torch, lightning as L
    from bnlstm_lit.callbacks import PopulationStatistics
    from bnlstm_lit.data.textfiles import TextFiles
    from bnlstm_lit.models.language import CHAR_RNN_SETTINGS
    from bnlstm_lit.tasks import CharLanguageModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dm = TextFiles("corpus", seq_length=6, batch_size=4)
    model = CharLanguageModel(dm.input_size, dm.output_size, dm.max_steps, rnn=CHAR_RNN_SETTINGS.replace(hidden_size=8))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=4, limit_val_batches=2, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[PopulationStatistics(before_validation=True, validation_max_batches=2)],
    )
    trainer.fit(model, datamodule=dm)
    """
)


def render(raw: str) -> list[str]:
    """What a terminal shows for ``raw``: ``\\n`` starts the next row, ``\\r`` returns to column 0, ``ESC[A`` moves one
    row up (tqdm's nested bars), other escape sequences are dropped, printable text overwrites what is there."""
    rows: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\x1b":  # CSI: ESC [ parameters final-byte
            j = i + 2
            while j < len(raw) and not raw[j].isalpha():
                j += 1
            if raw[i + 1 : i + 2] == "[" and raw[j : j + 1] == "A":
                row = max(row - int(raw[i + 2 : j] or 1), 0)
            i = j + 1
            continue
        if ch == "\n":
            row, col = row + 1, 0
            while len(rows) <= row:
                rows.append([])
        elif ch == "\r":
            col = 0
        else:
            line = rows[row]
            line.extend(" " * (col - len(line) + 1))
            line[col] = ch
            col += 1
        i += 1
    return ["".join(r).rstrip() for r in rows]


def run_in_terminal(script: str, cwd: Path, timeout: float = 120) -> str:
    """Run ``python -c script`` with stdout and stderr on one pseudo-terminal; everything it wrote, decoded."""
    import fcntl
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows, 160 columns
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError as error:  # EIO: the child closed the terminal
                if error.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=timeout) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_info_lines_start_on_their_own_line_beside_the_progress_bar(tmp_path: Path) -> None:
    """Lightning's bar redraws one line with ``\\r``; a log record written meanwhile was glued after its
    ``...it/s]`` fragment. Our info lines clear the bars around themselves: each starts its own terminal row."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, n in (("train", 200), ("valid", 100), ("test", 100)):
        (corpus / f"{name}.txt").write_text(("ab cd\n" * n)[: n + 6])
    raw = run_in_terminal(FIT, tmp_path)
    screen = render(raw)
    info_rows = [row for row in screen if "[bnlstm_lit]" in row]
    assert any("population statistics estimated over 2 training batches" in row for row in info_rows), raw[-3000:]
    assert any("validation uses population statistics" in row for row in info_rows), raw[-3000:]
    glued = [row for row in info_rows if not row.startswith("[bnlstm_lit]")]
    assert not glued, glued
    assert any(row.startswith("Epoch 0: 100%") for row in screen), screen  # the bar itself is still drawn


def test_render_reads_carriage_returns_and_cursor_moves() -> None:
    bar = "Epoch 0: 50%|#   | 2/4 [1.2it/s]"
    assert render(f"{bar}\r{' ' * len(bar)}\r[x] done\nnext") == ["[x] done", "next"]
    assert render(f"{bar}\r[x]") == ["[x]" + bar[3:]]
    assert render("a\nb\x1b[A\rA") == ["A", "b"]
    assert render("bar 1.2it/s][x] glued") == ["bar 1.2it/s][x] glued"]


def test_the_plain_tqdm_bar_is_replaced_by_one_on_stderr_and_a_chosen_bar_is_kept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    (bar,) = progress_bar_off_stdout(quiet_trainer(enable_progress_bar=True, max_epochs=1))
    assert isinstance(bar, StderrProgressBar)
    own = StderrProgressBar(refresh_rate=3)
    assert progress_bar_off_stdout(quiet_trainer(enable_progress_bar=True, callbacks=[own])) == []
    assert progress_bar_off_stdout(quiet_trainer()) == []  # no bar at all
    tqdm_bar = bar.init_predict_tqdm()
    tqdm_bar.update(1)
    tqdm_bar.close()
    captured = capsys.readouterr()
    assert captured.out == "" and "Predicting" in captured.err
