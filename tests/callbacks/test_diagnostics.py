"""The diagnostic callbacks (``GradientFlow``, ``StatisticsStationarity``) in real, tiny training runs.

Every run is a few SGD steps of a narrow (BN-)LSTM on adding-problem data (no download), on CPU, logging to a
TensorBoardLogger (read back with TensorBoard's EventAccumulator) and to an in-memory logger.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bnlstm_lit.callbacks import GradientFlow, PopulationStatistics, StatisticsStationarity
from bnlstm_lit.cli import main
from bnlstm_lit.data import AddingProblem
from bnlstm_lit.data.adding import adding_problem
from bnlstm_lit.nn import BNLSTM, BNLSTMSettings, batchnorm_sites
from bnlstm_lit.report import analysis
from bnlstm_lit.report.figures import png_size
from bnlstm_lit.tasks import SequenceRegression

T = 20  # sequence length (and max_steps)
H = 8  # hidden units
B = 8  # batch size
ROOT = Path(__file__).resolve().parents[2]
PNG_SIZE = (800, 500)


# ------------------------------------------------------------------------------------------------------- helpers


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: a list of (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def scalars(self, prefix: str) -> dict[str, dict[int, float]]:
        """{tag: {step: value}} of the metrics whose name starts with ``prefix``."""
        out: dict[str, dict[int, float]] = {}
        for step, metrics in self.calls:
            for key, value in metrics.items():
                if key.startswith(prefix):
                    assert step is not None
                    out.setdefault(key, {})[step] = float(value)
        return out


class ProbeSpy(Callback):
    """Per training batch: whether the probe was armed at batch start and how many probes the forward created."""

    def __init__(self) -> None:
        self.armed: list[tuple[int, bool]] = []
        self.probes: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.armed.append((trainer.global_step, all(r.probe_hidden_grad for r in layers(pl_module))))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self.probes.append((trainer.global_step, sum(len(r.hidden_probes) for r in layers(pl_module))))


class BufferSpy(Callback):
    """A copy of the model's state dict after every fit validation (sanity check excluded) and after test, and in
    ``before`` at the start of every fit validation."""

    def __init__(self) -> None:
        self.states: list[dict[str, Tensor]] = []
        self.before: list[dict[str, Tensor]] = []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.before.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def _keep(self, pl_module: L.LightningModule) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._keep(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._keep(pl_module)


def layers(module: nn.Module) -> list[BNLSTM]:
    return [m for m in module.modules() if isinstance(m, BNLSTM)]


def dataset(size: int, seed: int = 0) -> TensorDataset:
    return TensorDataset(*adding_problem(size, T, torch.Generator().manual_seed(seed)))


def loader(data: TensorDataset) -> DataLoader:
    return DataLoader(data, batch_size=B, shuffle=False)


def make_model(seed: int = 0, rnn: dict[str, Any] | None = None, **kwargs: Any) -> SequenceRegression:
    """``rnn``: settings other than the defaults (hidden_size H)."""
    torch.manual_seed(seed)
    kwargs.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=0.1))
    return SequenceRegression(2, 1, T, rnn=BNLSTMSettings(hidden_size=H, **(rnn or {})), **kwargs)


def make_trainer(root: Path, callbacks: list[Callback], loggers: Any = None, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 4,
        "logger": TensorBoardLogger(root, name="logs") if loggers is None else loggers,
        "callbacks": callbacks,
        "default_root_dir": root,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    return L.Trainer(**options)


def events(log_dir: str | Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def tb_scalars(accumulator: Any, prefix: str) -> dict[str, dict[int, float]]:
    return {
        tag: {e.step: e.value for e in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
        if tag.startswith(prefix)
    }


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def default_times(length: int) -> list[int]:
    return sorted({0, length // 4, length // 2, (3 * length) // 4, length - 1})


# ------------------------------------------------------------------------------------------------- GradientFlow


def test_gradient_flow_files_scalars_and_figure(tmp_path: Path) -> None:
    """steps=(0, 2) in a 4-step fit of a 2-layer BN-LSTM: two records, JSON, PNG, scalars and images."""
    flow = GradientFlow(steps=(0, 2))
    memory = MemoryLogger()
    tensorboard = TensorBoardLogger(tmp_path, name="logs")
    trainer = make_trainer(tmp_path, [flow], loggers=[tensorboard, memory])
    trainer.fit(make_model(rnn={"num_layers": 2}), loader(dataset(64)))
    assert trainer.global_step == 4

    names = ["net.rnn.0", "net.rnn.1"]
    directory = Path(trainer.log_dir) / "diagnostics"
    assert sorted(p.name for p in directory.glob("*.json")) == ["gradient_flow_step0.json", "gradient_flow_step2.json"]
    assert [r["step"] for r in flow.measured] == [0, 2]
    for record in flow.measured:
        step = record["step"]
        saved = read_json(directory / f"gradient_flow_step{step}.json")
        assert saved == record  # the JSON holds exactly what the callback kept
        assert saved["step"] == step and sorted(saved["norms"]) == names
        for curve in saved["norms"].values():
            values = torch.tensor(curve)
            assert values.shape == (T,)
            assert torch.isfinite(values).all() and (values > 0).all()
        png = directory / f"gradient_flow_step{step}.png"
        assert png_size(png) == PNG_SIZE
    # the two measurements are of different parameters: the curves differ
    assert flow.measured[0]["norms"] != flow.measured[1]["norms"]

    # scalars at the default times, at the measured steps, in every logger, equal to the JSON's values
    expected = {
        f"diagnostics/grad_h/{name}/t{t}": {r["step"]: r["norms"][name][t] for r in flow.measured}
        for name in names
        for t in default_times(T)
    }
    accumulator = events(tensorboard.log_dir)
    for logged in (tb_scalars(accumulator, "diagnostics/grad_h/"), memory.scalars("diagnostics/grad_h/")):
        assert sorted(logged) == sorted(expected)
        for tag, by_step in expected.items():
            assert sorted(logged[tag]) == sorted(by_step)
            for step, value in by_step.items():
                assert logged[tag][step] == pytest.approx(value, rel=1e-6)
    assert "diagnostics/grad_h" in accumulator.Tags()["images"]
    images = accumulator.Images("diagnostics/grad_h")
    assert [e.step for e in images] == [0, 2]
    assert all((e.width, e.height) == PNG_SIZE for e in images)
    # the probes are off once the run is over
    assert all(not r.probe_hidden_grad and r.hidden_probes == [] for r in layers(trainer.lightning_module))


def test_gradient_flow_step0_equals_an_independent_dloss_dh(tmp_path: Path) -> None:
    """At step 0 (no update yet) the record is the batch mean of ||dloss/dh_t|| of the first batch, recomputed here by
    an explicit time loop over the cell with ``retain_grad`` on every h_t (no probe), and at t = T-1 it matches the
    closed form W_o^T dloss/dy of the MSE readout."""
    data = dataset(32, seed=3)
    model = make_model(seed=1)
    initial = copy.deepcopy(model)
    flow = GradientFlow(steps=(0,))
    make_trainer(tmp_path, [flow], max_steps=2, logger=False).fit(model, loader(data))
    assert [r["step"] for r in flow.measured] == [0]
    measured = torch.tensor(flow.measured[0]["norms"]["net.rnn.0"], dtype=torch.float64)

    inputs, targets = data.tensors[0][:B], data.tensors[1][:B]  # the first batch (no shuffling)
    initial.train()
    rnn, readout = initial.net.rnn, initial.net.readout
    cell = rnn.cells[0]
    h0, c0 = rnn.initial_state(B)
    h, c = h0[0], c0[0]
    terms = cell.input_term(inputs.transpose(0, 1))  # (T, B, 4H)
    hidden = []
    for t in range(T):
        h, c = cell(terms[t], (h, c), t)
        h.retain_grad()
        hidden.append(h)
    outputs = readout(h)
    loss = F.mse_loss(outputs, targets.reshape(outputs.shape))
    loss.backward()
    expected = torch.stack([state.grad.norm(dim=-1).mean() for state in hidden]).double()
    torch.testing.assert_close(measured, expected, rtol=1e-4, atol=1e-9)
    # a real curve through time: not constant, and the last step's gradient in closed form
    assert expected.max() > 1.5 * expected.min()
    d_outputs = 2.0 * (outputs - targets.reshape(outputs.shape)).detach() / outputs.numel()  # (B, 1)
    d_last = d_outputs @ readout.weight.detach()  # (B, H)
    assert measured[-1].item() == pytest.approx(d_last.norm(dim=-1).mean().item(), rel=1e-4)


def test_gradient_flow_off_between_chosen_steps_and_training_unchanged(tmp_path: Path) -> None:
    """The probe is armed only at the chosen steps (fast paths elsewhere) and adds nothing to training: the same
    seeded fit with and without the callback ends with the same parameters and running statistics."""
    data = dataset(48)
    spy = ProbeSpy()
    with_flow = make_model()
    flow = GradientFlow(steps=(0, 2))
    trainer = make_trainer(tmp_path / "with", [flow, spy], logger=False)
    trainer.fit(with_flow, loader(data))
    without = make_model()
    make_trainer(tmp_path / "without", [], logger=False).fit(without, loader(data))

    assert spy.armed == [(0, True), (1, False), (2, True), (3, False)]
    assert spy.probes == [(0, 1), (1, 0), (2, 1), (3, 0)]
    assert [r["step"] for r in flow.measured] == [0, 2]
    rnn = with_flow.net.rnn
    assert rnn.probe_hidden_grad is False and rnn.hidden_probes == []

    reference, initial = without.state_dict(), make_model().state_dict()
    for key, value in with_flow.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-5, msg=key)
    assert not torch.equal(with_flow.net.rnn.cells[0].weight_hh, initial["net.rnn.cells.0.weight_hh"])  # it trained


def test_gradient_flow_times_and_dirpath(tmp_path: Path) -> None:
    """``times`` picks the scalar steps (negative from the end, out of range dropped); ``dirpath`` the folder."""
    memory = MemoryLogger()
    flow = GradientFlow(steps=(1,), times=(-1, 3, 100, -100), dirpath=str(tmp_path / "custom"))
    trainer = make_trainer(tmp_path, [flow], loggers=[memory], max_steps=2)
    trainer.fit(make_model(), loader(dataset(32)))
    [record] = flow.measured
    curve = record["norms"]["net.rnn.0"]
    assert memory.scalars("diagnostics/grad_h/") == {
        f"diagnostics/grad_h/net.rnn.0/t{T - 1}": {1: pytest.approx(curve[T - 1])},
        "diagnostics/grad_h/net.rnn.0/t3": {1: pytest.approx(curve[3])},
    }
    assert sorted(p.name for p in (tmp_path / "custom").iterdir()) == [
        "gradient_flow_step1.json",
        "gradient_flow_step1.png",
    ]
    assert read_json(tmp_path / "custom" / "gradient_flow_step1.json") == record
    assert not (tmp_path / "diagnostics").exists()


def test_gradient_flow_every_n_steps(tmp_path: Path) -> None:
    """every_n_steps=2 measures at 0, 2, 4 (plus the explicit steps); without a logger the files go to
    ``<default_root_dir>/diagnostics``."""
    flow = GradientFlow(steps=(1,), every_n_steps=2)
    trainer = make_trainer(tmp_path, [flow], logger=False, max_steps=5)
    trainer.fit(make_model(), loader(dataset(48)))
    assert [r["step"] for r in flow.measured] == [0, 1, 2, 4]
    files = sorted(p.name for p in (tmp_path / "diagnostics").glob("*.json"))
    assert files == [f"gradient_flow_step{s}.json" for s in (0, 1, 2, 4)]


def test_gradient_flow_with_gradient_accumulation_measures_each_step_once(tmp_path: Path) -> None:
    """accumulate_grad_batches=2: global step 0 spans two micro-batches; only the first is probed."""
    spy = ProbeSpy()
    flow = GradientFlow(steps=(0, 1))
    trainer = make_trainer(tmp_path, [flow, spy], accumulate_grad_batches=2, max_steps=2)
    trainer.fit(make_model(), loader(dataset(48)))
    assert trainer.global_step == 2
    assert [r["step"] for r in flow.measured] == [0, 1]
    assert spy.probes == [(0, 1), (0, 0), (1, 1), (1, 0)]
    directory = Path(trainer.log_dir) / "diagnostics"
    assert sorted(p.name for p in directory.glob("*.json")) == ["gradient_flow_step0.json", "gradient_flow_step1.json"]


def test_gradient_flow_does_not_depend_on_gradient_accumulation(tmp_path: Path) -> None:
    data = dataset(32)
    plain, accumulated = GradientFlow(steps=(0,)), GradientFlow(steps=(0,))
    make_trainer(tmp_path / "a", [plain], logger=False, max_steps=1).fit(make_model(), loader(data))
    make_trainer(tmp_path / "b", [accumulated], logger=False, max_steps=1, accumulate_grad_batches=2).fit(
        make_model(), loader(data)
    )
    # both measure the same first batch with the same initial parameters
    expected = torch.tensor(plain.measured[0]["norms"]["net.rnn.0"])
    torch.testing.assert_close(torch.tensor(accumulated.measured[0]["norms"]["net.rnn.0"]), expected)


def test_gradient_flow_does_not_depend_on_the_loss_scale(tmp_path: Path) -> None:
    from lightning.pytorch.plugins import MixedPrecision

    data = dataset(16)
    plain, scaled = GradientFlow(steps=(0,)), GradientFlow(steps=(0,))
    make_trainer(tmp_path / "a", [plain], logger=False, max_steps=1).fit(make_model(), loader(data))
    amp = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))  # what precision="16-mixed" is on a GPU
    make_trainer(tmp_path / "b", [scaled], logger=False, max_steps=1, plugins=[amp]).fit(make_model(), loader(data))
    expected = torch.tensor(plain.measured[0]["norms"]["net.rnn.0"])
    torch.testing.assert_close(torch.tensor(scaled.measured[0]["norms"]["net.rnn.0"]), expected, rtol=0.05, atol=0)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: GradientFlow(steps=[-1]), "steps"),
        (lambda: GradientFlow(steps=[0, 3, -2]), "steps"),
        (lambda: GradientFlow(every_n_steps=0), "every_n_steps"),
        (lambda: GradientFlow(every_n_steps=-3), "every_n_steps"),
        (lambda: StatisticsStationarity(units=0), "units"),
    ],
)
def test_invalid_arguments_name_the_argument(make: Any, name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name} must be"):
        make()


def test_gradient_flow_without_bnlstm_warns_and_measures_nothing(tmp_path: Path) -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2 * T, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            inputs, targets = batch
            return F.mse_loss(self.layer(inputs.flatten(1)).squeeze(-1), targets)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    flow = GradientFlow(steps=(0, 1))
    with pytest.warns(UserWarning, match="no BNLSTM layer"):
        make_trainer(tmp_path, [flow], logger=False, max_steps=2).fit(Plain(), loader(dataset(32)))
    assert flow.measured == []
    assert not (tmp_path / "diagnostics").exists()


# --------------------------------------------------------------------------------------- StatisticsStationarity


def check_statistics_record(record: dict[str, Any], state: dict[str, Tensor], sites: list[str], units: int) -> None:
    """The record's sites, sampled channels and values against a state dict."""
    assert list(record["statistics"]) == sites
    for site, entry in record["statistics"].items():
        running_mean, running_var = state[f"{site}.running_mean"], state[f"{site}.running_var"]
        channels = running_mean.shape[1]
        chosen = entry["units"]
        assert len(chosen) == min(units, channels) and chosen == sorted(set(chosen))
        assert all(0 <= c < channels for c in chosen)
        mean = torch.tensor(entry["mean"], dtype=torch.float64)
        var = torch.tensor(entry["var"], dtype=torch.float64)
        assert mean.shape == var.shape == (T, len(chosen))
        torch.testing.assert_close(mean, running_mean[:, chosen].double(), rtol=0, atol=1e-12)
        torch.testing.assert_close(var, running_var[:, chosen].double(), rtol=0, atol=1e-12)
        settle = entry["settle_step"]
        assert isinstance(settle, int) and 0 <= settle <= T
        assert settle == analysis.settle_step(running_mean.double(), running_var.double())


