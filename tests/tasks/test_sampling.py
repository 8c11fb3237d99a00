"""Sampling from a character language model: ``bnlstm-lit predict`` prints the samples to stdout and writes them to
samples.txt; the seed decides the draws; bad settings name their flag; checkpoints from before the sampling settings
moved from the DataModule to the task still load."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from bnlstm_lit.callbacks import PopulationStatistics, SampleWriter
from bnlstm_lit.callbacks.predictions import format_samples
from bnlstm_lit.cli import main
from bnlstm_lit.data.textfiles import TextFiles
from bnlstm_lit.models.language import CHAR_RNN_SETTINGS
from bnlstm_lit.tasks import CharLanguageModel
from quiet import quiet_trainer

pytestmark = pytest.mark.usefixtures("in_tmp_path")

ALPHABET = "\n abcd"


def write_corpus(folder: Path) -> Path:
    """train/valid/test.txt of random characters from ALPHABET, each using all of them."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 600), ("valid", 200), ("test", 200)):
        ids = torch.randint(0, len(ALPHABET), (n,), generator=g)
        ids[: len(ALPHABET)] = torch.arange(len(ALPHABET))
        (folder / f"{name}.txt").write_text("".join(ALPHABET[i] for i in ids.tolist()))
    return folder


def tiny_model(dm: TextFiles, **sampling: object) -> CharLanguageModel:
    torch.manual_seed(0)
    rnn = CHAR_RNN_SETTINGS.replace(hidden_size=8)
    return CharLanguageModel(dm.input_size, dm.output_size, dm.max_steps, rnn=rnn, **sampling)  # type: ignore[arg-type]


def predict(trainer: L.Trainer, model: CharLanguageModel, dm: TextFiles) -> dict[str, Any]:
    """The one batch of a real ``Trainer.predict``."""
    outputs = trainer.predict(model, datamodule=dm)
    assert outputs is not None and len(outputs) == 1 and isinstance(outputs[0], dict)
    return outputs[0]


# ------------------------------------------------------------------------------------------------- Trainer.predict


