"""The adding problem: generated, seeded data with exactly two markers and the sum of the marked values as target."""

from __future__ import annotations

import pytest
import torch

from bnlstm_lit.data.adding import CHANCE_MSE, AddingProblem, adding_problem


def make(**kwargs) -> AddingProblem:
    args = {"seq_len": 11, "train_size": 50, "val_size": 20, "test_size": 30, "batch_size": 8}
    args.update(kwargs)
    dm = AddingProblem(**args)
    dm.setup("fit")
    return dm


def split_tensors(dm: AddingProblem, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = dm.datasets[split].tensors
    return inputs, targets


@pytest.mark.parametrize("seq_len", [2, 3, 10, 11])
def test_generator_shapes_markers_and_targets(seq_len: int) -> None:
    inputs, targets = adding_problem(200, seq_len, torch.Generator().manual_seed(0))
    assert inputs.shape == (200, seq_len, 2) and inputs.dtype == torch.float32
    assert targets.shape == (200,) and targets.dtype == torch.float32
    values, markers = inputs[..., 0], inputs[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert set(markers.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(markers.sum(dim=1), torch.full((200,), 2.0))  # exactly two markers per sequence
    half = seq_len // 2
    assert torch.equal(markers[:, :half].sum(dim=1), torch.ones(200))  # one in the first half ...
    assert torch.equal(markers[:, half:].sum(dim=1), torch.ones(200))  # ... and one in the second
    torch.testing.assert_close(targets, (values * markers).sum(dim=1))  # the sum of the two marked values


def test_marker_positions_cover_both_halves() -> None:
    inputs, _ = adding_problem(2000, 10, torch.Generator().manual_seed(1))
    positions = inputs[..., 1].nonzero()[:, 1]
    assert set(positions.tolist()) == set(range(10))  # every step can be marked: no position is left out


def test_targets_match_the_documented_chance_level() -> None:
    _, targets = adding_problem(20000, 20, torch.Generator().manual_seed(0))
    assert CHANCE_MSE == pytest.approx(1 / 6)
    assert float(targets.mean()) == pytest.approx(1.0, abs=0.02)
    assert float(((targets - 1.0) ** 2).mean()) == pytest.approx(CHANCE_MSE, rel=0.05)


def test_datamodule_batches() -> None:
    dm = make()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        inputs, targets = next(iter(loader))
        assert inputs.shape == (8, 11, 2) and targets.shape == (8,)
        assert torch.equal(inputs[..., 1].sum(dim=1), torch.full((8,), 2.0))
        torch.testing.assert_close(targets, (inputs[..., 0] * inputs[..., 1]).sum(dim=1))
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [50, 20, 30]


def test_sizes_before_setup() -> None:
    dm = AddingProblem(seq_len=37)
    assert (dm.input_size, dm.output_size, dm.max_steps) == (2, 1, 37)
    assert dm.datasets == {}  # nothing generated yet
    with pytest.raises(RuntimeError, match=r"setup\(\) must run before the train dataloader"):
        dm.train_dataloader()


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    for split in ("train", "val", "test"):
        for x, y in zip(split_tensors(a, split), split_tensors(b, split), strict=True):
            assert torch.equal(x, y)
        assert not torch.equal(split_tensors(a, split)[0], split_tensors(c, split)[0])
    # and the training order is seeded too
    assert torch.equal(next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0])


def test_setup_is_idempotent() -> None:
    dm = make()
    before = split_tensors(dm, "train")[0]
    dm.setup("test")
    dm.setup("fit")
    assert split_tensors(dm, "train")[0] is before


def test_splits_differ() -> None:
    dm = make(train_size=30, val_size=30, test_size=30)
    train, val, test = (split_tensors(dm, s)[0] for s in ("train", "val", "test"))
    assert not torch.equal(train, val) and not torch.equal(train, test) and not torch.equal(val, test)
    # no sequence is shared between splits
    flat = {s: {tuple(x.flatten().tolist()) for x in split_tensors(dm, s)[0]} for s in ("train", "val", "test")}
    assert not flat["train"] & flat["val"] and not flat["train"] & flat["test"] and not flat["val"] & flat["test"]


def test_training_loader_drops_the_last_incomplete_batch() -> None:
    dm = make(train_size=50, val_size=20, test_size=30, batch_size=8)
    train = list(dm.train_dataloader())
    assert len(train) == 50 // 8 == len(dm.train_dataloader())
    assert all(inputs.shape[0] == 8 for inputs, _ in train)
    # evaluation keeps every example
    assert sum(inputs.shape[0] for inputs, _ in dm.val_dataloader()) == 20
    assert sum(inputs.shape[0] for inputs, _ in dm.test_dataloader()) == 30
    # training shuffles, evaluation does not
    first = next(iter(dm.train_dataloader()))[0]
    assert not torch.equal(first, split_tensors(dm, "train")[0][:8])
    assert torch.equal(next(iter(dm.val_dataloader()))[0], split_tensors(dm, "val")[0][:8])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seq_len": 1}, "seq_len"),
        ({"batch_size": 1}, "batch_size"),
        ({"train_size": 1}, "train_size"),
        ({"val_size": 0}, "val_size"),
        ({"test_size": 0}, "test_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"data\.init_args\.{name} must be at least"):
        AddingProblem(**kwargs)


def test_generator_refuses_a_sequence_without_two_halves() -> None:
    with pytest.raises(ValueError, match="seq_len >= 2"):
        adding_problem(4, 1, torch.Generator().manual_seed(0))
