"""The command line's conventions: our tasks and DataModules by short class name, a top-level help that says what this
is and lists every subcommand, ``--version``, the packaged configs by name (and ``bnlstm-lit configs``), and a
start-up that imports neither torch nor Lightning for what does not train."""

from __future__ import annotations

import fnmatch
import inspect
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

import bnlstm_lit
import bnlstm_lit.data
import bnlstm_lit.nn
import bnlstm_lit.tasks
from bnlstm_lit import lightning_cli
from bnlstm_lit.cli import SUBCOMMANDS, main
from bnlstm_lit.data import AddingProblem
from bnlstm_lit.packaged_configs import (
    UnknownConfigError,
    config_dir,
    describe,
    find_config,
    packaged_configs,
    resolve_config,
    resolve_config_args,
)
from bnlstm_lit.tasks import SequenceRegression

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
YAMLS = sorted(path for path in CONFIGS.rglob("*") if path.suffix in (".yaml", ".yml"))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def exits(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str, str]:
    """``main(args)`` that is expected to exit: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        main(args)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def python(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def concrete_subclasses(module: object, base: type) -> list[str]:
    """The dotted names of the non-abstract subclasses of ``base`` a package exports."""
    exported = (getattr(module, name) for name in module.__all__)  # type: ignore[attr-defined]
    return [f"{module.__name__}.{cls.__name__}" for cls in exported  # type: ignore[attr-defined]
            if inspect.isclass(cls) and issubclass(cls, base) and not inspect.isabstract(cls)]  # fmt: skip


# ------------------------------------------------------------------------------------------ top level: help, version


def test_top_level_help_says_what_this_is_and_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = exits(["--help"], capsys)
    assert code == 0
    assert "Batch-normalized LSTM" in out and "Cooijmans et al." in out and "2017" in out
    assert "Lightning Trainer command line tool" not in out
    assert set(LightningCLI.subcommands()) <= set(SUBCOMMANDS), "a LightningCLI subcommand is missing from the help"
    for subcommand in (*LightningCLI.subcommands(), "report", "configs"):
        assert f"    {subcommand} " in out, f"{subcommand} is not listed"
    assert "--version" in out


def test_no_subcommand_prints_the_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = exits([], capsys)
    assert code == 2
    assert "report" in err and "configs" in err and "a subcommand is required" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = exits(["--version"], capsys)
    assert code == 0
    assert out == f"bnlstm-lit {bnlstm_lit.__version__}\n"
    assert bnlstm_lit.__version__ == metadata.version("bnlstm-lit")  # the installed distribution's
    assert bnlstm_lit.__version__.count(".") == 2 and all(part.isdigit() for part in bnlstm_lit.__version__.split("."))
    # a source tree that is not installed still has a version, one that is no release
    assert bnlstm_lit.installed_version("no-such-distribution-bnlstm") == bnlstm_lit.UNKNOWN_VERSION == "0+unknown"


def test_python_m_version_and_help() -> None:
    version = python("-m", "bnlstm_lit", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"bnlstm-lit {bnlstm_lit.__version__}"
    assert "report" in python("-m", "bnlstm_lit", "--help").stdout


def test_help_version_and_configs_import_neither_torch_nor_lightning() -> None:
    """Start-up: what does not train answers without the seconds torch and Lightning take to import."""
    code = (
        "import sys\n"
        "from bnlstm_lit.cli import main\n"
        "for args in (['--help'], ['--version'], ['configs'], ['configs', 'list']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as done:\n"
        "        assert done.code in (0, None), (args, done.code)\n"
        "print('IMPORTED', sorted({'torch', 'lightning', 'jsonargparse'} & set(sys.modules)), file=sys.stderr)\n"
    )
    done = python("-c", code)
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stderr, done.stderr[-2000:]


def test_the_package_exports_load_on_first_access() -> None:
    assert bnlstm_lit.BNLSTM is bnlstm_lit.nn.BNLSTM
    assert bnlstm_lit.estimate_population_statistics is bnlstm_lit.nn.estimate_population_statistics
    assert set(bnlstm_lit.__all__) <= set(dir(bnlstm_lit))
    from bnlstm_lit.cli import BNLSTMCLI, check_monitors

    assert BNLSTMCLI is lightning_cli.BNLSTMCLI and check_monitors is lightning_cli.check_monitors
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = bnlstm_lit.no_such_name  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------- short names


def test_fit_with_short_class_names(in_tmp_path: Path) -> None:
    cli = main(
        [
            "fit",
            "--model=SequenceRegression",
            "--data=AddingProblem",
            "--data.seq_len=5",
            "--data.train_size=32",
            "--data.batch_size=8",
            "--model.rnn.hidden_size=8",
            "--trainer.fast_dev_run=1",
            f"--trainer.default_root_dir={in_tmp_path / 'runs'}",
            *QUIET,
        ]
    )
    assert cli is not None
    assert type(cli.model) is SequenceRegression and type(cli.datamodule) is AddingProblem
    assert cli.trainer.global_step == 1 and cli.model.hparams["max_steps"] == 5


def test_short_class_names_in_a_printed_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = exits(["fit", "--model", "CharLanguageModel", "--data", "PTBChar", "--print_config"], capsys)
    assert code in (0, None), err
    printed = yaml.safe_load(out)
    assert printed["model"]["class_path"] == "bnlstm_lit.tasks.CharLanguageModel"
    assert printed["data"]["class_path"] == "bnlstm_lit.data.PTBChar"


def test_model_help_by_short_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = exits(["fit", "--model.help", "CharLanguageModel"], capsys)
    assert code == 0, err
    assert "--model.rnn.hidden_size" in out and "--model.optimizer" in out


def test_fit_help_lists_our_tasks_datamodules_and_callbacks(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = exits(["fit", "--help"], capsys)
    assert code == 0
    ours = [
        *concrete_subclasses(bnlstm_lit.tasks, L.LightningModule),
        *concrete_subclasses(bnlstm_lit.data, L.LightningDataModule),
        "bnlstm_lit.callbacks.PopulationStatistics",
    ]
    assert "bnlstm_lit.tasks.CharLanguageModel" in ours and "bnlstm_lit.data.PTBChar" in ours
    missing = [name for name in ours if name not in out]
    assert not missing, f"fit --help does not list {missing}"


# ------------------------------------------------------------------------------------------ packaged configs by name


def test_every_yaml_is_a_packaged_config_with_a_description() -> None:
    assert config_dir() == CONFIGS  # this checkout's (editable install, PYTHONPATH=src)
    configs = packaged_configs()
    assert sorted(configs.values()) == YAMLS
    assert {"ptb_bnlstm", "debug", "overlays/ptb_short_cpu", "trainer/ddp"} <= set(configs)
    assert all(describe(path) for path in YAMLS), "every config starts with a comment that says what it is"


def test_no_config_names_another_file_by_a_relative_path() -> None:
    """A packaged config is read from wherever the package is installed: a path in it relative to the config would
    break. (Paths relative to the working folder, such as data_dir and default_root_dir, are fine.)"""
    for path in YAMLS:
        text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        assert ".yaml" not in text and ".yml" not in text, f"{path.name} refers to another config"


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("ptb_bnlstm", "ptb_bnlstm.yaml"),
        ("ptb_bnlstm.yaml", "ptb_bnlstm.yaml"),
        ("configs/ptb_bnlstm.yaml", "ptb_bnlstm.yaml"),  # as a clone's README writes it
        ("overlays/ptb_short_cpu", "overlays/ptb_short_cpu.yaml"),
        ("trainer/ddp.yaml", "trainer/ddp.yaml"),
    ],
)
def test_a_config_name_resolves_to_the_packaged_file(value: str, name: str, in_tmp_path: Path) -> None:
    assert resolve_config(value) == str(CONFIGS / name)


def test_a_local_path_always_wins(in_tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (in_tmp_path / "ptb_bnlstm.yaml").write_text("trainer: {max_epochs: 1}\n")
    assert resolve_config("ptb_bnlstm.yaml") == "ptb_bnlstm.yaml"
    assert resolve_config("ptb_bnlstm") == str(CONFIGS / "ptb_bnlstm.yaml")  # no such local file: the packaged one
    monkeypatch.chdir(ROOT)
    assert resolve_config("configs/ptb_bnlstm.yaml") == "configs/ptb_bnlstm.yaml"


@pytest.mark.parametrize("value", ["{trainer: {max_epochs: 1}}", "trainer:\n  max_epochs: 1", "s3://bucket/x.yaml"])
def test_values_that_are_no_names_pass_through(value: str, in_tmp_path: Path) -> None:
    assert resolve_config(value) == value


def test_every_config_flag_is_resolved(in_tmp_path: Path) -> None:
    argv = ["fit", "--config", "ptb_bnlstm", "--config=overlays/ptb_short_cpu", "-c", "debug", "--data", "PTBChar"]
    assert resolve_config_args(argv) == [
        "fit",
        "--config",
        str(CONFIGS / "ptb_bnlstm.yaml"),
        f"--config={CONFIGS / 'overlays/ptb_short_cpu.yaml'}",
        "-c",
        str(CONFIGS / "debug.yaml"),
        "--data",
        "PTBChar",
    ]


def test_an_unknown_config_name_lists_the_known_ones(in_tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnknownConfigError, match="no packaged config named 'ptb_bnlsmt'"):
        find_config("ptb_bnlsmt")
    code, _, err = exits(["fit", "--config", "ptb_bnlsmt"], capsys)
    assert code == 2
    assert "'ptb_bnlsmt': no such file" in err
    assert "ptb_bnlstm" in err and "overlays/ptb_short_cpu" in err and "bnlstm-lit configs" in err


def test_fit_with_packaged_configs_by_name(in_tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = exits(["fit", "--config", "adding_bnlstm", "--config=debug", "--print_config"], capsys)
    assert code in (0, None), err
    printed = yaml.safe_load(out)
    assert printed["model"]["class_path"] == "bnlstm_lit.tasks.SequenceRegression"
    assert printed["model"]["init_args"]["rnn"]["hidden_size"] == 16  # debug's, over adding_bnlstm's 64


# ------------------------------------------------------------------------------------------- bnlstm-lit configs


def test_configs_lists_every_config_with_its_first_comment_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) is None
    out = capsys.readouterr().out
    assert str(CONFIGS) in out
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert listed == {name: describe(path) for name, path in packaged_configs().items()}
    assert main(["configs", "list"]) is None
    assert capsys.readouterr().out == out


def test_configs_copy_writes_a_copy_and_never_overwrites(in_tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = CONFIGS / "overlays" / "ptb_short_cpu.yaml"
    assert main(["configs", "copy", "overlays/ptb_short_cpu"]) is None  # default DEST: the current folder
    copied = in_tmp_path / "ptb_short_cpu.yaml"
    assert copied.read_text() == source.read_text()
    assert str(copied) in capsys.readouterr().out

    copied.write_text("# edited\n")
    code, _, err = exits(["configs", "copy", "overlays/ptb_short_cpu", str(in_tmp_path)], capsys)  # DEST: a folder
    assert code == 1
    assert str(copied) in err and "not overwritten" in err
    assert copied.read_text() == "# edited\n"

    assert main(["configs", "copy", "ptb_bnlstm.yaml", "edited/mine.yaml"]) is None  # DEST: a file
    assert (in_tmp_path / "edited" / "mine.yaml").read_text() == (CONFIGS / "ptb_bnlstm.yaml").read_text()
    code, _, err = exits(["configs", "copy", "ptb_bnlsmt"], capsys)
    assert code == 2 and "no packaged config named 'ptb_bnlsmt'" in err


# ------------------------------------------------------------------------------------------------- the wheel


def packaging() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_wheel_configuration_ships_every_package_and_every_config() -> None:
    """pyproject.toml maps the package bnlstm_lit.configs to configs/ and lists the packages by hand: every package
    under src/ and every config folder must be in the list, and every YAML matched by the package data."""
    setuptools = packaging()
    assert setuptools["package-dir"] == {"": "src", "bnlstm_lit.configs": "configs"}
    src = ROOT / "src"
    code_packages = {init.parent.relative_to(src).as_posix().replace("/", ".") for init in src.rglob("__init__.py")}
    config_packages = {".".join(("bnlstm_lit.configs", *path.parent.relative_to(CONFIGS).parts)) for path in YAMLS}
    assert set(setuptools["packages"]) == code_packages | config_packages
    package_data = setuptools["package-data"]
    for path in YAMLS:
        package = ".".join(("bnlstm_lit.configs", *path.parent.relative_to(CONFIGS).parts))
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in package_data.get(package, [])), path


@pytest.mark.slow
def test_the_built_wheel_holds_every_config(tmp_path: Path) -> None:
    """Builds the wheel from a copy of the project (the build writes build/ and *.egg-info next to the sources)."""
    import shutil

    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    for name in ("src", "configs"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(project)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("bnlstm_lit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"bnlstm_lit/configs/{path.relative_to(CONFIGS).as_posix()}" for path in YAMLS}
    assert expected <= names
    assert "bnlstm_lit/packaged_configs.py" in names and "bnlstm_lit/nn/bnlstm_kernel.c" in names
