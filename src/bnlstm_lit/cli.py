"""The command line, ``bnlstm-lit`` (also ``python -m bnlstm_lit``).

* ``bnlstm-lit {fit,validate,test,predict} --config NAME_OR_FILE ...`` -- LightningCLI
  (:class:`~bnlstm_lit.lightning_cli.BNLSTMCLI`); a ``--config`` that is not a file but names a packaged config
  (``ptb_bnlstm``, ``overlays/ptb_short_cpu``) is that config (:mod:`bnlstm_lit.packaged_configs`);
* ``bnlstm-lit report ...`` -- figures and the reproduction report (:mod:`bnlstm_lit.report.cli`);
* ``bnlstm-lit configs [copy NAME [DEST]]`` -- list the packaged configs, or copy one out to edit;
* ``bnlstm-lit --help``, ``bnlstm-lit --version``.

Lightning and torch take seconds to import, so this module imports neither: ``--help``, ``--version`` and
``configs`` answer at once, and each subcommand loads only what it needs. ``BNLSTMCLI`` and ``check_monitors`` are
still importable from here (loaded on first access).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnlstm_lit.lightning_cli import BNLSTMCLI, LINKED_SIZES, check_monitors

__all__ = ["LINKED_SIZES", "BNLSTMCLI", "check_monitors", "main", "top_level_parser"]

PROG = "bnlstm-lit"
#: the exit status of a run stopped by SIGTERM (preemption): 128 + 15, that of a process the signal ended
SIGTERM_EXIT_STATUS = 128 + 15
DESCRIPTION = (
    "Batch-normalized LSTMs (Recurrent Batch Normalization, Cooijmans et al., ICLR 2017) with PyTorch Lightning: "
    "train, evaluate and report."
)
#: the subcommands and their one-line help, in the order ``--help`` lists them; the first four are LightningCLI's
SUBCOMMANDS = {
    "fit": "train a task (--config FILE or a packaged config's NAME; fit --help lists every option)",
    "validate": "one evaluation epoch over the validation set (a checkpoint alone is enough: --ckpt_path FILE)",
    "test": "one evaluation epoch over the test set (a checkpoint alone is enough: --ckpt_path FILE)",
    "predict": "run inference: predictions, or sampled text for the language models (--ckpt_path FILE)",
    "report": "figures and the reproduction report from finished runs; no training",
    "configs": "list the packaged experiment configs, or copy one out to edit (configs copy NAME [DEST])",
}
#: attributes of this module that live in :mod:`bnlstm_lit.lightning_cli` (imported on first access)
_LIGHTNING_NAMES = frozenset({"LINKED_SIZES", "BNLSTMCLI", "check_monitors"})


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_NAMES:
        from bnlstm_lit import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def top_level_parser() -> argparse.ArgumentParser:
    """The parser of ``bnlstm-lit`` itself, for ``--help`` and ``--version``: each subcommand parses its own
    arguments (``bnlstm-lit SUBCOMMAND --help``)."""
    from bnlstm_lit import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=f"{PROG} SUBCOMMAND --help shows the options of a subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subcommands = parser.add_subparsers(title="subcommands", dest="subcommand")
    for name, help_text in SUBCOMMANDS.items():
        subcommands.add_parser(name, help=help_text, add_help=False)
    return parser


def _exit(code: int, args: Sequence[str] | None) -> None:
    """Leave with ``code``: always from the console script, only for a failure when called with ``args`` (tests)."""
    if args is None or code:
        raise SystemExit(code)


def main(args: Sequence[str] | None = None) -> BNLSTMCLI | None:
    """Entry point of ``bnlstm-lit`` and ``python -m bnlstm_lit``; ``args`` replaces ``sys.argv[1:]`` (tests).

    ``report ...`` goes to :mod:`bnlstm_lit.report.cli`, ``configs ...`` to :mod:`bnlstm_lit.packaged_configs`,
    every other subcommand to LightningCLI. Returns the CLI object when ``args`` is given, else None (exit status 0).
    """
    argv = sys.argv[1:] if args is None else list(args)
    command = argv[0] if argv else None
    if command is None or command in ("-h", "--help", "--version"):
        parser = top_level_parser()
        if command is None:
            parser.print_help(sys.stderr)
            parser.exit(2, f"{PROG}: error: a subcommand is required\n")
        parser.parse_args(argv[:1])  # prints the help or the version, and exits
    if command == "report":
        from bnlstm_lit.report.cli import main as report_main

        _exit(report_main(argv[1:]), args)
        return None
    if command == "configs":
        from bnlstm_lit.packaged_configs import main as configs_main

        _exit(configs_main(argv[1:]), args)
        return None

    from bnlstm_lit.packaged_configs import UnknownConfigError, resolve_config_args

    try:
        resolved = resolve_config_args(argv)
    except UnknownConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if args is None and resolved != argv:
        # with args=None, LightningCLI and the checkpoint defaults read sys.argv (args= next to a command line draws
        # a warning), and so do the launchers that start one process per device: all of them see the resolved files
        sys.argv[1:] = resolved
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from bnlstm_lit.lightning_cli import BNLSTMCLI

    try:
        cli = BNLSTMCLI(args=None if args is None else resolved)
    except SIGTERMException as stop:
        # Lightning ends a SIGTERMed run (after ModelCheckpoint(save_on_exception=True) saved it) with a SystemExit
        # without a code, status 0 as if it had finished: a preempted run has not, so a scheduler must not count it
        # done and `fit && test` must not go on. It leaves with the status of a process SIGTERM ended.
        raise SystemExit(SIGTERM_EXIT_STATUS) from stop
    # the console script does sys.exit(main()): an object there would print itself and exit with status 1
    return cli if args is not None else None


if __name__ == "__main__":
    main()
