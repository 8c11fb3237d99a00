"""PopulationStatistics (the paper's test protocol as a callback) and PredictionWriter."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from bnlstm_lit.callbacks import PopulationStatistics, PredictionWriter
from bnlstm_lit.data.adding import AddingProblem
from bnlstm_lit.nn import BNLSTMSettings, batchnorm_sites, estimate_population_statistics
from bnlstm_lit.tasks import SequenceClassification, SequenceRegression
from quiet import quiet_trainer

pytestmark = pytest.mark.usefixtures("in_tmp_path")

TRAIN_BATCHES = 6  # adding(): 96 training examples in batches of 16


def trainer(callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    return quiet_trainer(callbacks=callbacks, **kwargs)


def adding(**kwargs: Any) -> AddingProblem:
    args = {"seq_len": 8, "train_size": 16 * TRAIN_BATCHES, "val_size": 32, "test_size": 40, "batch_size": 16}
    args.update(kwargs)
    return AddingProblem(**args)


def regression(normalize: bool = True) -> SequenceRegression:
    torch.manual_seed(0)
    return SequenceRegression(2, 1, 8, rnn=BNLSTMSettings(hidden_size=6, normalize=normalize))


def scramble_statistics(model: torch.nn.Module) -> None:
    """Population statistics that no estimation would produce, so that a skipped estimation shows."""
    for site in batchnorm_sites(model):
        site.running_mean.fill_(7.0)
        site.running_var.fill_(3.0)
        site.num_batches_tracked.fill_(123)


def statistics(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [
        (site.running_mean.clone(), site.running_var.clone(), site.num_batches_tracked.clone())
        for site in batchnorm_sites(model)
    ]


def direct_estimate(model: torch.nn.Module, dm: AddingProblem, max_batches: int | None, epoch: int = 0) -> list:
    """What estimate_population_statistics gives over the DataModule's training loader (in the order of ``epoch``:
    the order of a training epoch depends on it), on a copy of ``model``."""
    reference = copy.deepcopy(model)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    used = estimate_population_statistics(
        reference, loader, forward=lambda m, batch: m(batch[0]), max_batches=max_batches
    )
    return [used, statistics(reference)]


def assert_same_statistics(actual: list, expected: list) -> None:
    assert len(actual) == len(expected) > 0
    for (mean, var, tracked), (mean_e, var_e, tracked_e) in zip(actual, expected, strict=True):
        torch.testing.assert_close(mean, mean_e, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(var, var_e, rtol=1e-6, atol=1e-7)
        assert torch.equal(tracked, tracked_e)


class RecordingStatistics(PopulationStatistics):
    """PopulationStatistics that records when it estimated (global step, sanity check) and how many batches."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[dict[str, Any]] = []

    def estimate(self, trainer: L.Trainer, pl_module: L.LightningModule, max_batches: int | None = None) -> int:
        used = super().estimate(trainer, pl_module, max_batches)
        self.calls.append(
            {"step": trainer.global_step, "sanity": trainer.sanity_checking, "used": used, "stage": trainer.state.stage}
        )
        return used


# ------------------------------------------------------------------------------------------------ PopulationStatistics


def test_test_uses_the_paper_estimate_over_the_limited_training_batches() -> None:
    model, dm = regression(), adding()
    trainer([PopulationStatistics()], limit_train_batches=3).fit(model, dm)
    expected = direct_estimate(model, adding(), max_batches=3)
    parameters = copy.deepcopy(model.state_dict())
    scramble_statistics(model)

    callback = RecordingStatistics()
    trainer([callback], limit_train_batches=3).test(model, adding(), verbose=False)
    assert [c["used"] for c in callback.calls] == [3] == expected[:1]
    assert_same_statistics(statistics(model), expected[1])
    # every step was averaged over exactly the 3 batches, and nothing but the statistics changed
    assert all(torch.all(tracked == 3) for _, _, tracked in statistics(model))
    for key, value in model.state_dict().items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, parameters[key]), key
    # the whole training set gives other statistics: the limit mattered
    whole = direct_estimate(model, adding(), max_batches=None)
    assert whole[0] == TRAIN_BATCHES
    assert not torch.allclose(whole[1][0][0], expected[1][0][0])