def test_statistics_stationarity_in_fit_and_test(tmp_path: Path) -> None:
    """After every fit validation (not the sanity check, not ``validate``) and after test: a record of the BN
    sites' buffers as they are then, JSON + PNG, settle-step scalars and a TensorBoard figure."""
    units = 12  # more than bn_c's H = 8 channels: bn_c keeps all of them
    stationarity = StatisticsStationarity(units=units, seed=3)
    spy = BufferSpy()
    memory = MemoryLogger()
    tensorboard = TensorBoardLogger(tmp_path, name="logs")
    model = make_model(optimizer=functools.partial(torch.optim.Adam, lr=0.01))
    trainer = make_trainer(
        tmp_path,
        [stationarity, spy],
        loggers=[tensorboard, memory],
        num_sanity_val_steps=1,
        val_check_interval=2,
        limit_val_batches=1,
    )
    trainer.fit(model, loader(dataset(48)), loader(dataset(16, seed=1)))

    bn_modules = {id(m) for m in batchnorm_sites(model)}
    sites = [name for name, m in model.named_modules() if id(m) in bn_modules]
    assert sites == ["net.rnn.cells.0.bn_x", "net.rnn.cells.0.bn_h", "net.rnn.cells.0.bn_c"]
    measured = stationarity.measured
    assert [r["step"] for r in measured] == [2, 4]
    assert len(spy.states) == 2
    for record, state in zip(stationarity.measured, spy.states, strict=True):
        check_statistics_record(record, state, sites, units)
    # the last record is the final model's buffers; the first is not (training went on after it)
    check_statistics_record(stationarity.measured[-1], model.state_dict(), sites, units)
    assert stationarity.measured[0]["statistics"] != stationarity.measured[1]["statistics"]
    assert len(stationarity.measured[0]["statistics"]["net.rnn.cells.0.bn_c"]["units"]) == H
    assert len(stationarity.measured[0]["statistics"]["net.rnn.cells.0.bn_x"]["units"]) == units

    directory = Path(trainer.log_dir) / "diagnostics"
    for record in stationarity.measured:
        assert read_json(directory / f"statistics_{record['stage']}_step{record['step']}.json") == record
        assert png_size(directory / f"statistics_{record['stage']}_step{record['step']}.png") == PNG_SIZE

    expected = {
        f"diagnostics/settle_step/{site}": {r["step"]: float(r["statistics"][site]["settle_step"]) for r in measured}
        for site in sites
    }
    accumulator = events(tensorboard.log_dir)
    assert tb_scalars(accumulator, "diagnostics/settle_step/") == expected
    assert memory.scalars("diagnostics/settle_step/") == expected
    assert [e.step for e in accumulator.Images("diagnostics/statistics")] == [2, 4]

    # validate() measures nothing; test() measures once more, at the same global step
    trainer.validate(model, loader(dataset(16, seed=1)), verbose=False)
    assert len(stationarity.measured) == 2
    trainer.test(model, loader(dataset(16, seed=2)), verbose=False)
    assert [r["step"] for r in stationarity.measured] == [2, 4, 4]
    check_statistics_record(stationarity.measured[-1], spy.states[-1], sites, units)
    # (sorted: the test's events may come in a second event file, read in no fixed order)
    assert sorted(e.step for e in events(tensorboard.log_dir).Images("diagnostics/statistics")) == [2, 4, 4]


