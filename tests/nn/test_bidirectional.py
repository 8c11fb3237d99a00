"""Bidirectional BNLSTM with lengths, and sequence-wise (shared over time) input statistics (the paper's BN-e*/e**)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bnlstm_lit.nn import BNLSTM, SequenceBatchNorm
from bnlstm_lit.nn.layer import _gather_time, _reversal_index

I, H, T, B = 3, 5, 7, 4
LENGTHS = torch.tensor([7, 3, 5, 1])


def copy_to_torch(model: BNLSTM, layers: int) -> torch.nn.LSTM:
    ref = torch.nn.LSTM(I, H, num_layers=layers, bidirectional=True).double()
    with torch.no_grad():
        for layer in range(layers):
            for direction, suffix in enumerate(["", "_reverse"]):
                cell = model.cells[layer * 2 + direction]
                getattr(ref, f"weight_ih_l{layer}{suffix}").copy_(cell.weight_ih)
                getattr(ref, f"weight_hh_l{layer}{suffix}").copy_(cell.weight_hh)
                getattr(ref, f"bias_ih_l{layer}{suffix}").copy_(cell.bias)
                getattr(ref, f"bias_hh_l{layer}{suffix}").zero_()
    return ref


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("fused", [True, False])
def test_without_normalization_equals_torch_bidirectional_lstm_on_packed_sequences(layers: int, fused: bool) -> None:
    torch.manual_seed(layers)
    model = BNLSTM(
        I, H, num_layers=layers, normalize=False, bidirectional=True, implementation=("auto" if fused else "reference")
    ).double()
    ref = copy_to_torch(model, layers)
    x = torch.randn(T, B, I, dtype=torch.double, requires_grad=True)
    out, (h, c) = model(x, lengths=LENGTHS)
    zeros = torch.zeros(2 * layers, B, H, dtype=torch.double)
    packed, (rh, rc) = ref(pack_padded_sequence(x, LENGTHS, enforce_sorted=False), (zeros, zeros))
    ro, _ = pad_packed_sequence(packed, total_length=T)
    assert out.shape == (T, B, 2 * H) and h.shape == c.shape == (2 * layers, B, H)
    torch.testing.assert_close(out, ro)
    torch.testing.assert_close(h, rh)
    torch.testing.assert_close(c, rc)
    (gx,) = torch.autograd.grad(out.square().sum() + h.sum(), x)
    (rgx,) = torch.autograd.grad(ro.square().sum() + rh.sum(), x)
    torch.testing.assert_close(gx, rgx)
    # without lengths: the whole sequence, as torch's unpacked bidirectional LSTM
    out2, (h2, _) = model(x)
    ro2, (rh2, _) = ref(x, (zeros, zeros))
    torch.testing.assert_close(out2, ro2)
    torch.testing.assert_close(h2, rh2)


def test_reversal_reverses_only_the_unpadded_part() -> None:
    mask = torch.arange(5)[:, None] < torch.tensor([5, 2, 3])[None, :]
    index = _reversal_index(mask, 5, 3, torch.device("cpu"))
    assert index.t().tolist() == [[4, 3, 2, 1, 0], [1, 0, 2, 3, 4], [2, 1, 0, 3, 4]]
    x = torch.arange(15.0).view(5, 3, 1)
    once = _gather_time(x, index)
    assert once[:, 1, 0].tolist() == [4.0, 1.0, 7.0, 10.0, 13.0]  # (1, 4) swapped, padding (rows 2-4) in place
    torch.testing.assert_close(_gather_time(once, index), x)  # an involution


def test_backward_direction_starts_at_each_sequences_last_real_step() -> None:
    """The backward direction's first step reads x[L_b - 1]: its state there is the cell applied to h_0."""
    torch.manual_seed(0)
    model = BNLSTM(I, H, normalize=False, bidirectional=True).double()
    x = torch.randn(T, B, I, dtype=torch.double)
    out, _ = model(x, lengths=LENGTHS)
    cell = model.cells[1]
    zeros = torch.zeros(B, H, dtype=torch.double)
    last = x[LENGTHS - 1, torch.arange(B)]  # (B, I): each sequence's last real input
    h, _ = cell(cell.input_term(last[None])[0], (zeros, zeros), 0)
    torch.testing.assert_close(out[LENGTHS - 1, torch.arange(B), H:], h)