def test_fraction_of_training_batches() -> None:
    callback = RecordingStatistics()
    trainer([callback], limit_train_batches=0.5).test(regression(), adding(), verbose=False)
    assert callback.calls[0]["used"] == TRAIN_BATCHES // 2


@pytest.mark.parametrize(("max_batches", "used"), [(2, 2), (1, 1), (100, TRAIN_BATCHES)])
def test_max_batches_is_honoured(max_batches: int, used: int) -> None:
    model, dm = regression(), adding()
    callback = RecordingStatistics(max_batches=max_batches)
    trainer([callback]).test(model, dm, verbose=False)
    assert [c["used"] for c in callback.calls] == [used]
    assert all(torch.all(tracked == used) for _, _, tracked in statistics(model))
    assert_same_statistics(statistics(model), direct_estimate(regression(), adding(), max_batches=max_batches)[1])


def test_limit_train_batches_also_bounds_an_explicit_max_batches() -> None:
    callback = RecordingStatistics(max_batches=5)
    trainer([callback], limit_train_batches=2).test(regression(), adding(), verbose=False)
    assert callback.calls[0]["used"] == 2


def test_limit_train_batches_zero_names_the_setting() -> None:
    with pytest.raises(ValueError, match="limit_train_batches=0"):
        trainer([PopulationStatistics()], limit_train_batches=0).test(regression(), adding(), verbose=False)


def test_bad_max_batches() -> None:
    with pytest.raises(ValueError, match="max_batches must be positive"):
        PopulationStatistics(max_batches=0)
    with pytest.raises(ValueError, match="validation_max_batches must be positive"):
        PopulationStatistics(validation_max_batches=0)


def test_before_validation_runs_before_each_validation_but_not_the_sanity_check() -> None:
    callback = RecordingStatistics(before_validation=True, max_batches=2)
    model = regression()
    t = trainer([callback], max_epochs=2, num_sanity_val_steps=1, limit_train_batches=3)
    t.fit(model, adding())
    assert t.sanity_checking is False and t.num_sanity_val_steps == 1  # a sanity check did run ...
    assert [c["sanity"] for c in callback.calls] == [False, False]  # ... without an estimation
    assert [c["step"] for c in callback.calls] == [3, 6]  # one before the validation of each epoch
    assert all(c["used"] == 2 for c in callback.calls)
    # the validation of the last epoch (epoch 1) saw exactly the estimate from the final weights
    assert_same_statistics(statistics(model), direct_estimate(model, adding(), max_batches=2, epoch=1)[1])


def test_validation_max_batches_bounds_only_the_passes_before_validation_in_fit() -> None:
    callback = RecordingStatistics(before_validation=True, validation_max_batches=2)
    model = regression()
    dm = adding()
    t = trainer([callback], max_epochs=1, num_sanity_val_steps=0)
    t.fit(model, dm)
    t.validate(model, dm, verbose=False)  # outside fit: the full bound (max_batches=None: the whole training set)
    t.test(model, dm, verbose=False)
    assert [(c["stage"].value, c["used"]) for c in callback.calls] == [
        ("validate", 2),
        ("validate", TRAIN_BATCHES),
        ("test", TRAIN_BATCHES),
    ]


def test_validation_with_batch_statistics_skips_the_estimation_but_test_does_not() -> None:
    """eval_statistics=batch: validation reads no population statistics, so none are estimated before it (a pass
    over the training set per validation for nothing); test still estimates (batch-1 protocols fall back to them)."""
    callback = RecordingStatistics(before_validation=True, max_batches=2)
    torch.manual_seed(0)
    model = SequenceRegression(2, 1, 8, rnn=BNLSTMSettings(hidden_size=6), eval_statistics="batch")
    t = trainer([callback], max_epochs=2, num_sanity_val_steps=0, limit_train_batches=3)
    t.fit(model, adding())
    assert callback.calls == []
    t.test(model, adding(), verbose=False)
    assert [(c["stage"].value, c["used"]) for c in callback.calls] == [("test", 2)]


def test_by_default_validation_keeps_the_running_averages() -> None:
    callback = RecordingStatistics()
    model = regression()
    t = trainer([callback], max_epochs=1, limit_train_batches=2)
    t.fit(model, adding())
    assert callback.calls == []  # fit: no estimation (running averages monitor)
    assert all(torch.all(tracked == 2) for _, _, tracked in statistics(model))  # the two training batches
    t.predict(model, adding())
    assert [c["stage"] for c in callback.calls] == ["predict"]