def test_statistics_stationarity_reads_population_estimates(tmp_path: Path) -> None:
    """With PopulationStatistics before validation, the record holds the estimated statistics (the buffers at the
    end of validation), the setup of configs/adding_bnlstm.yaml."""
    data = AddingProblem(seq_len=T, train_size=48, val_size=8, test_size=8, batch_size=B)
    stationarity = StatisticsStationarity(units=4)
    spy, running = BufferSpy(), BufferSpy()
    population = PopulationStatistics(before_validation=True, validation_max_batches=2)
    model = make_model()
    trainer = make_trainer(
        tmp_path,
        [running, population, stationarity, spy],
        logger=False,
        max_steps=3,
        val_check_interval=3,
        limit_val_batches=1,
    )
    trainer.fit(model, data)
    sites = [f"net.rnn.cells.0.{n}" for n in ("bn_x", "bn_h", "bn_c")]
    assert [r["step"] for r in stationarity.measured] == [3]
    check_statistics_record(stationarity.measured[0], spy.states[0], sites, 4)
    # ... which are the estimates, not the running averages the validation started with
    entry = stationarity.measured[0]["statistics"]["net.rnn.cells.0.bn_x"]
    before = running.before[0]["net.rnn.cells.0.bn_x.running_mean"][:, entry["units"]].double()
    assert not torch.allclose(torch.tensor(entry["mean"], dtype=torch.float64), before, rtol=1e-3, atol=1e-6)
    assert (tmp_path / "diagnostics" / "statistics_validation_step3.json").is_file()


