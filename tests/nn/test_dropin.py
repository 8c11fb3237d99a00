"""BNLSTM as a drop-in for torch.nn.LSTM: its positional order, bias=False, device/dtype, PackedSequence in and out,
and a constructor from an existing nn.LSTM that (normalize=False) computes what it computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bnlstm_lit.nn import BNLSTM

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _lstm(num_layers: int, bidirectional: bool, bias: bool = True, batch_first: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return nn.LSTM(3, 5, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional).double()


def test_positional_arguments_follow_nn_lstm():
    """BNLSTM(32, 64, 2, True, True) means what nn.LSTM(32, 64, 2, True, True) means: bias, then batch_first."""
    layer = BNLSTM(32, 64, 2, True, True, 0.25, True)
    assert (layer.num_layers, layer.bias, layer.batch_first, layer.dropout, layer.bidirectional) == (
        2,
        True,
        True,
        0.25,
        True,
    )
    with pytest.raises(TypeError):
        BNLSTM(32, 64, 2, True, True, 0.0, False, 100)  # max_steps and the BN options are keyword-only
    with pytest.raises(TypeError, match="bias must be a bool"):
        BNLSTM(32, 64, 2, 100)  # the old 4th positional argument (max_steps) is refused by name


def test_device_and_dtype_keywords():
    layer = BNLSTM(3, 4, device="cpu", dtype=torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert layer.cells[0].bn_h.running_mean.dtype == torch.float64
    assert layer.cells[0].bn_h.num_batches_tracked.dtype == torch.long


@pytest.mark.parametrize("normalize", [False, True])
def test_bias_false_has_no_trainable_bias(normalize):
    """bias=False: b is a zero buffer (no parameter, no forget bias), for the BN-LSTM too; it trains."""
    layer = BNLSTM(3, 4, 1, False, max_steps=6, normalize=normalize)
    names = {name for name, _ in layer.named_parameters()}
    assert not any(name.endswith(".bias") and "bn_" not in name for name in names), names
    assert torch.equal(layer.cells[0].bias, torch.zeros(16))
    out, _ = layer(torch.randn(6, 3, 3))
    out.sum().backward()
    assert layer.cells[0].weight_hh.grad is not None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("num_layers", "bidirectional"), [(1, False), (2, False), (2, True)])
def test_from_lstm_reproduces_the_lstm(num_layers, bidirectional, bias):
    """from_lstm copies the weights (the two biases summed); normalize=False gives nn.LSTM's outputs and states, on
    every implementation, and the same gradients of the input."""
    lstm = _lstm(num_layers, bidirectional, bias)
    x = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(num_layers * (1 + bidirectional), 4, 5, dtype=torch.float64)
    c0 = torch.randn_like(h0)
    want, (h_w, c_w) = lstm(x, (h0, c0))
    (grad_w,) = torch.autograd.grad(want.square().sum(), x)
    for implementation in ("auto", "reference"):
        layer = BNLSTM.from_lstm(lstm, implementation=implementation)
        assert layer.bias == bias and layer.normalize is False
        got, (h_g, c_g) = layer(x, (h0, c0))
        (grad_g,) = torch.autograd.grad(got.square().sum(), x)
        for a, b in ((got, want), (h_g, h_w), (c_g, c_w), (grad_g, grad_w)):
            torch.testing.assert_close(a, b, **TOL)


def test_from_lstm_with_normalization_starts_from_the_weights():
    lstm = _lstm(1, False)
    layer = BNLSTM.from_lstm(lstm, normalize=True, max_steps=10)
    assert torch.equal(layer.cells[0].weight_hh, lstm.weight_hh_l0)
    assert torch.equal(layer.cells[0].bias, lstm.bias_ih_l0 + lstm.bias_hh_l0)
    assert layer.cells[0].bn_h is not None


def test_nn_lstm_state_dict_errors_name_the_key():
    layer = BNLSTM(3, 5, max_steps=4, normalize=False, dtype=torch.float64)
    state = _lstm(1, False).state_dict()
    layer.load_lstm_state_dict(state)
    with pytest.raises(KeyError, match="missing.*weight_hh_l0"):
        layer.load_lstm_state_dict({k: v for k, v in state.items() if k != "weight_hh_l0"})
    with pytest.raises(KeyError, match="unexpected.*weight_ih_l1"):
        layer.load_lstm_state_dict({**state, "weight_ih_l1": state["weight_ih_l0"]})
    with pytest.raises(ValueError, match="weight_ih_l0 has shape"):
        layer.load_lstm_state_dict({**state, "weight_ih_l0": torch.zeros(20, 2)})
    with pytest.raises(ValueError, match="proj_size"):
        BNLSTM.from_lstm(nn.LSTM(3, 5, proj_size=2))


@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(("num_layers", "bidirectional"), [(1, False), (2, False), (2, True)])
def test_packed_sequence_in_packed_sequence_out(num_layers, bidirectional, batch_first, enforce_sorted):
    """A PackedSequence gives a PackedSequence with the input's packing (batch sizes, sorted and unsorted indices)
    and nn.LSTM's data and final states (each sequence's last real step), bidirectional and 2 layers included."""
    lstm = _lstm(num_layers, bidirectional, batch_first=batch_first, seed=3)
    layer = BNLSTM.from_lstm(lstm)
    lengths = torch.tensor([6, 6, 4, 2, 1]) if enforce_sorted else torch.tensor([4, 6, 1, 6, 2])
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    want, (h_w, c_w) = lstm(packed)
    got, (h_g, c_g) = layer(packed)
    assert type(got) is type(want)
    assert torch.equal(got.batch_sizes, want.batch_sizes)
    for a, b in ((got.sorted_indices, want.sorted_indices), (got.unsorted_indices, want.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in ((got.data, want.data), (h_g, h_w), (c_g, c_w)):
        torch.testing.assert_close(a, b, **TOL)
    padded, out_lengths = pad_packed_sequence(got, batch_first=batch_first)
    assert torch.equal(out_lengths, lengths)
    with pytest.raises(ValueError, match="PackedSequence carries its lengths"):
        layer(packed, lengths=lengths)
