"""SequenceClassification / SequenceRegression built directly (no CLI): learning, statistics, metrics, optimizers."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import lightning as L
import lightning_utilities.core.rank_zero as rank_zero
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bnlstm_lit.callbacks import PopulationStatistics
from bnlstm_lit.data.adding import CHANCE_MSE, AddingProblem
from bnlstm_lit.nn import DEFAULTS, SequenceBatchNorm, batchnorm_sites, set_eval_statistics
from bnlstm_lit.tasks import SequenceClassification, SequenceRegression, SequenceTask
from quiet import quiet_trainer as trainer

pytestmark = pytest.mark.usefixtures("in_tmp_path")


TINY = DEFAULTS.replace(hidden_size=8)  # the network of these tests


def regression(**kwargs) -> SequenceRegression:
    args = {"input_size": 2, "output_size": 1, "max_steps": 10, "rnn": TINY}
    args.update(kwargs)
    return SequenceRegression(**args)


def classification(**kwargs) -> SequenceClassification:
    args = {"input_size": 3, "output_size": 4, "max_steps": 6, "rnn": TINY}
    args.update(kwargs)
    return SequenceClassification(**args)


def classification_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """Random inputs (N, 6, 3) and random labels of 4 classes: enough to exercise the loops and the metrics."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 6, 3, generator=g)
    targets = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size)


@pytest.fixture
def rank_zero_messages(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    """Messages of ``rank_zero_info`` (the logger Lightning installs, ``lightning.pytorch.utilities.rank_zero``)."""
    log = rank_zero.log
    caplog.set_level(logging.INFO, logger=log.name)
    log.addHandler(caplog.handler)  # Lightning's loggers may not propagate to the root logger
    try:
        # a record reaches caplog.handler twice where the logger also propagates to the root: count it once
        yield lambda: list({id(record): record.getMessage() for record in caplog.records}.values())
    finally:
        log.removeHandler(caplog.handler)


def adding(seq_len: int = 10, batch_size: int = 16, **kwargs) -> AddingProblem:
    args = {"train_size": 64, "val_size": 32, "test_size": 32}
    args.update(kwargs)
    return AddingProblem(seq_len=seq_len, batch_size=batch_size, **args)


# ----------------------------------------------------------------------------------------------------------- learning


def test_bnlstm_learns_the_adding_problem() -> None:
    """300 Adam steps on T=20 take a few seconds; evaluation uses the paper's population statistics.

    Measured over seeds 0-7: val/mse between 0.013 and 0.037 x chance with estimated population statistics (the
    running averages of the last steps were up to 0.39 x chance, so they are not what is asserted here).
    """
    L.seed_everything(0, verbose=False)
    steps, batch_size = 300, 32
    dm = AddingProblem(seq_len=20, train_size=steps * batch_size, val_size=500, test_size=100, batch_size=batch_size)
    model = SequenceRegression(
        2, 1, 20, rnn=DEFAULTS.replace(hidden_size=32), optimizer=partial(torch.optim.Adam, lr=3e-3)
    )
    t = trainer(
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
        callbacks=[PopulationStatistics(before_validation=True, max_batches=20)],
    )
    t.fit(model, dm)
    assert t.global_step == steps
    val_mse = float(t.callback_metrics["val/mse"])
    assert val_mse < 0.25 * CHANCE_MSE, f"val/mse {val_mse:.4f} vs chance {CHANCE_MSE:.4f}"
    # the logged metric is the MSE of the model on the validation split
    torch.testing.assert_close(t.callback_metrics["val/mse"], t.callback_metrics["val/loss"])


# --------------------------------------------------------------------------------------------- evaluation statistics


def test_batch_and_population_statistics_give_different_outputs(rank_zero_messages: Callable[[], list[str]]) -> None:
    L.seed_everything(0, verbose=False)
    population = regression(eval_statistics="population")
    batch = regression(eval_statistics="batch")
    batch.load_state_dict(population.state_dict())
    dm = adding()
    results = {}
    for name, model in (("population", population), ("batch", batch)):
        t = trainer()
        results[name] = t.validate(model, dm, verbose=False)[0]["val/mse"]
        assert f"[bnlstm_lit] validation uses {name} statistics in every BN site" in rank_zero_messages()
        predictions = torch.cat(t.predict(model, dm))  # (N, 1)
        assert f"[bnlstm_lit] predict uses {name} statistics in every BN site" in rank_zero_messages()
        # the outputs are those of the module in eval mode with these statistics, batch by batch
        model.eval()
        set_eval_statistics(model, name)
        with torch.no_grad():
            expected = torch.cat([model(inputs) for inputs, _ in dm.predict_dataloader()])
        torch.testing.assert_close(predictions, expected)
        results[f"{name}-predictions"] = predictions
    assert results["population"] != pytest.approx(results["batch"], rel=1e-3)
    assert not torch.allclose(results["population-predictions"], results["batch-predictions"])
    # population statistics at initialization are (0, 1): the output does not depend on the other batch members
    inputs = next(iter(dm.predict_dataloader()))[0]
    population.eval()
    with torch.no_grad():
        torch.testing.assert_close(population(inputs)[:3], population(inputs[:3]))
        assert not torch.allclose(batch(inputs)[:3], batch(inputs[:3]))


def test_statistics_message_is_logged_once_per_evaluation_not_in_the_sanity_check(
    rank_zero_messages: Callable[[], list[str]],
) -> None:
    model = regression()
    t = trainer(max_epochs=2, num_sanity_val_steps=1, limit_train_batches=2)
    t.fit(model, adding())
    validation = [m for m in rank_zero_messages() if "validation uses population statistics" in m]
    assert len(validation) == 2  # one per epoch; the sanity check is silent
    t.test(model, adding(), verbose=False)
    assert any("test uses population statistics" in m for m in rank_zero_messages())


def test_no_statistics_message_without_batch_norm(rank_zero_messages: Callable[[], list[str]]) -> None:
    trainer().validate(regression(rnn=TINY.replace(normalize=False)), adding(), verbose=False)
    assert not [m for m in rank_zero_messages() if "statistics in every BN site" in m]
    trainer().validate(regression(rnn=TINY.replace(normalize=True)), adding(), verbose=False)  # the capture works
    assert [m for m in rank_zero_messages() if "statistics in every BN site" in m]


def test_unnormalized_task_has_no_batch_norm() -> None:
    model = regression(rnn=TINY.replace(normalize=False))
    assert not any(isinstance(m, SequenceBatchNorm) for m in model.modules())
    assert not batchnorm_sites(model)
    assert not any("running_mean" in key for key in model.state_dict())
    assert batchnorm_sites(regression())  # the default is the BN-LSTM


# ------------------------------------------------------------------------------------------------------- metrics


def test_classification_metric_names_and_values() -> None:
    L.seed_everything(0, verbose=False)
    model = classification()
    t = trainer(max_epochs=2)
    train, val = classification_loader(seed=0), classification_loader(n=48, seed=1)
    t.fit(model, train, val)
    metrics = t.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    assert all(key.split("/")[0] in ("train", "val") for key in metrics), sorted(metrics)
    # val/acc is the accuracy over the whole validation split (its own metric object, not mixed with training)
    assert model.train_metrics is not model.val_metrics and model.val_metrics is not model.test_metrics
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x).argmax(-1) for x, _ in val])
    targets = torch.cat([y for _, y in val])
    torch.testing.assert_close(metrics["val/acc"], (predictions == targets).float().mean())

    test = t.test(model, val, verbose=False)[0]
    assert set(test) == {"test/loss", "test/acc"}
    assert test["test/acc"] == pytest.approx(float(metrics["val/acc"]))  # same data, same model