def test_statistics_stationarity_keeps_the_validation_record_when_test_follows(tmp_path: Path) -> None:
    data = AddingProblem(seq_len=T, train_size=48, val_size=8, test_size=8, batch_size=B)
    stationarity = StatisticsStationarity(units=4)
    population = PopulationStatistics(before_validation=False, before_test=True, max_batches=2)
    model = make_model()
    trainer = make_trainer(
        tmp_path, [population, stationarity], logger=False, max_steps=3, val_check_interval=3, limit_val_batches=1
    )
    trainer.fit(model, data)
    trainer.test(model, data, verbose=False)
    validation, test = stationarity.measured
    if validation["step"] != test["step"] or validation["statistics"] == test["statistics"]:
        pytest.fail("precondition: two different records at the same step")  # not an AssertionError: a real failure
    saved = [read_json(path) for path in sorted((tmp_path / "diagnostics").glob("*.json"))]
    assert validation in saved
    assert test in saved


def test_statistics_stationarity_lstm_baseline_writes_nothing(tmp_path: Path) -> None:
    stationarity = StatisticsStationarity()
    memory = MemoryLogger()
    model = make_model(rnn={"normalize": False})
    trainer = make_trainer(tmp_path, [stationarity], loggers=[memory], val_check_interval=2, limit_val_batches=1)
    trainer.fit(model, loader(dataset(48)), loader(dataset(16, seed=1)))
    trainer.test(model, loader(dataset(16, seed=2)), verbose=False)
    assert [(r["step"], r["statistics"]) for r in stationarity.measured] == [(2, {}), (4, {}), (4, {})]
    assert memory.scalars("diagnostics/") == {}
    assert not (tmp_path / "diagnostics").exists()


