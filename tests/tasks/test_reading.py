"""The Attentive Reader and its five variants (models/reader.py), the ReadingComprehension task, and the CNN configs
through the CLI on a generated corpus in the exact .question format."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bnlstm_lit.cli import BNLSTMCLI
from bnlstm_lit.data import synthetic_corpus
from bnlstm_lit.models.reader import READER_SETTINGS, VARIANTS, AttentiveReader
from bnlstm_lit.nn import BNLSTMSettings, batchnorm_sites

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
V, K, B = 30, 6, 5


def units(hidden_size: int) -> BNLSTMSettings:
    """The reader's default settings with ``hidden_size`` units per direction."""
    return READER_SETTINGS.replace(hidden_size=hidden_size)


def batch(T: int = 9, Tq: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 4, 7, 2, 6])[:B]
    context = torch.randint(1, V, (B, T), generator=g) * (torch.arange(T)[None] < lengths[:, None])
    query_lengths = torch.tensor([4, 2, 3, 4, 1])
    query = torch.randint(1, V, (B, Tq), generator=g) * (torch.arange(Tq)[None] < query_lengths[:, None])
    candidates = torch.zeros(B, K, dtype=torch.bool)
    candidates[:, :3] = True
    candidates[0, 5] = True
    return context, lengths, query, query_lengths, candidates