def test_predict_prints_the_samples_and_only_them_to_stdout_and_writes_samples_txt(
    in_tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the progress bar on (Lightning's draws on stdout): stdout holds the samples and nothing else, each
    after its ``--- sample k of N ---`` line, priming text first; samples.txt in the run folder holds the same."""
    dm = TextFiles(str(write_corpus(in_tmp_path / "corpus")), seq_length=6, batch_size=4)
    model = tiny_model(dm, prime="ab c", sample_length=15, num_samples=3, temperature=0.7, top_k=3)
    trainer = quiet_trainer(enable_progress_bar=True, default_root_dir=str(in_tmp_path / "run"))
    out = predict(trainer, model, dm)
    captured = capsys.readouterr()
    assert out["prompt"] == ["ab c"] * 3 and len(out["text"]) == 3
    expected = format_samples([f"ab c{text}" for text in out["text"]])
    assert captured.out == expected
    assert expected.splitlines()[0] == "--- sample 1 of 3 ---" and expected.count("--- sample ") == 3
    assert (in_tmp_path / "run" / "samples.txt").read_text() == expected
    assert "Predicting" in captured.err  # the progress bar went to stderr


def test_a_trainer_s_own_sample_writer_is_kept(in_tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dm = TextFiles(str(write_corpus(in_tmp_path / "corpus")), seq_length=6, batch_size=4)
    writer = SampleWriter(output_dir=str(in_tmp_path / "elsewhere"), filename="mine.txt")
    quiet_trainer(callbacks=[writer]).predict(tiny_model(dm, sample_length=5), datamodule=dm)
    assert writer.last_path == in_tmp_path / "elsewhere" / "mine.txt"
    assert capsys.readouterr().out == writer.last_path.read_text()


def test_top_k_1_is_greedy_whatever_the_seed(in_tmp_path: Path) -> None:
    dm = TextFiles(str(write_corpus(in_tmp_path / "corpus")), seq_length=6, batch_size=4)
    model = tiny_model(dm, prime="ab", sample_length=12, num_samples=2, top_k=1)
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        draws.append(predict(quiet_trainer(), model, dm)["ids"])
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0][0], draws[0][1])
    # against the plain softmax: the top-1 draw is the argmax of the same step, step by step
    torch.manual_seed(1)
    prime = dm.vocabulary.encode("ab").expand(2, -1)
    assert torch.equal(model.eval().sample(prime, 12, temperature=1e-6), draws[0])


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"sample_length": 0}, "sample_length"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_bad_sampling_values_name_the_flag(in_tmp_path: Path, kwargs: dict, flag: str) -> None:
    dm = TextFiles(str(write_corpus(in_tmp_path / "corpus")), seq_length=6, batch_size=4)
    with pytest.raises(ValueError, match=rf"^{flag} \(model\.init_args\.{flag}\) must"):
        tiny_model(dm, **kwargs)


def test_a_prime_outside_the_vocabulary_names_its_characters_before_any_estimation(in_tmp_path: Path) -> None:
    dm = TextFiles(str(write_corpus(in_tmp_path / "corpus")), seq_length=6, batch_size=4)
    model = tiny_model(dm, prime="ab!x?!")
    estimation = PopulationStatistics()
    estimation.estimate = None  # type: ignore[assignment,method-assign]  # called, it would fail differently
    pattern = r"^prime \(model\.init_args\.prime\) has 3 characters outside the corpus's vocabulary: '!', 'x', '\?'"
    with pytest.raises(ValueError, match=pattern):
        quiet_trainer(callbacks=[estimation]).predict(model, datamodule=dm)


# --------------------------------------------------------------------------------------------------- the real CLI


def cli(args: list[str]) -> None:
    threads, argv = torch.get_num_threads(), sys.argv
    torch.set_num_threads(1)
    sys.argv = ["bnlstm-lit"]
    try:
        main(args)
    finally:
        torch.set_num_threads(threads)
        sys.argv = argv


QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


@pytest.fixture
def checkpoint(in_tmp_path: Path) -> Path:
    """A one-step fit of a tiny BN-LSTM through the CLI: its last.ckpt."""
    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 1, "limit_val_batches": 0, "default_root_dir": "fit"},
        "model": {"class_path": "bnlstm_lit.tasks.CharLanguageModel", "init_args": {"rnn": {"hidden_size": 8}}},
        "data": {
            "class_path": "bnlstm_lit.data.TextFiles",
            "init_args": {"data_dir": str(write_corpus(in_tmp_path / "corpus")), "seq_length": 6, "batch_size": 4},
        },
    }
    path = in_tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    cli(["fit", f"--config={path}", *QUIET, "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath=ck",
         "--trainer.callbacks.save_last=true"])  # fmt: skip
    return in_tmp_path / "ck" / "last.ckpt"


def test_the_seed_decides_the_samples_through_the_cli(
    checkpoint: Path, in_tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bnlstm-lit predict --ckpt_path X --seed_everything S``: the same S prints the same samples, another S others;
    stdout is the samples, samples.txt the same text."""
    capsys.readouterr()

    def predict(seed: int, name: str) -> str:
        cli(["predict", f"--ckpt_path={checkpoint}", f"--seed_everything={seed}", *QUIET,
             f"--trainer.default_root_dir={name}", "--model.init_args.prime=ab", "--model.init_args.sample_length=40",
             "--model.init_args.num_samples=2", "--model.init_args.temperature=1.5"])  # fmt: skip
        out = capsys.readouterr().out
        assert out == (in_tmp_path / name / "samples.txt").read_text()
        return out

    first, again, other = predict(3, "a"), predict(3, "b"), predict(4, "c")
    assert first.startswith("--- sample 1 of 2 ---\nab") and first.count("--- sample ") == 2
    assert first == again
    assert first != other


def test_an_old_checkpoint_with_the_data_s_sampling_settings_still_predicts(
    checkpoint: Path, in_tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoints saved when prime/sample_length/num_samples/temperature were DataModule arguments store them in
    the data's hyper-parameters; predict from such a checkpoint warns, naming them and their flags now, and samples
    with the task's settings."""
    state = torch.load(checkpoint, weights_only=True)
    state["datamodule_hyper_parameters"].update(prime="ba", sample_length=7, num_samples=3, temperature=0.5)
    old = in_tmp_path / "old.ckpt"
    torch.save(state, old)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli(["predict", f"--ckpt_path={old}", *QUIET, "--trainer.default_root_dir=old",
             "--model.init_args.sample_length=5"])  # fmt: skip
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert any(
        "data.init_args.prime='ba'" in m and "data.init_args.temperature=0.5" in m and "model.init_args.prime" in m
        for m in messages
    ), messages
    out = capsys.readouterr().out
    header = "--- sample 1 of 1 ---\n"  # the task's num_samples (1), not the old data's 3
    assert out.startswith(header) and out.count("--- sample ") == 1
    body = out[len(header) :]
    assert body.startswith("\n") and len(body) == 1 + 5 + 1  # the corpus's prime "\n", 5 symbols, the end of line