def test_no_op_without_batch_norm() -> None:
    callback = RecordingStatistics()
    model = regression(normalize=False)
    result = trainer([callback]).test(model, adding(), verbose=False)
    assert [c["used"] for c in callback.calls] == [0]
    assert "test/mse" in result[0]
    # and it needs no DataModule then
    loader = DataLoader(TensorDataset(torch.rand(8, 8, 2), torch.rand(8)), batch_size=4)
    trainer([callback]).test(model, loader, verbose=False)
    assert [c["used"] for c in callback.calls] == [0, 0]


def test_batch_norm_without_datamodule_is_refused() -> None:
    loader = DataLoader(TensorDataset(torch.rand(8, 8, 2), torch.rand(8)), batch_size=4)
    with pytest.raises(RuntimeError, match="needs the training data.*LightningDataModule"):
        trainer([PopulationStatistics()]).test(regression(), loader, verbose=False)


# ----------------------------------------------------------------------------------------------------- PredictionWriter


def test_prediction_writer_saves_the_concatenated_outputs(tmp_path: Path) -> None:
    model, dm = regression(), adding()
    writer = PredictionWriter(output_dir=str(tmp_path / "out"))
    outputs = trainer([writer]).predict(model, dm, return_predictions=True)
    path = tmp_path / "out" / "predictions.pt"
    assert writer.last_path == path and path.is_file()
    saved = torch.load(path, weights_only=True)
    assert isinstance(outputs, list) and len(outputs) == 3  # 40 test examples in batches of 16
    assert torch.equal(saved, torch.cat(outputs)) and saved.shape == (40, 1)
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictions.pt"]  # no .part file left


def test_prediction_writer_dicts_default_folder_and_overwrite(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SequenceClassification(2, 3, 8, rnn=BNLSTMSettings(hidden_size=6, normalize=False))
    loader = DataLoader(TensorDataset(torch.rand(10, 8, 2), torch.zeros(10, dtype=torch.long)), batch_size=4)
    writer = PredictionWriter()
    t = trainer([writer], logger=CSVLogger(tmp_path, name="logs"))
    outputs = t.predict(model, loader, return_predictions=True)
    path = Path(t.log_dir) / "predictions.pt"
    assert writer.last_path == path and path.is_file()  # the run's log directory
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"prediction", "probabilities"}
    for key in saved:
        assert torch.equal(saved[key], torch.cat([o[key] for o in outputs]))
    assert saved["probabilities"].shape == (10, 3)
    # a second run replaces the file
    loader2 = DataLoader(TensorDataset(torch.rand(6, 8, 2), torch.zeros(6, dtype=torch.long)), batch_size=4)
    t.predict(model, loader2)
    assert torch.load(path, weights_only=True)["prediction"].shape == (6,)
    assert not list(path.parent.glob("*.part")) and not list(path.parent.glob(".*.part"))


class MultiLoaderRegression(SequenceRegression):
    """Accepts several predict dataloaders (Lightning requires ``dataloader_idx`` in the signature for that)."""

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return super().predict_step(batch, batch_idx)


def two_loaders() -> list[DataLoader]:
    return [DataLoader(TensorDataset(torch.rand(n, 8, 2), torch.rand(n)), batch_size=4) for n in (6, 9)]


def test_prediction_writer_several_dataloaders(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MultiLoaderRegression(2, 1, 8, rnn=BNLSTMSettings(hidden_size=6, normalize=False))
    writer = PredictionWriter(output_dir=str(tmp_path))
    outputs = trainer([writer]).predict(model, two_loaders(), return_predictions=True)
    saved = torch.load(tmp_path / "predictions.pt", weights_only=True)
    assert isinstance(saved, list) and len(saved) == 2
    for concatenated, per_batch, n in zip(saved, outputs, (6, 9), strict=True):
        assert torch.equal(concatenated, torch.cat(per_batch)) and concatenated.shape == (n, 1)


def test_tasks_accept_several_predict_dataloaders(tmp_path: Path) -> None:
    outputs = trainer([PredictionWriter(output_dir=str(tmp_path))]).predict(regression(normalize=False), two_loaders())
    assert len(outputs) == 2
