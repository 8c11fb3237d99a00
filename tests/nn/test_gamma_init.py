"""γ initialization per BN site: one number for every site (the paper's 0.1), or a mapping by site."""

from __future__ import annotations

import pytest
import torch

from bnlstm_lit.models import AttentiveReader
from bnlstm_lit.nn import BNLSTM, BNLSTMSettings


def gammas_of(cell: torch.nn.Module) -> dict[str, set[float]]:
    """The distinct initial γ values of each BN site of a cell."""
    return {
        site: {round(v, 6) for v in getattr(cell, f"bn_{site}").weight.tolist()}
        for site in ("x", "h", "c")
        if getattr(cell, f"bn_{site}") is not None
    }


def test_one_number_sets_every_site() -> None:
    model = BNLSTM(3, 5, num_layers=2, max_steps=4, gamma_init=0.3, bidirectional=True)
    for cell in model.cells:
        assert gammas_of(cell) == {"x": {0.3}, "h": {0.3}, "c": {0.3}}


def test_a_mapping_sets_each_site_and_missing_sites_take_the_papers_value() -> None:
    model = BNLSTM(3, 5, num_layers=2, max_steps=4, gamma_init={"input": 1.0, "recurrent": 0.05})
    for cell in model.cells:
        assert gammas_of(cell) == {"x": {1.0}, "h": {0.05}, "c": {0.1}}
    # the γ values are where the mapping put them: the layer computes the same as with the sites set by hand
    torch.manual_seed(0)
    by_hand = BNLSTM(3, 5, num_layers=2, max_steps=4)
    with torch.no_grad():
        for cell in by_hand.cells:
            cell.bn_x.weight.fill_(1.0)
            cell.bn_h.weight.fill_(0.05)
    torch.manual_seed(0)
    mapped = BNLSTM(3, 5, num_layers=2, max_steps=4, gamma_init={"input": 1.0, "recurrent": 0.05})
    x = torch.randn(4, 6, 3)
    torch.testing.assert_close(mapped(x)[0], by_hand(x)[0], rtol=0, atol=0)


def test_tanh_cell_takes_input_and_recurrent_sites() -> None:
    model = BNLSTM(3, 5, max_steps=4, cell="tanh", gamma_init={"recurrent": 0.5})
    assert gammas_of(model.cells[0]) == {"x": {0.1}, "h": {0.5}}
    with pytest.raises(ValueError, match=r"BNRNNCell: gamma_init keys must be among \['input', 'recurrent'\].*cell"):
        BNLSTM(3, 5, max_steps=4, cell="tanh", gamma_init={"cell": 0.5})


@pytest.mark.parametrize(
    ("gamma_init", "message"),
    [
        ({"inputs": 1.0}, r"BNLSTMCell: gamma_init keys must be among .*got \['inputs'\]"),
        ({"cell": 0.0}, r"gamma_init for the cell site must be a positive number, got 0.0"),
        (-0.1, r"gamma_init for the input site must be a positive number, got -0.1"),
        ({"input": "big"}, r"gamma_init for the input site must be a positive number, got 'big'"),
    ],
)
def test_bad_gamma_init_is_an_error_naming_the_site(gamma_init: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BNLSTM(3, 5, max_steps=4, gamma_init=gamma_init)  # type: ignore[arg-type]


def bn_gammas(reader: AttentiveReader) -> dict[str, set[float]]:
    assert reader.bn is not None
    return {name: {round(v, 6) for v in bn.weight.tolist()} for name, bn in reader.bn.items()}


def _rnn(gamma_init) -> BNLSTMSettings:  # type: ignore[no-untyped-def]
    return BNLSTMSettings(hidden_size=6, gamma_init=gamma_init)


def test_reader_sets_encoder_and_attention_sites() -> None:
    gamma_init = {"input": 1.0, "recurrent": 0.1, "cell": 0.5, "attention": 0.25, "ug": 0.05}
    reader = AttentiveReader(30, 8, 12, _rnn(gamma_init), variant="bn_everywhere")
    for encoder in (reader.document, reader.query):
        for cell in encoder.cells:
            assert gammas_of(cell) == {"x": {1.0}, "h": {0.1}, "c": {0.5}}
    assert bn_gammas(reader) == {"ym": {0.25}, "um": {0.25}, "rg": {0.25}, "ug": {0.05}}
    bilinear = AttentiveReader(30, 8, 12, _rnn({"su": 2.0}), variant="bn_e_star", attention="bilinear")
    assert bn_gammas(bilinear) == {"su": {2.0}, "rg": {0.1}, "ug": {0.1}}
    assert gammas_of(bilinear.document.cells[0]) == {"x": {0.1}, "h": {0.1}, "c": {0.1}}
    assert bn_gammas(AttentiveReader(30, 8, 12, _rnn(0.3), variant="bn_everywhere")) == {
        name: {0.3} for name in ("ym", "um", "rg", "ug")
    }


@pytest.mark.parametrize(
    ("attention", "gamma_init", "message"),
    [
        ("additive", {"attn": 1.0}, r"AttentiveReader: gamma_init keys must be among .*'attention'.*got \['attn'\]"),
        ("additive", {"su": 1.0}, r"got \['su'\]"),  # a site of the bilinear form only
        ("bilinear", {"ym": 1.0}, r"got \['ym'\]"),
        ("bilinear", {"ug": -1.0}, r"gamma_init for the ug site must be a positive number"),
    ],
)
def test_reader_rejects_sites_it_does_not_have(attention: str, gamma_init: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttentiveReader(30, 8, 12, _rnn(gamma_init), variant="bn_everywhere", attention=attention)  # type: ignore[arg-type]