# ------------------------------------------------------------------------------------------ without matplotlib


def test_without_matplotlib_json_and_scalars_and_one_warning_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # ``import matplotlib`` now raises ImportError
    flow = GradientFlow(steps=(0, 2))
    stationarity = StatisticsStationarity(units=4)
    memory = MemoryLogger()
    tensorboard = TensorBoardLogger(tmp_path, name="logs")
    trainer = make_trainer(
        tmp_path, [flow, stationarity], loggers=[tensorboard, memory], val_check_interval=2, limit_val_batches=1
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_model(), loader(dataset(48)), loader(dataset(16, seed=1)))
    messages = [str(w.message) for w in caught if "no figures" in str(w.message)]
    assert len(messages) == 2, messages
    assert sorted(m.split(":", 1)[0] for m in messages) == ["GradientFlow", "StatisticsStationarity"]
    assert all("matplotlib" in m and "bnlstm-lit[plots]" in m for m in messages)

    directory = Path(trainer.log_dir) / "diagnostics"
    assert sorted(p.name for p in directory.iterdir()) == [
        "gradient_flow_step0.json",
        "gradient_flow_step2.json",
        "statistics_validation_step2.json",
        "statistics_validation_step4.json",
    ]
    assert [r["step"] for r in flow.measured] == [0, 2]
    assert sorted({s for by_step in memory.scalars("diagnostics/grad_h/").values() for s in by_step}) == [0, 2]
    assert sorted({s for by_step in memory.scalars("diagnostics/settle_step/").values() for s in by_step}) == [2, 4]
    assert events(tensorboard.log_dir).Tags()["images"] == []


