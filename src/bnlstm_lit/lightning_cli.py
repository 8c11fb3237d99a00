"""The LightningCLI behind ``bnlstm-lit {fit,validate,test,predict}``: subclass mode for the task and the data, and
the sizes only the data knows linked into the task.

The task (``model:``) and the data (``data:``) are chosen by ``class_path`` -- ours or any importable subclass of
LightningModule / LightningDataModule -- so a new task or corpus needs no edit of this package. Ours are imported
here, before the parser is built, so they are also known by their short names (``--model CharLanguageModel``,
``--data PTBChar``, ``--trainer.callbacks+=PopulationStatistics``): jsonargparse resolves a short name among the
subclasses already imported. The sizes only the data knows (``input_size``, ``output_size``, ``max_steps``) are
linked into the task's arguments when the DataModule is instantiated; a YAML never repeats them.

The command line itself (subcommands, ``--version``, configs by name) is :mod:`bnlstm_lit.cli`, which imports this
module only for a training subcommand: Lightning takes seconds to import.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# imported for their subclasses of LightningModule, LightningDataModule and Callback (short names on the command line)
import bnlstm_lit.callbacks
import bnlstm_lit.data
import bnlstm_lit.tasks  # noqa: F401
from bnlstm_lit.checkpoint import CheckpointCLIMixin
from bnlstm_lit.tasks.base import drop_hp_metric_placeholder

__all__ = ["LINKED_SIZES", "BNLSTMCLI", "check_monitors"]

#: DataModule properties linked into the task's ``init_args`` of the same name.
LINKED_SIZES = ("input_size", "output_size", "max_steps")


class BNLSTMCLI(CheckpointCLIMixin, LightningCLI):
    """LightningCLI with subclass mode for model and data, and the data-derived sizes linked into the model.

    Checkpoints are written atomically and read weights-only (:class:`~bnlstm_lit.checkpoint.AtomicCheckpointIO`),
    and ``validate``/``test``/``predict --ckpt_path FILE`` need no config: the task and data classes come from the
    checkpoint (:class:`~bnlstm_lit.checkpoint.CheckpointCLIMixin`).

    ``validate``/``test``/``predict`` write no placeholder ``hp_metric = -1`` to a TensorBoard logger: they log into
    the checkpoint's run, whose ``hp_metric`` the fit wrote (see :mod:`bnlstm_lit.tasks.base`).
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

    def _before_evaluation(self) -> None:
        drop_hp_metric_placeholder(self.trainer)

    before_validate = before_test = before_predict = _before_evaluation


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
