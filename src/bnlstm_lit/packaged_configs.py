"""The experiment configs that ship with the package, usable by name: ``bnlstm-lit fit --config ptb_bnlstm``.

The YAMLs live in the repository's ``configs/`` folder; the wheel carries them as ``bnlstm_lit/configs``
(``package-dir`` in pyproject.toml), so an installed package finds them next to this module and a source checkout or
editable install finds them in ``configs/`` beside ``src/``. A config is named by its path below that folder without
the suffix: ``ptb_bnlstm``, ``overlays/ptb_short_cpu``, ``trainer/ddp``.

A ``--config`` value that exists on disk is always used as it is. One that does not, and looks like a name (``NAME``,
``NAME.yaml``, or a clone's ``configs/NAME.yaml`` as the README writes it), is replaced by the packaged file of that
name; an unknown name is an error that lists the known ones.

``bnlstm-lit configs`` lists them with the first line of each one's header comment; ``bnlstm-lit configs copy NAME
[DEST]`` writes a copy to edit, never over an existing file. This module imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "UnknownConfigError",
    "config_dir",
    "copy_config",
    "describe",
    "find_config",
    "main",
    "packaged_configs",
    "resolve_config",
    "resolve_config_args",
]

SUFFIXES = (".yaml", ".yml")
#: what a config name may look like; anything else (inline YAML or JSON, a URL) is left to LightningCLI
NAME_PATTERN = re.compile(r"[\w.\-]+(/[\w.\-]+)*")
#: the flags of LightningCLI that take a config file
CONFIG_FLAGS = ("--config", "-c")


class UnknownConfigError(LookupError):
    """A config name that is neither a file nor a packaged config; the message lists the packaged ones."""


def config_dir() -> Path:
    """The folder of the packaged configs: ``bnlstm_lit/configs`` in an installed wheel, else the source checkout's
    ``configs/`` (editable install, ``PYTHONPATH=src``)."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    if installed.is_dir() or package.parent.name != "src":
        return installed
    return package.parent.parent / "configs"


def packaged_configs() -> dict[str, Path]:
    """Every packaged config by name (its path below :func:`config_dir`, POSIX separators, no suffix), sorted with
    the top-level experiments first, then each subfolder's."""
    root = config_dir()
    if not root.is_dir():
        return {}
    files = [path for path in root.rglob("*") if path.suffix in SUFFIXES and path.is_file()]
    names = {path.relative_to(root).with_suffix("").as_posix(): path for path in files}
    return dict(sorted(names.items(), key=lambda item: (item[0].count("/"), item[0])))


def _name_of(value: str) -> str:
    """``configs/overlays/x.yaml`` -> ``overlays/x``: the packaged name a ``--config`` value stands for."""
    name = value.removeprefix("./").removeprefix("configs/")
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def find_config(value: str) -> Path:
    """The packaged config that ``value`` names (``ptb_bnlstm``, ``ptb_bnlstm.yaml``, ``configs/ptb_bnlstm.yaml``,
    ``overlays/ptb_short_cpu``); :class:`UnknownConfigError` listing the packaged names when there is none."""
    configs = packaged_configs()
    found = configs.get(_name_of(value))
    if found is None:
        known = ", ".join(configs) if configs else f"none (no configs found in {config_dir()})"
        raise UnknownConfigError(
            f"there is no packaged config named {_name_of(value)!r}. Packaged configs: {known} "
            "(`bnlstm-lit configs` lists them with their descriptions)"
        )
    return found


def resolve_config(value: str) -> str:
    """A ``--config`` value as LightningCLI should get it: the value itself when it exists on disk or is not a name
    (inline YAML, a URL), else the path of the packaged config it names (:func:`find_config`)."""
    if not NAME_PATTERN.fullmatch(value) or Path(value).exists():
        return value
    try:
        return str(find_config(value))
    except UnknownConfigError as error:
        raise UnknownConfigError(f"--config {value!r}: no such file, and {error}") from None


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every ``--config``/``-c`` (``--config X`` or ``--config=X``) passed through
    :func:`resolve_config`."""
    resolved: list[str] = []
    take_value = False
    for arg in argv:
        if take_value:
            resolved.append(resolve_config(arg))
            take_value = False
            continue
        flag, eq, value = arg.partition("=")
        if flag in CONFIG_FLAGS and eq:
            resolved.append(f"{flag}={resolve_config(value)}")
        else:
            resolved.append(arg)
            take_value = arg in CONFIG_FLAGS
    return resolved


def describe(path: Path) -> str:
    """The first line of a config's header comment, without the ``#``; empty when it has none."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return ""


def copy_config(name: str, dest: Path | None = None) -> Path:
    """Write the packaged config ``name`` to ``dest`` (a file, or a folder to hold ``<name>.yaml``; default: the
    current folder) and return the file written. :class:`FileExistsError` when that file exists: it is never
    overwritten."""
    source = find_config(name)
    target = Path.cwd() if dest is None else dest
    if target.is_dir():
        target = target / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("x", encoding="utf-8") as out:  # "x": fails when the file exists
        out.write(source.read_text(encoding="utf-8"))
    return target


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlstm-lit configs",
        description="The experiment configs that ship with bnlstm-lit: use one by name (bnlstm-lit fit --config NAME), "
        "or copy it out to edit.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{list,copy}")
    commands.add_parser("list", help="list the packaged configs with their descriptions (the default)")
    copy = commands.add_parser("copy", help="write a copy of a packaged config to edit; never overwrites a file")
    copy.add_argument("name", metavar="NAME", help="a packaged config, e.g. ptb_bnlstm or overlays/ptb_short_cpu")
    copy.add_argument(
        "dest", metavar="DEST", nargs="?", type=Path, help="the file to write, or a folder (default: ./NAME.yaml)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``bnlstm-lit configs [list]`` and ``bnlstm-lit configs copy NAME [DEST]``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "copy":
        try:
            written = copy_config(args.name, args.dest)
        except UnknownConfigError as error:
            print(f"bnlstm-lit configs copy: error: {error}", file=sys.stderr)
            return 2
        except FileExistsError as error:
            print(f"bnlstm-lit configs copy: error: {error.filename} exists; not overwritten", file=sys.stderr)
            return 1
        print(f"wrote {written} (packaged config {_name_of(args.name)}); use it: bnlstm-lit fit --config {written}")
        return 0
    configs = packaged_configs()
    if not configs:
        print(f"bnlstm-lit configs: error: no configs found in {config_dir()}", file=sys.stderr)
        return 1
    width = max(map(len, configs))
    print(f"Packaged configs, in {config_dir()}")
    print("(use one: bnlstm-lit fit --config NAME; edit a copy: bnlstm-lit configs copy NAME [DEST])")
    for name, path in configs.items():
        print(f"  {name:<{width}}  {describe(path)}")
    return 0