@pytest.mark.parametrize("form", ["additive", "bilinear"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_live_on_the_candidates_and_attention_on_real_positions(variant: str, form: str) -> None:
    torch.manual_seed(0)
    model = AttentiveReader(V, K, max_steps=20, rnn=units(7), variant=variant, attention=form)  # type: ignore[arg-type]
    context, lengths, query, query_lengths, candidates = batch()
    logits, attention = model(context, lengths, query, query_lengths, candidates)
    assert logits.shape == (B, K) and attention.shape == context.shape
    assert bool(torch.isneginf(logits[~candidates]).all()) and bool(torch.isfinite(logits[candidates]).all())
    real = torch.arange(context.shape[1])[None] < lengths[:, None]
    assert bool((attention[~real] == 0).all())
    torch.testing.assert_close(attention.sum(1), torch.ones(B))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == [], unused  # DDP needs every parameter


@pytest.mark.parametrize("form", ["additive", "bilinear"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("training", [True, False])
def test_padding_invariance(variant: str, training: bool, form: str) -> None:
    """Padding the documents to a much longer length changes no logit -- in training for every variant, and in
    evaluation for the LSTM and BN-e**. The other BN variants reverse the whole padded tensor for the backward
    direction (as the original code did before BN-e**): the padding comes first, so with population statistics the
    step index each real position meets depends on the padded length. That is the paper's reason for BN-e**."""
    torch.manual_seed(1)
    model = AttentiveReader(V, K, max_steps=40, rnn=units(7), variant=variant, attention=form).double()  # type: ignore[arg-type]
    context, lengths, query, query_lengths, candidates = batch()
    model.train()
    model(context, lengths, query, query_lengths, candidates)  # running statistics
    model.train(training)
    padded = torch.cat([context, torch.randint(1, V, (B, 25))], dim=1)  # garbage beyond every length
    a, _ = model(context, lengths, query, query_lengths, candidates)
    b, _ = model(padded, lengths, query, query_lengths, candidates)
    normalize, _, _, reversal = VARIANTS[variant]
    if training or not normalize or reversal == "unpadded":
        torch.testing.assert_close(a, b)
    else:
        assert not torch.allclose(a, b)


def test_bilinear_attention_scores_document_positions_against_the_query() -> None:
    """attention="bilinear": s = softmax_t(y_d(t) . W_s u) over the real positions, computed here by hand from the
    encoders' outputs; with BN-everywhere W_s u goes through its own BN site (and the additive sites do not exist)."""
    torch.manual_seed(2)
    model = AttentiveReader(V, K, max_steps=20, rnn=units(5), variant="lstm", attention="bilinear").eval()
    context, lengths, query, query_lengths, candidates = batch()
    _, attention = model(context, lengths, query, query_lengths, candidates)
    y, _ = model.document(model.embedding(context), lengths=lengths)
    _, (h_q, _) = model.query(model.embedding(query), lengths=query_lengths)
    u = torch.cat([h_q[0], h_q[1]], dim=-1)
    for i in range(B):
        n = int(lengths[i])
        expected = (y[i, :n] @ model.W_s.weight @ u[i]).softmax(0)
        torch.testing.assert_close(attention[i, :n], expected)
    assert not hasattr(model, "W_ym") and not hasattr(model, "w_ms")
    everywhere = AttentiveReader(V, K, max_steps=20, rnn=units(5), variant="bn_everywhere", attention="bilinear")
    assert everywhere.bn is not None and set(everywhere.bn) == {"su", "rg", "ug"}
    with pytest.raises(ValueError, match="attention must be"):
        AttentiveReader(V, K, max_steps=10, attention="dot")  # type: ignore[arg-type]


def test_variants_configure_one_model() -> None:
    built = {v: AttentiveReader(V, K, max_steps=10, rnn=units(4), variant=v) for v in VARIANTS}  # type: ignore[arg-type]
    assert batchnorm_sites(built["lstm"]) == []
    assert built["bnlstm"].bn is None and built["bnlstm"].document.normalize
    assert built["bn_everywhere"].bn is not None and built["bn_everywhere"].document.input_statistics == "per_step"
    assert built["bn_e_star"].document.input_statistics == "sequence"
    assert built["bn_e_star"].document.backward_reversal == "padded"
    assert built["bn_e_star_star"].document.backward_reversal == "unpadded"
    assert all(m.document.bidirectional and m.query.bidirectional for m in built.values())
    with pytest.raises(ValueError, match="variant must be one of"):
        AttentiveReader(V, K, max_steps=10, variant="bn_e_triple_star")  # type: ignore[arg-type]


# ---- the configs through the CLI ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cnn")
    synthetic_corpus(root, 48, 16, 16, seed=0)
    return root


CNN_CONFIGS = sorted(CONFIGS.glob("cnn_*.yaml"))


def test_there_is_a_config_per_variant() -> None:
    assert {p.stem.removeprefix("cnn_") for p in CNN_CONFIGS} == set(VARIANTS)


def run_cli(*args: str) -> BNLSTMCLI:
    """The CLI in this process on one thread, as the console script would run it."""
    threads, argv = torch.get_num_threads(), sys.argv
    torch.set_num_threads(1)
    sys.argv = ["bnlstm-lit"]
    try:
        return BNLSTMCLI(args=list(args))
    finally:
        torch.set_num_threads(threads)
        sys.argv = argv


@pytest.mark.parametrize("config", CNN_CONFIGS, ids=[p.stem for p in CNN_CONFIGS])
def test_every_cnn_config_fits_validates_and_tests(config: Path, corpus: Path, tmp_path: Path) -> None:
    args = [f"--config={config}", f"--config={CONFIGS / 'debug.yaml'}", f"--trainer.default_root_dir={tmp_path}",
            f"--data.init_args.data_dir={corpus}", "--data.init_args.completeness=off",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    cli = run_cli("fit", *args)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert {"train/loss", "val/acc", "val/error"} <= set(metrics)
    assert abs(metrics["val/acc"] + metrics["val/error"] - 1.0) < 1e-5
    assert cli.model.hparams["variant"] == config.stem.removeprefix("cnn_")
    checkpoint = cli.trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    tested = run_cli("test", *args, f"--ckpt_path={checkpoint}")
    assert 0.0 <= float(tested.trainer.callback_metrics["test/error"]) <= 1.0


@pytest.fixture(scope="module")
def learnable_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cnn_learnable")
    synthetic_corpus(root, 3000, 200, 200, seed=0, max_filler=1)  # chance: about 1/4.5 (3..6 candidates)
    return root


@pytest.mark.parametrize(
    "variant",
    # the default run keeps the LSTM, the BN-LSTM and the paper's best variant (BN-e**); the two intermediate ones
    # (together about 160 s on 2 cores) run with -m slow
    ["lstm", "bnlstm", pytest.param("bn_everywhere", marks=pytest.mark.slow),
     pytest.param("bn_e_star", marks=pytest.mark.slow), "bn_e_star_star"],
)  # fmt: skip
def test_every_variant_learns_the_synthetic_rule_through_the_cli(
    variant: str, learnable_corpus: Path, tmp_path: Path
) -> None:
    """Each of the paper's five readers (bilinear attention), trained through the CLI with its shipped config (entity
    shuffling, bucketing, clipping, population statistics for validation), learns to read: it answers the held-out
    questions far above chance (about 22%), which no rule but matching the question's cue against the document can
    do. The settings are those of the measured run in docs/notes/reader-gamma.md
    (configs/overlays/cnn_synthetic_cpu.yaml: H=32, Adam 3e-3, batch 32, γ per BN site), stopped early at 90%. (The
    additive attention, and the BN readers with the paper's γ = 0.1 on every site, stay at chance on this rule within a
    test's budget: see the same page.)"""
    overlay = CONFIGS / "overlays" / "cnn_synthetic_cpu.yaml"
    args = [f"--config={CONFIGS / f'cnn_{variant}.yaml'}", f"--config={overlay}",
            f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.data_dir={learnable_corpus}",
            "--trainer.max_steps=-1", "--trainer.max_epochs=20",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
            "--trainer.callbacks.monitor=val/acc", "--trainer.callbacks.mode=max",
            "--trainer.callbacks.stopping_threshold=0.9", "--trainer.callbacks.patience=100"]  # fmt: skip
    cli = run_cli("fit", *args)
    assert cli.model.hparams["variant"] == variant
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.9
