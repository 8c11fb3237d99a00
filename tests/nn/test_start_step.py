"""BNLSTM ``start_step``: chunked evaluation equals one pass, per-step statistics selected, training limits, errors."""

from __future__ import annotations

import pytest
import torch

from bnlstm_lit.nn import BNLSTM, batchnorm_sites, set_eval_statistics

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _model(normalize: bool = True, max_steps: int = 5, num_layers: int = 2, seed: int = 0) -> BNLSTM:
    """A float64 BNLSTM with non-trivial parameters and distinct random population statistics at every step."""
    torch.manual_seed(seed)
    model = BNLSTM(3, 4, num_layers=num_layers, max_steps=max_steps, normalize=normalize).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "h0", "c0")) or ".bn_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.5 * torch.randn(buf.shape, generator=g, dtype=buf.dtype))
            elif name.endswith("running_var"):
                buf.copy_(0.3 + torch.rand(buf.shape, generator=g, dtype=buf.dtype))
    return model


def _input(T: int, B: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(T, B, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _chunked(model: BNLSTM, x: torch.Tensor, cuts: list[int]):
    """Run x (T, B, I) in chunks split at ``cuts``, carrying the state and the time index."""
    bounds = [0, *cuts, x.shape[0]]
    outputs, state = [], None
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        out, state = model(x[lo:hi], state, start_step=lo)
        outputs.append(out)
    return torch.cat(outputs), state


# ---------------------------------------------------------------------------------------------------------------------
# chunked == whole


@pytest.mark.parametrize(
    ("T", "cuts"),
    [
        (5, [2]),  # within max_steps
        (5, [1, 2, 4]),  # one-step chunks included
        (9, [3]),  # the second chunk crosses max_steps
        (9, [6]),  # the second chunk starts beyond max_steps
        (12, [2, 4, 5, 8, 11]),  # many chunks, several beyond max_steps
    ],
)
def test_chunks_with_start_step_equal_one_pass_in_eval(T: int, cuts: list[int]) -> None:
    """Population statistics differ per step: chunk k must use rows start … start+T_k-1 (clamped at max_steps-1).

    Fails if start_step were ignored (every chunk from row 0) or the clamping beyond max_steps were off.
    """
    model = _model(max_steps=5).eval()
    x = _input(T)
    with torch.no_grad():
        whole, (h, c) = model(x)
        chunked, (h2, c2) = _chunked(model, x, cuts)
    torch.testing.assert_close(chunked, whole, **TOL)
    torch.testing.assert_close(h2, h, **TOL)
    torch.testing.assert_close(c2, c, **TOL)


def test_chunks_with_start_step_equal_one_pass_batch_first() -> None:
    """The same with batch_first=True: the time index is that of axis 1."""
    model = _model(max_steps=4)
    model.batch_first = True
    model.eval()
    x = _input(7).transpose(0, 1)  # (B, T, I)
    with torch.no_grad():
        whole, (h, c) = model(x)
        a, state = model(x[:, :3])
        b, (h2, c2) = model(x[:, 3:], state, start_step=3)
    torch.testing.assert_close(torch.cat([a, b], dim=1), whole, **TOL)
    torch.testing.assert_close(h2, h, **TOL)
    torch.testing.assert_close(c2, c, **TOL)


def test_steps_beyond_max_steps_reuse_the_last_statistics() -> None:
    """Only row max_steps-1 is read beyond max_steps: changing it changes a chunk starting there, other rows do not."""
    model = _model(max_steps=4).eval()
    x = _input(2)
    with torch.no_grad():
        before, _ = model(x, start_step=10)
        for site in batchnorm_sites(model):
            site.running_mean[:3] += 1.0  # rows 0..2: not used at steps >= 3
        unchanged, _ = model(x, start_step=10)
        for site in batchnorm_sites(model):
            site.running_mean[3] += 1.0
        changed, _ = model(x, start_step=10)
    assert torch.equal(unchanged, before)
    assert not torch.allclose(changed, before)


# ---------------------------------------------------------------------------------------------------------------------
# start_step selects the statistics (and only the statistics)


def test_start_step_changes_the_result_with_per_step_statistics() -> None:
    """Same input and state, start_step 0 vs 3: other population rows, so other outputs."""
    model = _model(max_steps=6).eval()
    x = _input(2)
    with torch.no_grad():
        at0, _ = model(x, start_step=0)
        at3, _ = model(x, start_step=3)
        # exactly a row shift: rows 3, 4 copied into rows 0, 1 give the start_step=3 result from start_step=0
        for site in batchnorm_sites(model):
            site.running_mean[:2] = site.running_mean[3:5].clone()
            site.running_var[:2] = site.running_var[3:5].clone()
        shifted, _ = model(x, start_step=0)
    assert not torch.allclose(at0, at3)
    torch.testing.assert_close(shifted, at3, **TOL)


def test_start_step_does_not_matter_without_normalization() -> None:
    """The LSTM baseline has no per-step statistics: any start_step, in training or evaluation, gives the same."""
    model = _model(normalize=False, max_steps=3)
    x = _input(4)
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            at0, (h0, c0) = model(x)
            far, (h1, c1) = model(x, start_step=50)  # beyond max_steps even in training: nothing to index
        assert torch.equal(far, at0)
        assert torch.equal(h1, h0)
        assert torch.equal(c1, c0)


def test_start_step_does_not_matter_with_batch_statistics_in_eval() -> None:
    """Batch-statistics evaluation normalizes with the current batch: start_step (even past max_steps) is moot."""
    model = _model(max_steps=3).eval()
    set_eval_statistics(model, "batch")
    x = _input(4)
    with torch.no_grad():
        at0, _ = model(x)
        far, _ = model(x, start_step=7)
    torch.testing.assert_close(far, at0, **TOL)


# ---------------------------------------------------------------------------------------------------------------------
# training


def test_training_updates_the_statistics_of_the_chunk_steps() -> None:
    """A training chunk with start_step=2 over 2 steps tracks rows 2 and 3 only."""
    model = _model(max_steps=5).train()
    for site in batchnorm_sites(model):
        site.reset_running_stats()
    model(_input(2, B=4), start_step=2)
    for site in batchnorm_sites(model):
        assert site.num_batches_tracked.tolist() == [0, 0, 1, 1, 0]
        assert torch.equal(site.running_mean[[0, 1, 4]], torch.zeros(3, site.num_features, dtype=torch.float64))
        assert not torch.equal(site.running_mean[2], torch.zeros(site.num_features, dtype=torch.float64))


def test_training_up_to_max_steps_is_allowed() -> None:
    """start_step + T == max_steps is the last allowed chunk in training (no off-by-one)."""
    model = _model(max_steps=5).train()
    out, _ = model(_input(2, B=4), start_step=3)
    assert out.shape == (2, 4, 4)


@pytest.mark.parametrize(("start_step", "T"), [(4, 2), (5, 1), (0, 6), (10, 3)])
def test_training_beyond_max_steps_raises(start_step: int, T: int) -> None:
    """Training would need statistics of a step that has none: a ValueError naming max_steps."""
    model = _model(max_steps=5).train()
    with pytest.raises(ValueError, match=r"max_steps=5"):
        model(_input(T, B=4), start_step=start_step)


@pytest.mark.parametrize("start_step", [-1, True, False, 1.0, "2", None])
def test_invalid_start_step_raises(start_step: object) -> None:
    """A negative, boolean or non-integer start_step is an error naming start_step (not a silent index)."""
    model = _model().eval()
    with pytest.raises(ValueError, match=r"start_step must be a non-negative integer, got"):
        model(_input(2), start_step=start_step)  # type: ignore[arg-type]
