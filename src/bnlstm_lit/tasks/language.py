"""Character-level language modelling (paper Sec. 5.2-5.3): Penn Treebank characters and text8, in bits per character.

Batches are :class:`~bnlstm_lit.data.TextBatch` (from :class:`~bnlstm_lit.data.CharCorpus`); what a batch says about
itself decides how it is run:

* ``carry`` -- start from the previous batch's final state of the same loader, detached (stateful mode, and the
  chunks of the full-test protocol); otherwise from the learned initial state (paper mode);
* ``start_step`` -- the time index of the first step (the full-test protocol numbers its steps through the whole
  test split, so steps beyond the trained length use the statistics of step T_max-1);
* ``protocol`` -- a :class:`~bnlstm_lit.data.charlm.Protocol` (:func:`protocol_metric_name`): kind ``"split"`` logs
  ``{split}/bpc``; ``"full"`` logs ``test/bpc_full`` (population statistics, the paper's Table 2); ``"length"`` (the
  length sweep, ``protocol.length = n``) logs ``test/bpc_L{n}_population`` and ``test/bpc_L{n}_batch``, each batch run
  once with each kind of statistics (paper Fig. 3b).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from bnlstm_lit.callbacks.predictions import SampleWriter
from bnlstm_lit.console import progress_bar_off_stdout
from bnlstm_lit.data.charlm import Protocol, SampleRequest, TextBatch
from bnlstm_lit.metrics import BitsPerCharacter
from bnlstm_lit.models import CharRNN
from bnlstm_lit.models.language import CHAR_RNN_SETTINGS
from bnlstm_lit.nn import BNLSTMSettings, batchnorm_sites, set_eval_statistics
from bnlstm_lit.tasks.base import BNLSTMTask, EvalStatistics, SplitMetrics, check_sizes, rnn_settings

State = tuple[Tensor, Tensor]


def protocol_metric_name(split: str, protocol: Protocol, statistics: EvalStatistics | None = None) -> str:
    """The name a batch's bits per character is logged under: ``{split}/bpc`` (kind ``"split"``),
    ``{split}/bpc_full`` (``"full"``), ``{split}/bpc_L{n}_{statistics}`` (``"length"``, one per kind of statistics)."""
    if protocol.kind == "split":
        return f"{split}/bpc"
    if protocol.kind == "full":
        return f"{split}/bpc_full"
    if statistics is None:
        raise ValueError("a length-sweep metric is named by its statistics ('population' or 'batch'), got None")
    return f"{split}/bpc_L{protocol.length}_{statistics}"


#: The task's init arguments that make its :class:`Sampling` (named as the fields).
SAMPLING_FLAGS = ("prime", "sample_length", "num_samples", "temperature", "top_k")


@dataclass(frozen=True)
class Sampling:
    """What ``predict`` draws -- the task's settings, not the data's; checked when made, each error naming its flag
    (``model.init_args.<name>``).

    Attributes:
        prime: every sample starts from this free text (the DataModule writes it in the corpus's alphabet, e.g. PTB
            spaces as ``_``); None: the corpus's default prime.
        sample_length: symbols drawn after the prime.
        num_samples: samples drawn (one batch).
        temperature: softmax temperature (> 0; lower is more conservative).
        top_k: draw each symbol from the ``top_k`` most likely ones only (>= 1; at least the vocabulary size means
            all); None: from the whole vocabulary.
    """

    prime: str | None = None
    sample_length: int = 200
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        for name in ("sample_length", "num_samples", "top_k"):
            value = getattr(self, name)
            if name == "top_k" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} (model.init_args.{name}) must be an integer >= 1, got {value!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not t > 0:
            raise ValueError(f"temperature (model.init_args.temperature) must be a positive number, got {t!r}")
        if self.prime == "":
            raise ValueError(
                "prime (model.init_args.prime) must hold at least one character to start sampling from (or be null: "
                "the corpus's default prime)"
            )


class CharLanguageModel(BNLSTMTask):
    """Next-character prediction with a (BN-)LSTM: cross-entropy, bits per character per split.

    Logs ``train/loss`` (nats per symbol) and ``{split}/bpc`` (token-weighted, DDP-exact :class:`BitsPerCharacter`),
    plus the protocol metrics of the module docstring. ``predict`` samples text as its :class:`Sampling` settings say,
    from the alphabet a :class:`SampleRequest` batch brings: returns ``{"ids": int64 (N, length), "text": [N
    continuations], "prompt": [N priming texts]}``; a :class:`~bnlstm_lit.callbacks.SampleWriter` (added by
    :meth:`configure_callbacks` unless the trainer has one) prints the samples to stdout and writes ``samples.txt``.
    The draws follow the global RNG: ``--seed_everything`` (``L.seed_everything``) repeats them.

    Args:
        input_size: vocabulary size of the one-hot inputs (linked from the DataModule).
        output_size: vocabulary size of the softmax (linked from the DataModule).
        max_steps: the training sequence length: steps with their own BN statistics (linked from the DataModule).
        rnn: the (BN-)LSTM's settings, :class:`~bnlstm_lit.nn.BNLSTMSettings` (``model.init_args.rnn.hidden_size``,
            ``.normalize``, ``.gamma_init``, ...); by default :data:`~bnlstm_lit.models.language.CHAR_RNN_SETTINGS`:
            1000 units (PTB in the paper; 2000 for text8) and momentum 0.05 (the original code's rate for language
            modelling), the rest :data:`~bnlstm_lit.nn.DEFAULTS`.
        sweep_statistics: the statistics the length-sweep protocol evaluates with (each logged under its name).
        optimizer, lr_scheduler, eval_statistics, monitor: see :class:`~bnlstm_lit.tasks.BNLSTMTask`.
        prime, sample_length, num_samples, temperature, top_k: what ``predict`` samples (:class:`Sampling`).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        max_steps: int,
        rnn: BNLSTMSettings = CHAR_RNN_SETTINGS,
        sweep_statistics: list[EvalStatistics] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_statistics: EvalStatistics = "population",
        monitor: str = "val/bpc",
        prime: str | None = None,
        sample_length: int = 200,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> None:
        settings = rnn_settings(rnn)
        check_sizes(input_size=input_size, output_size=output_size, max_steps=max_steps,
                    **{"rnn.hidden_size": settings.hidden_size})  # fmt: skip
        super().__init__(optimizer, lr_scheduler, eval_statistics, monitor)
        sweep_statistics = ["population", "batch"] if sweep_statistics is None else list(sweep_statistics)
        if not sweep_statistics or any(s not in ("population", "batch") for s in sweep_statistics):
            raise ValueError(
                f"model.init_args.sweep_statistics must list 'population' and/or 'batch', got {sweep_statistics!r}"
            )
        # the sampling settings are predict's, not the trained model's: a checkpoint does not carry them, so
        # ``predict --ckpt_path`` takes them from the command line (LightningCLI applies stored hparams over it)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", *SAMPLING_FLAGS])
        self.sweep_statistics = sweep_statistics
        self.sampling = Sampling(prime, sample_length, num_samples, temperature, top_k)
        self.use_rnn_settings(settings)
        self.net = CharRNN(input_size, output_size, max_steps, settings)
        # one metric object per split and protocol: their states must never mix
        self.train_bpc = BitsPerCharacter()
        self.val_bpc = BitsPerCharacter()
        self.test_bpc = BitsPerCharacter()
        self.protocol_metrics = nn.ModuleDict()  # test/bpc_full, test/bpc_L100_population, ... made when first met
        self._states: dict[str, State | None] = {}  # final state of the last batch per loader (detached)

    def forward(self, tokens: Tensor, state: State | None = None, start_step: int = 0) -> tuple[Tensor, State]:
        """tokens int64 (B, T) -> logits (B, T, V) and the final state."""
        return self.net(tokens, state, start_step)

    # ---- running a batch ---------------------------------------------------------------------------------------------
    def _run(self, batch: TextBatch, stream: str) -> Tensor:
        """Logits (B, T, V) of a batch, from the carried state of ``stream`` when the batch continues it."""
        if not isinstance(batch, TextBatch):
            raise TypeError(
                f"{type(self).__name__} expects TextBatch batches (a CharCorpus DataModule), got {type(batch).__name__}"
            )
        state = None
        if batch.carry:
            state = self._states.get(stream)
            if state is None or state[0].shape[1] != batch.inputs.shape[0]:
                rank_zero_warn(
                    f"a {stream} batch continues a stream whose state is unknown (resumed mid-epoch?); it starts from "
                    "the learned initial state"
                )
                state = None
            elif self.training:
                # The learned initial state takes no part in a continued batch. Under DDP every parameter must reach
                # the loss, so it enters with weight 0: an exactly zero gradient, the same with 1 or N processes.
                rnn = self.net.rnn
                state = (state[0] + 0.0 * rnn.h0[:, None], state[1] + 0.0 * rnn.c0[:, None])
        logits, (h, c) = self(batch.inputs, state, batch.start_step)
        self._states[stream] = (h.detach(), c.detach())
        return logits

    def split_metrics(self, split: str) -> SplitMetrics:
        """``{"bpc": ...}``: the bits per character of the split's own batches (protocol kind ``"split"``; the other
        protocols' metrics are made when first met, in :attr:`protocol_metrics`)."""
        return {"bpc": getattr(self, f"{split}_bpc")}

    def statistics_forward(self, batch: TextBatch) -> None:
        """How :class:`~bnlstm_lit.callbacks.PopulationStatistics` runs a training batch (streams keep their state)."""
        self._run(batch, "statistics")

    def training_step(self, batch: TextBatch, batch_idx: int) -> Tensor:
        logits = self._run(batch, "train")
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())  # nats per symbol
        self.train_bpc.update(logits.detach(), batch.targets)
        self.log_split("train", loss, batch.targets.numel())
        return loss

    def validation_step(self, batch: TextBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: TextBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: TextBatch, split: str) -> None:
        protocol = batch.protocol
        if protocol.kind == "split":
            logits = self._run(batch, split)
            metric: BitsPerCharacter = getattr(self, f"{split}_bpc")
            metric.update(logits, batch.targets)
            loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
            self.log_split(split, loss, batch.targets.numel())  # {split}/loss and {split}/bpc
        elif protocol.kind == "full":
            # batch 1 through the whole split: only population statistics exist for it
            with _statistics(self, "population"):
                logits = self._run(batch, f"{split}_full")
            self._log_protocol(protocol_metric_name(split, protocol), logits, batch.targets)
        else:
            # the length sweep: every batch with each kind of statistics (the LSTM has none: one pass serves all)
            has_bn = bool(batchnorm_sites(self))
            logits = None
            for statistics in self.sweep_statistics:
                if has_bn or logits is None:
                    with _statistics(self, statistics):
                        logits = self._run(batch, f"{split}_L{protocol.length}")
                self._log_protocol(protocol_metric_name(split, protocol, statistics), logits, batch.targets)

    def _log_protocol(self, name: str, logits: Tensor, targets: Tensor) -> None:
        key = name.replace("/", "_")
        if key not in self.protocol_metrics:
            self.protocol_metrics[key] = BitsPerCharacter().to(self.device)
        metric = self.protocol_metrics[key]
        assert isinstance(metric, BitsPerCharacter)
        metric.update(logits, targets)
        self.log(name, metric, metric_attribute=f"protocol_metrics.{key}", add_dataloader_idx=False)

    # ---- sampling ----------------------------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[Callback]:
        """The base task's callbacks, a :class:`~bnlstm_lit.callbacks.SampleWriter` unless the trainer has one, and
        for ``predict`` the trainer's plain TQDM progress bar moved to stderr, so that stdout carries the samples and
        nothing else."""
        trainer = self._trainer
        base = super().configure_callbacks()  # the base task's (a learning-rate monitor where a scheduler is set)
        callbacks = [base] if isinstance(base, Callback) else list(base)
        if not any(isinstance(c, SampleWriter) for c in getattr(trainer, "callbacks", [])):
            callbacks.append(SampleWriter())
        if trainer is not None and trainer.predicting:
            callbacks.extend(progress_bar_off_stdout(trainer))
        return callbacks

    def setup(self, stage: str) -> None:
        # a bad prime fails before predict's population-statistics pass (a whole training epoch), not after it
        request = getattr(getattr(self._trainer, "datamodule", None), "sample_request", None)
        if stage == "predict" and callable(request):
            self._prime(request())

    def _prime(self, request: SampleRequest) -> Tensor:
        """The priming text as ids int64 (P,); characters outside the alphabet raise a ValueError naming them."""
        return request.encode(self.sampling.prime, "prime (model.init_args.prime)")

    def predict_step(self, batch: SampleRequest, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if not isinstance(batch, SampleRequest):
            raise TypeError(f"{type(self).__name__}.predict expects SampleRequest batches, got {type(batch).__name__}")
        settings = self.sampling
        prime = self._prime(batch).to(self.device)
        prime = prime.expand(settings.num_samples, -1).clone()  # (N, P)
        with _statistics(self, "population"):  # one symbol per step: no batch statistics to speak of
            ids = self.sample(prime, settings.sample_length, settings.temperature, settings.top_k)
        texts = [batch.readable(batch.vocabulary.decode(row)) for row in ids]
        prompt = batch.readable(batch.vocabulary.decode(prime[0]))
        return {"ids": ids, "text": texts, "prompt": [prompt] * len(texts)}

    @torch.no_grad()
    def sample(self, prime: Tensor, length: int, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
        """Draw ``length`` symbols after ``prime`` (int64 (N, P)) from softmax(logits / temperature), restricted to
        the ``top_k`` most likely symbols of each step when given: int64 (N, length).

        The prime is read in one pass from the learned initial state; then one step per symbol, the state carried
        and the time index continued (BN statistics of step T_max-1 beyond the trained length).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        logits, state = self(prime)
        step = prime.shape[1]
        drawn = []
        for _ in range(length):
            scores = logits[:, -1].float() / temperature  # (N, V)
            if top_k is not None and top_k < scores.shape[-1]:
                kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (N, 1): the k-th largest score
                scores = scores.masked_fill(scores < kth, float("-inf"))
            probs = torch.softmax(scores, dim=-1)  # (N, V)
            symbol = torch.multinomial(probs, 1)  # (N, 1)
            drawn.append(symbol)
            logits, state = self(symbol, state, step)
            step += 1
        return torch.cat(drawn, dim=1)


class _statistics:
    """Context: every BN site of ``module`` evaluates with ``mode`` statistics, then with the task's own again."""

    def __init__(self, module: BNLSTMTask, mode: EvalStatistics) -> None:
        self.module, self.mode = module, mode

    def __enter__(self) -> None:
        set_eval_statistics(self.module, self.mode)

    def __exit__(self, *exc: object) -> None:
        set_eval_statistics(self.module, self.module.eval_statistics)