def test_regression_metric_names_and_target_shapes() -> None:
    model = regression()
    outputs = torch.randn(5, 1)
    targets = torch.randn(5)
    assert model.loss(outputs, targets) == model.loss(outputs, targets[:, None])
    torch.testing.assert_close(model.loss(outputs, targets), F.mse_loss(outputs[:, 0], targets))
    assert set(model.make_metrics()) == {"mse"}
    t = trainer()
    result = t.test(model, adding(), verbose=False)[0]
    assert set(result) == {"test/loss", "test/mse"}
    assert result["test/mse"] == pytest.approx(result["test/loss"], rel=1e-5)


def test_classification_predict_returns_classes_and_probabilities() -> None:
    model = classification()
    t = trainer()
    (first, *_) = t.predict(model, classification_loader(n=32))
    assert set(first) == {"prediction", "probabilities"}
    assert first["prediction"].shape == (16,) and first["probabilities"].shape == (16, 4)
    torch.testing.assert_close(first["probabilities"].sum(-1), torch.ones(16))
    assert torch.equal(first["prediction"], first["probabilities"].argmax(-1))


def test_bad_batch_is_refused_with_its_form() -> None:
    with pytest.raises(ValueError, match=r"\(inputs, targets\).*got Tensor"):
        SequenceTask.unpack(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"got tuple of 4"):
        SequenceTask.unpack((1, 2, 3, 4))


# -------------------------------------------------------------------------------------------------- optimization


def test_injected_optimizer_and_plateau_scheduler() -> None:
    model = classification(
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0),
        monitor="val/acc",
    )
    config = model.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.1
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    scheduler = config["lr_scheduler"]
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert scheduler["scheduler"].optimizer is optimizer
    assert scheduler["monitor"] == "val/acc"
    # the monitored metric exists: Lightning refuses a plateau scheduler whose monitor is never logged
    t = trainer(max_epochs=2, limit_train_batches=2)
    t.fit(model, classification_loader(), classification_loader(n=32, seed=1))
    assert t.lr_scheduler_configs[0].monitor == "val/acc"


def test_default_optimizer_without_scheduler() -> None:
    model = regression()
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)  # a plain optimizer, no scheduler dict
    assert "optimizer" not in model.hparams and "lr_scheduler" not in model.hparams  # factories are not hparams


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = regression(rnn=TINY.replace(hidden_size=6, momentum=0.05), optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    t = trainer(limit_train_batches=2, default_root_dir=tmp_path)
    dm = adding()
    t.fit(model, dm)
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    restored = SequenceRegression.load_from_checkpoint(path)
    assert restored.hparams["rnn"]["hidden_size"] == 6 and restored.hparams["rnn"]["momentum"] == 0.05
    assert restored.rnn_settings == model.rnn_settings
    for (key, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    inputs = next(iter(dm.val_dataloader()))[0]
    model.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), restored(inputs))


# ------------------------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rnn": TINY.replace(hidden_size=0)}, "rnn.hidden_size"),
        ({"eval_statistics": "foo"}, "eval_statistics"),
        ({"input_size": 0}, "input_size"),
        ({"output_size": -1}, "output_size"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"model\.init_args\.{re.escape(name)}\b"):
        regression(**kwargs)
