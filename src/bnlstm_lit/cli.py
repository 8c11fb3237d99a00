"""The command line: ``bnlstm-lit {fit,validate,test,predict} --config configs/....yaml`` (LightningCLI), and
``bnlstm-lit report ...`` (figures and the reproduction report, :mod:`bnlstm_lit.report.cli`).

The task (``model:``) and the data (``data:``) are chosen by ``class_path`` -- ours or any importable subclass of
LightningModule / LightningDataModule -- so a new task or corpus needs no edit of this package. The sizes only the
data knows (``input_size``, ``output_size``, ``max_steps``) are linked into the task's arguments when the DataModule
is instantiated; a YAML never repeats them.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from bnlstm_lit.checkpoint import CheckpointCLIMixin

#: DataModule properties linked into the task's ``init_args`` of the same name.
LINKED_SIZES = ("input_size", "output_size", "max_steps")


class BNLSTMCLI(CheckpointCLIMixin, LightningCLI):
    """LightningCLI with subclass mode for model and data, and the data-derived sizes linked into the model.

    Checkpoints are written atomically and read weights-only (:class:`~bnlstm_lit.checkpoint.AtomicCheckpointIO`),
    and ``validate``/``test``/``predict --ckpt_path FILE`` need no config: the task and data classes come from the
    checkpoint (:class:`~bnlstm_lit.checkpoint.CheckpointCLIMixin`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)  # the optimizer is the task's (model.init_args.optimizer)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED_SIZES:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def before_fit(self) -> None:
        """Checks that need the instantiated objects, before any download (prepare_data) or training step."""
        check_monitors(self.model, self.trainer)


def check_monitors(model: L.LightningModule, trainer: L.Trainer) -> None:
    """Every ``monitor`` (callbacks such as ModelCheckpoint / EarlyStopping, and the task's own for an LR scheduler)
    must name a metric the task logs; otherwise a typo surfaces only after the first epoch, or never."""
    known_metrics = getattr(model, "monitorable_metrics", None)
    known = known_metrics() if callable(known_metrics) else None
    if not known:
        return
    wanted = [(f"trainer.callbacks[{i}] ({type(cb).__name__}).monitor", getattr(cb, "monitor", None))
              for i, cb in enumerate(getattr(trainer, "callbacks", []))]  # fmt: skip
    if getattr(model, "lr_scheduler", None) is not None:
        wanted.append(("model.init_args.monitor", getattr(model, "monitor", None)))
    for flag, name in wanted:
        if isinstance(name, str) and name not in known:
            raise ValueError(
                f"{flag} is {name!r}, which {type(model).__name__} does not log; it logs: {', '.join(sorted(known))}"
            )


def main(args: list[str] | None = None) -> BNLSTMCLI | None:
    """Entry point of ``bnlstm-lit`` and ``python -m bnlstm_lit``; ``args`` replaces ``sys.argv[1:]`` (tests).

    ``report ...`` goes to :mod:`bnlstm_lit.report.cli` (figures and the reproduction report, no training), every
    other subcommand to LightningCLI. Returns the CLI object when ``args`` is given, else None (exit status 0).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:
        from bnlstm_lit.report.cli import main as report_main

        code = report_main(argv[1:])
        if args is None:
            sys.exit(code)
        if code:
            raise SystemExit(code)
        return None
    cli = BNLSTMCLI(args=args)
    # the console script does sys.exit(main()): an object there would print itself and exit with status 1
    return cli if args is not None else None


if __name__ == "__main__":
    main()
