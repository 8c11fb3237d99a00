"""The BN-LSTM settings declared once: every task and model takes one ``rnn: BNLSTMSettings`` group, its defaults come
from ``bnlstm_lit.nn.DEFAULTS`` (a task states only where it differs), and a checkpoint keeps the group as plain
values."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
import torch

from bnlstm_lit.models import AttentiveReader, CharRNN, LastStateReadout
from bnlstm_lit.models.language import CHAR_RNN_SETTINGS
from bnlstm_lit.models.reader import READER_SETTINGS
from bnlstm_lit.nn import DEFAULTS, BNLSTMSettings, batchnorm_sites
from bnlstm_lit.tasks import (
    CharLanguageModel,
    ReadingComprehension,
    SequenceClassification,
    SequenceRegression,
    SequenceTask,
)

FIELDS = [field.name for field in dataclasses.fields(BNLSTMSettings)]
TASKS = [SequenceTask, SequenceClassification, SequenceRegression, CharLanguageModel, ReadingComprehension]
MODELS = [LastStateReadout, CharRNN, AttentiveReader]
#: each class's default settings, and the fields in which they differ from DEFAULTS (and only those)
DEFAULT_SETTINGS: dict[type, tuple[BNLSTMSettings, set[str]]] = {
    SequenceTask: (DEFAULTS, set()),
    SequenceClassification: (DEFAULTS, set()),
    SequenceRegression: (DEFAULTS, set()),
    LastStateReadout: (DEFAULTS, set()),
    CharLanguageModel: (CHAR_RNN_SETTINGS, {"hidden_size", "momentum"}),
    CharRNN: (CHAR_RNN_SETTINGS, {"hidden_size", "momentum"}),
    ReadingComprehension: (READER_SETTINGS, {"hidden_size"}),
    AttentiveReader: (READER_SETTINGS, {"hidden_size"}),
}


def differing(settings: BNLSTMSettings) -> set[str]:
    return {name for name in FIELDS if getattr(settings, name) != getattr(DEFAULTS, name)}


@pytest.mark.parametrize("cls", TASKS + MODELS, ids=lambda cls: cls.__name__)
def test_every_task_and_model_takes_the_settings_as_one_typed_group(cls: type) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    assert parameters["rnn"].annotation in (BNLSTMSettings, "BNLSTMSettings")
    default, fields = DEFAULT_SETTINGS[cls]
    assert parameters["rnn"].default == default
    assert differing(default) == fields  # a task default states only where it differs from DEFAULTS
    # no setting is declared again beside the group (the reader's own ``dropout`` is on its embeddings)
    repeated = set(parameters) & set(FIELDS) - (
        {"dropout"} if cls in (AttentiveReader, ReadingComprehension) else set()
    )
    assert not repeated
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def tiny_task(cls: type, **kwargs: Any) -> Any:
    sizes = (5, 5, 4) if cls is CharLanguageModel else (3, 4, 4)
    return cls(*sizes, **kwargs)


@pytest.mark.parametrize(
    "cls",
    [SequenceClassification, SequenceRegression, CharLanguageModel, ReadingComprehension],
    ids=lambda c: c.__name__,
)
def test_a_task_built_without_settings_takes_its_defaults_from_DEFAULTS(cls: type) -> None:
    model = tiny_task(cls)
    settings = model.rnn_settings
    assert settings.gamma_init == DEFAULTS.gamma_init
    assert settings.eps == DEFAULTS.eps
    assert settings.momentum == (CHAR_RNN_SETTINGS.momentum if cls is CharLanguageModel else DEFAULTS.momentum)
    assert settings == DEFAULT_SETTINGS[cls][0]
    assert settings is not DEFAULT_SETTINGS[cls][0]  # a copy: the default instance is never shared
    sites = batchnorm_sites(model)
    assert sites
    assert all(site.momentum == settings.momentum and site.eps == settings.eps for site in sites)
    assert all(torch.all(site.weight == DEFAULTS.gamma_init) for site in sites if site.weight is not None)
    assert model.hparams["rnn"] == dataclasses.asdict(settings)  # plain values: a checkpoint loads weights-only


def test_the_settings_reach_the_layer() -> None:
    settings = BNLSTMSettings(hidden_size=6, num_layers=2, gamma_init=0.3, momentum=None, dropout=0.25,
                              recurrent_init="identity_g", cell="tanh", implementation="reference")  # fmt: skip
    model = SequenceRegression(2, 1, 5, rnn=settings)
    layer = model.net.rnn
    assert (layer.hidden_size, layer.num_layers, layer.dropout, layer.cell) == (6, 2, 0.25, "tanh")
    assert layer.implementation == "reference"
    assert all(site.momentum is None for site in batchnorm_sites(model))
    assert all(torch.all(site.weight == 0.3) for site in batchnorm_sites(model) if site.weight is not None)
    assert model.net.readout.in_features == 6


def test_models_are_usable_from_plain_python() -> None:
    lm = CharRNN(5, 5, 4, rnn=BNLSTMSettings(hidden_size=3, normalize=False))
    logits, (h, _) = lm(torch.randint(0, 5, (2, 4)))
    assert logits.shape == (2, 4, 5) and h.shape == (1, 2, 3) and not batchnorm_sites(lm)
    readout = LastStateReadout(2, 3, 4, BNLSTMSettings(hidden_size=5))
    assert readout(torch.randn(2, 4, 2)).shape == (2, 3)


def test_the_settings_given_as_a_mapping_as_a_checkpoint_holds_them() -> None:
    model = tiny_task(SequenceRegression, rnn={"hidden_size": 7, "momentum": 0.2})
    assert model.rnn_settings == DEFAULTS.replace(hidden_size=7, momentum=0.2)
    with pytest.raises(ValueError, match=r"model\.init_args\.rnn: unknown settings \['hiden_size'\]"):
        tiny_task(SequenceRegression, rnn={"hiden_size": 7})


def test_the_reader_variant_decides_normalization_and_statistics() -> None:
    lstm = AttentiveReader(9, 4, 6, READER_SETTINGS.replace(hidden_size=3), variant="lstm")
    assert not batchnorm_sites(lstm)
    star = AttentiveReader(
        9, 4, 6, READER_SETTINGS.replace(hidden_size=3, input_statistics="sequence"), variant="bn_e_star"
    )
    assert star.document.input_statistics == "sequence"
    with pytest.raises(ValueError, match=r"rnn\.normalize is the variant's \('bnlstm': True\), got False"):
        AttentiveReader(9, 4, 6, READER_SETTINGS.replace(hidden_size=3, normalize=False), variant="bnlstm")
    with pytest.raises(ValueError, match=r"rnn\.input_statistics is the variant's"):
        AttentiveReader(9, 4, 6, READER_SETTINGS.replace(input_statistics="sequence"), variant="bnlstm")
    # attention BN takes the encoders' ε and momentum
    everywhere = AttentiveReader(9, 4, 6, READER_SETTINGS.replace(hidden_size=3, eps=1e-3, momentum=0.3),
                                 variant="bn_everywhere")  # fmt: skip
    assert everywhere.bn is not None
    assert all(site.eps == 1e-3 and site.momentum == 0.3 for site in everywhere.bn.values())


def test_a_reader_with_stacked_encoders_reads_the_last_layer() -> None:
    torch.manual_seed(0)
    model = AttentiveReader(9, 4, 6, READER_SETTINGS.replace(hidden_size=3, num_layers=2), variant="bnlstm")
    context = torch.randint(1, 9, (3, 6))
    query = torch.randint(1, 9, (3, 2))
    candidates = torch.ones(3, 4, dtype=torch.bool)
    logits, _ = model(context, torch.tensor([6, 4, 5]), query, torch.tensor([2, 1, 2]), candidates)
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()
    assert model.document.num_layers == 2
