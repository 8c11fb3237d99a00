"""The shipped configs stacked as users stack them (``--config EXPERIMENT --config OVERLAY``, ``debug.yaml``, the
trainer presets): every layer's own values are in effect and the experiment's callbacks survive.

A list in a later ``--config`` replaces the earlier list (jsonargparse), so an overlay that sets
``trainer.callbacks`` must list the experiment's callbacks again. Parse only, in this process: one parser, no
instantiation, no fit (``test_cli.py`` runs the same combinations through ``--print_config`` subprocesses).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bnlstm_lit.cli import BNLSTMCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEBUG = CONFIGS / "debug.yaml"
EXPERIMENTS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "debug.yaml")
PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
#: overlay -> the experiment configs it is written for (its header comment names them)
OVERLAYS: dict[str, list[str]] = {
    "cnn_synthetic_cpu.yaml": [name for name in EXPERIMENTS if name.startswith("cnn_")],
    "mnist_short_cpu.yaml": [name for name in EXPERIMENTS if re.match(r"[ps]mnist_", name)],
    "ptb_short_cpu.yaml": [name for name in EXPERIMENTS if name.startswith("ptb_")],
}
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
POPULATION = "bnlstm_lit.callbacks.PopulationStatistics"
GUARD = "bnlstm_lit.callbacks.NonFiniteGuard"  # in every shipped config (README)


class _ParseOnly(BNLSTMCLI):
    """BNLSTMCLI that builds its parser and parses, and stops there (no seeding, no objects, no subcommand)."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


@pytest.fixture(scope="module")
def parse() -> Any:
    """``parse(*configs)``: the ``fit`` config of ``--config`` for each file in order, as a plain dict."""
    parser = _ParseOnly(args=["fit", f"--config={CONFIGS / 'adding_lstm.yaml'}"]).parser

    def run(*configs: Path) -> dict[str, Any]:
        args = ["fit"] + [f"--config={config}" for config in configs]
        return parser.parse_args(args).fit.as_dict()

    return run


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every value in a YAML mapping that is not a mapping itself; callback lists apart."""
    for key, value in tree.items():
        if key == "callbacks":
            continue
        if isinstance(value, dict):
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def lookup(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        assert isinstance(config, dict) and key in config, f"{'.'.join(path)} missing from the parsed config"
        config = config[key]
    return config


def callbacks(config: dict[str, Any]) -> list[dict[str, Any]]:
    value = config["trainer"].get("callbacks") or []
    return value if isinstance(value, list) else [value]


def check_callbacks(parsed: dict[str, Any], layers: list[Path]) -> None:
    """The experiment's callbacks are all there with the arguments its YAML gives, except where a later layer's
    callback of the same class sets them; one ModelCheckpoint with a monitor, at most one PopulationStatistics."""
    found = callbacks(parsed)
    by_class: dict[str, list[dict[str, Any]]] = {}
    for callback in found:
        by_class.setdefault(callback["class_path"], []).append(callback.get("init_args") or {})
    checkpoints = by_class.get(CHECKPOINT, [])
    assert len(checkpoints) == 1 and checkpoints[0].get("monitor"), f"ModelCheckpoint: {checkpoints}"
    assert len(by_class.get(POPULATION, [])) <= 1, f"PopulationStatistics twice: {by_class[POPULATION]}"
    experiment = load(layers[0])["trainer"]["callbacks"]
    later = {c["class_path"]: c.get("init_args") or {} for layer in layers[1:]
             for c in (load(layer).get("trainer") or {}).get("callbacks") or []}  # fmt: skip
    for callback in experiment:
        name = callback["class_path"]
        assert name in by_class, f"{layers[0].name}'s {name} dropped by {[p.name for p in layers[1:]]}"
        (got,) = by_class[name]
        for key, value in (callback.get("init_args") or {}).items():
            assert got[key] == later.get(name, {}).get(key, value), f"{name}.{key}: {got[key]!r}"
    assert GUARD in by_class, f"{GUARD} missing"


def check_values(parsed: dict[str, Any], layers: list[Path]) -> None:
    """Every value of every layer is in effect unless a later layer sets the same key."""
    winner: dict[tuple[str, ...], Any] = {}
    for layer in layers:
        winner.update(leaves(load(layer)))
    for path, value in winner.items():
        assert lookup(parsed, path) == value, f"{'.'.join(path)}: {lookup(parsed, path)!r} != {value!r}"


def test_every_overlay_names_its_configs() -> None:
    """The table above matches the overlays on disk and the experiment configs their headers name."""
    assert sorted(OVERLAYS) == sorted(p.name for p in (CONFIGS / "overlays").glob("*.yaml"))
    for overlay, experiments in OVERLAYS.items():
        header = (CONFIGS / "overlays" / overlay).read_text()
        named = set(re.findall(r"configs/([\w$]+)\.yaml", header)) - {"debug"}
        loop = re.search(r"for v in ([\w ]+); do", header)  # the readers: configs/cnn_$v.yaml for each variant
        if loop:
            named = {name.replace("$v", v) for name in named for v in loop.group(1).split()}
        assert named and {f"{name}.yaml" for name in named} <= set(experiments), (overlay, named)


def test_debug_and_presets_leave_callbacks_alone() -> None:
    for layer in [DEBUG, *PRESETS]:
        assert "callbacks" not in (load(layer).get("trainer") or {}), layer.name


@pytest.mark.parametrize(
    ("experiment", "overlay"), [(e, o) for o, experiments in OVERLAYS.items() for e in experiments]
)
def test_overlay_on_experiment(parse: Any, experiment: str, overlay: str) -> None:
    layers = [CONFIGS / experiment, CONFIGS / "overlays" / overlay]
    parsed = parse(*layers)
    check_values(parsed, layers)
    check_callbacks(parsed, layers)


@pytest.mark.parametrize("index", range(len(EXPERIMENTS)), ids=EXPERIMENTS)
def test_experiment_with_debug_and_a_trainer_preset(parse: Any, index: int) -> None:
    """Each experiment with debug.yaml and one trainer preset (round robin, so each preset meets several tasks)."""
    layers = [CONFIGS / EXPERIMENTS[index], DEBUG, PRESETS[index % len(PRESETS)]]
    parsed = parse(*layers)
    check_values(parsed, layers)
    check_callbacks(parsed, layers)


def test_the_short_runs_estimate_from_20_batches(parse: Any) -> None:
    """The overlays' population statistics before validation: 20 batches, where the experiments say 100."""
    (population,) = [
        c for c in load(CONFIGS / "ptb_bnlstm.yaml")["trainer"]["callbacks"] if c["class_path"] == POPULATION
    ]
    assert population["init_args"]["validation_max_batches"] == 100
    parsed = parse(CONFIGS / "ptb_bnlstm.yaml", CONFIGS / "overlays" / "ptb_short_cpu.yaml")
    (population,) = [c for c in callbacks(parsed) if c["class_path"] == POPULATION]
    assert population["init_args"]["validation_max_batches"] == 20