# -------------------------------------------------------------------------------------------------------- CLI


def test_callbacks_from_the_command_line(in_tmp_path: Path) -> None:
    """Both callbacks plug into a shipped config (with its PopulationStatistics and ModelCheckpoint) from the CLI."""
    threads, argv = torch.get_num_threads(), sys.argv
    sys.argv = ["bnlstm-lit"]
    try:
        cli = main(
            [
                "fit",
                f"--config={ROOT / 'configs' / 'adding_bnlstm.yaml'}",
                f"--config={ROOT / 'configs' / 'debug.yaml'}",
                f"--trainer.default_root_dir={in_tmp_path / 'runs'}",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--trainer.limit_train_batches=3",
                "--data.init_args.seq_len=20",
                '--trainer.callbacks+={"class_path": "bnlstm_lit.callbacks.GradientFlow", '
                '"init_args": {"steps": [0, 2]}}',
                '--trainer.callbacks+={"class_path": "bnlstm_lit.callbacks.StatisticsStationarity", '
                '"init_args": {"units": 4}}',
            ]
        )
    finally:
        torch.set_num_threads(threads)
        sys.argv = argv
    flows = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientFlow)]
    assert len(flows) == 1 and flows[0].steps == {0, 2}
    assert any(isinstance(cb, PopulationStatistics) for cb in cli.trainer.callbacks)  # the config's are kept
    directory = Path(cli.trainer.log_dir) / "diagnostics"
    assert sorted(p.name for p in directory.glob("*.json")) == [
        "gradient_flow_step0.json",
        "gradient_flow_step2.json",
        "statistics_validation_step3.json",
    ]
    record = read_json(directory / "gradient_flow_step2.json")
    assert len(record["norms"]["net.rnn.0"]) == 20