@pytest.mark.parametrize("input_statistics", ["per_step", "sequence"])
@pytest.mark.parametrize("training", [True, False])
def test_padding_invariance(input_statistics: str, training: bool) -> None:
    """Outputs at real positions are the same whether the batch is padded to its longest sequence or much longer
    (with garbage in the padding), in training and in evaluation."""
    torch.manual_seed(1)
    model = BNLSTM(I, H, bidirectional=True, input_statistics=input_statistics, max_steps=40).double()
    x = torch.randn(T, B, I, dtype=torch.double)
    model.train()
    model(x, lengths=LENGTHS)  # some running statistics
    model.train(training)
    padded = torch.cat([x, 1e3 * torch.randn(30, B, I, dtype=torch.double)])
    out, (h, c) = model(x, lengths=LENGTHS)
    out_padded, (hp, cp) = model(padded, lengths=LENGTHS)
    real = (torch.arange(T)[:, None] < LENGTHS)[:, :, None]
    torch.testing.assert_close(out * real, out_padded[:T] * real)
    assert bool((out_padded[T:] == 0).all())  # padded outputs are zero
    torch.testing.assert_close(h, hp)
    torch.testing.assert_close(c, cp)


def test_sequence_wise_statistics_are_the_masked_statistics_over_all_real_positions() -> None:
    torch.manual_seed(2)
    bn = SequenceBatchNorm(6, max_steps=3, momentum=None, shared_over_time=True).double()
    assert bn.running_mean.shape == (1, 6)
    x = torch.randn(T, B, 6, dtype=torch.double)
    mask = torch.arange(T)[:, None] < LENGTHS
    y = bn(x, 0, mask)  # T = 7 > max_steps = 3: no per-step limit
    real = x[mask]  # (N, 6)
    mean, var = real.mean(0), real.var(0, unbiased=False)
    torch.testing.assert_close(y[mask], 0.1 * (real - mean) / torch.sqrt(var + 1e-5))
    torch.testing.assert_close(bn.running_mean[0], mean)
    torch.testing.assert_close(bn.running_var[0], var)
    bn.eval()
    torch.testing.assert_close(bn(x, 0, mask)[mask], y[mask])  # population = the one batch seen


def test_bn_e_star_layer_keeps_per_step_statistics_for_the_recurrent_term_and_cell() -> None:
    model = BNLSTM(I, H, input_statistics="sequence", max_steps=9)
    cell = model.cells[0]
    assert cell.bn_x.shared_over_time and cell.bn_x.running_mean.shape == (1, 4 * H)
    assert not cell.bn_h.shared_over_time and cell.bn_h.running_mean.shape == (9, 4 * H)
    assert cell.bn_c.running_mean.shape == (9, H)


def test_bidirectional_shapes_and_errors() -> None:
    model = BNLSTM(I, H, num_layers=2, bidirectional=True)
    assert len(model.cells) == 4 and model.cells[2].input_size == 2 * H
    assert model.h0.shape == (4, H)
    x = torch.randn(T, B, I)
    with pytest.raises(ValueError, match=r"\(num_layers \* 2, B, H\) = \(4, 4, 5\)"):
        model(x, (torch.zeros(2, B, H), torch.zeros(2, B, H)))
    with pytest.raises(ValueError, match="start_step must be 0"):
        model(x, start_step=3)
    with pytest.raises(ValueError, match="input_statistics must be 'per_step' or 'sequence'"):
        BNLSTM(I, H, input_statistics="global")  # type: ignore[arg-type]
    out, (h, _) = model(x)
    assert out.shape == (T, B, 2 * H) and h.shape == (4, B, H)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # both directions used (DDP)


@pytest.mark.parametrize("cell", ["BNLSTMCell", "BNRNNCell"])
def test_cells_refuse_an_unknown_input_statistics_naming_the_cell(cell: str) -> None:
    import bnlstm_lit.nn as bnn

    with pytest.raises(ValueError, match=f"{cell}: input_statistics must be 'per_step' or 'sequence', got 'global'"):
        getattr(bnn, cell)(I, H, 5, input_statistics="global")
