"""The Attentive Reader (Hermann et al. 2015) with the batch-normalized variants of Cooijmans et al. 2017 (Sec. 5.4).

    y_d = BiLSTM(document)                    (B, Td, 2H), padded positions excluded everywhere
    u   = [h_fwd(query end); h_bwd(query start)]   (B, 2H)
    m_t = tanh(W_ym y_d(t) + W_um u)          attention over the document's real positions
    s   = softmax_t(w_ms . m_t)
    r   = sum_t s_t y_d(t)
    g   = tanh(W_rg r + W_ug u)
    logits = W_g g over the entities, restricted to the document's candidates

The five variants of the paper are one model with switches (:data:`VARIANTS`): the encoders' normalization, BN on
every term entering the attention's nonlinearities ("BN-everywhere": W_ym y_d(t) with masked statistics over all real
positions, W_um u, W_rg r and W_ug u, each with the encoders' γ and no shift), the input term's statistics shared over
time (BN-e*), and the backward direction reversing only the unpadded part (BN-e**).

``attention="bilinear"`` replaces the additive scores by s = softmax_t(y_d(t) . W_s u) (Chen, Bolton & Manning 2016,
"A Thorough Examination of the CNN/Daily Mail Reading Comprehension Task"); BN-everywhere then normalizes W_s u,
W_rg r and W_ug u. The additive form is the paper's and the default. Its scores depend on the query only through
the curvature of the tanh, so it learns to *match* query and document slowly: on :func:`~bnlstm_lit.data.
synthetic_corpus` (20,000 questions, H=64, Adam 3e-3, batch 32) the bilinear reader reached 98% validation accuracy
after about 1,000 steps while the additive one was still at chance after 5,000.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from bnlstm_lit.nn import BNLSTM, DEFAULTS, BNLSTMSettings, SequenceBatchNorm
from bnlstm_lit.nn.cell import GAMMA_SITES, site_gammas

Variant = Literal["lstm", "bnlstm", "bn_everywhere", "bn_e_star", "bn_e_star_star"]
Attention = Literal["additive", "bilinear"]

#: variant -> (normalize the encoders, BN in the attention, input_statistics, backward_reversal)
VARIANTS: dict[str, tuple[bool, bool, str, str]] = {
    "lstm": (False, False, "per_step", "padded"),
    "bnlstm": (True, False, "per_step", "padded"),
    "bn_everywhere": (True, True, "per_step", "padded"),
    "bn_e_star": (True, True, "sequence", "padded"),
    "bn_e_star_star": (True, True, "sequence", "unpadded"),
}

#: the paper's reduced setting: 240 units per direction; the other settings are :data:`~bnlstm_lit.nn.DEFAULTS`
READER_SETTINGS = DEFAULTS.replace(hidden_size=240)


class AttentiveReader(nn.Module):
    """Cloze-style reading comprehension: document and query encoders, attention, entity softmax.

    Args:
        vocab_size: token ids in [0, vocab_size) (0 is padding).
        num_entities: K, the entity classes (logits (B, K)).
        max_steps: per-step statistics kept by the encoders (the longest training document).
        rnn: the encoders' settings (:data:`READER_SETTINGS` by default): ``hidden_size`` H per direction (240 in
            the paper's reduced setting, 120 on the full task); ``normalize`` and ``input_statistics`` are the
            variant's (left at their defaults, or set to what the variant sets). ``gamma_init``: one γ for every
            BN site, or per site: ``"input"``, ``"recurrent"``, ``"cell"`` for both encoders; the BN-everywhere
            sites by name (``"ym"``, ``"um"``, ``"rg"``, ``"ug"``; bilinear: ``"su"``, ``"rg"``, ``"ug"``),
            ``"attention"`` for those not named; anything else the default γ. ``eps`` and ``momentum`` serve the
            attention's BN too.
        embedding_size: token embedding size (defaults to ``rnn.hidden_size``).
        variant: one of :data:`VARIANTS`.
        dropout: on the embeddings (``rnn.dropout``: between stacked encoder layers).
        attention: ``"additive"`` (Hermann et al. 2015, the paper's) or ``"bilinear"`` (Chen et al. 2016).
    """

    def __init__(
        self,
        vocab_size: int,
        num_entities: int,
        max_steps: int,
        rnn: BNLSTMSettings = READER_SETTINGS,
        embedding_size: int | None = None,
        variant: Variant = "bn_e_star_star",
        dropout: float = 0.0,
        attention: Attention = "additive",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"AttentiveReader: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        if attention not in ("additive", "bilinear"):
            raise ValueError(f"AttentiveReader: attention must be 'additive' or 'bilinear', got {attention!r}")
        normalize, attention_bn, input_statistics, reversal = VARIANTS[variant]
        for name, value in (("normalize", normalize), ("input_statistics", input_statistics)):
            given = getattr(rnn, name)
            if given != value and given != getattr(DEFAULTS, name):
                raise ValueError(
                    f"AttentiveReader: rnn.{name} is the variant's ({variant!r}: {value!r}), got {given!r}; choose "
                    "the variant instead"
                )
        sites: tuple[str, ...] = ("ym", "um", "rg", "ug") if attention == "additive" else ("su", "rg", "ug")
        gamma_init = rnn.gamma_init
        hidden_size = rnn.hidden_size
        gammas = site_gammas("AttentiveReader", gamma_init, (*GAMMA_SITES, "attention", *sites))
        if isinstance(gamma_init, Mapping):  # an attention site not named takes the "attention" value
            gammas.update({site: gammas["attention"] for site in sites if site not in gamma_init})
        self.variant = variant
        self.attention = attention
        E = embedding_size or hidden_size
        H2 = 2 * hidden_size
        self.embedding = nn.Embedding(vocab_size, E, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        encoder = dict(
            max_steps=max_steps, batch_first=True, bidirectional=True, normalize=normalize,
            gamma_init={site: gammas[site] for site in GAMMA_SITES}, input_statistics=input_statistics,
            backward_reversal=reversal,
        )  # fmt: skip
        self.document = BNLSTM.from_settings(E, rnn, **encoder)  # type: ignore[arg-type]
        self.query = BNLSTM.from_settings(E, rnn, **encoder)  # type: ignore[arg-type]
        if attention == "additive":
            self.W_ym = nn.Linear(H2, H2, bias=False)
            self.W_um = nn.Linear(H2, H2)
            self.w_ms = nn.Linear(H2, 1, bias=False)
        else:
            self.W_s = nn.Linear(H2, H2, bias=False)
        self.W_rg = nn.Linear(H2, H2, bias=False)
        self.W_ug = nn.Linear(H2, H2)
        self.W_g = nn.Linear(H2, num_entities)
        self.bn: nn.ModuleDict | None = None
        if attention_bn:  # the terms entering tanh: statistics over the batch (and the real positions for y_d)
            site = dict(max_steps=1, eps=rnn.eps, momentum=rnn.momentum, bias=False, shared_over_time=True)
            self.bn = nn.ModuleDict(
                {name: SequenceBatchNorm(H2, gamma_init=gammas[name], **site) for name in sites}  # type: ignore[arg-type]
            )

    def _norm(self, name: str, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """BN of a (B, C) vector term, or of a (B, T, C) term over its real positions; identity without BN."""
        if self.bn is None:
            return x
        if x.dim() == 2:
            return self.bn[name](x[None])[0]
        return self.bn[name](x.transpose(0, 1), 0, None if mask is None else mask.t()).transpose(0, 1)

    def forward(
        self, context: Tensor, context_lengths: Tensor, query: Tensor, query_lengths: Tensor, candidates: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Token ids (B, Td), (B,), (B, Tq), (B,) and candidates bool (B, K) -> entity logits (B, K) (non-candidates
        at -inf) and the attention (B, Td)."""
        Td = context.shape[1]
        mask = torch.arange(Td, device=context.device)[None, :] < context_lengths[:, None]  # (B, Td)
        y, _ = self.document(self.dropout(self.embedding(context)), lengths=context_lengths)  # (B, Td, 2H)
        _, (h_q, _) = self.query(self.dropout(self.embedding(query)), lengths=query_lengths)  # (2 * layers, B, H)
        u = torch.cat([h_q[-2], h_q[-1]], dim=-1)  # last layer: forward at the query's end, backward at its start
        if self.attention == "additive":
            m = torch.tanh(self._norm("ym", self.W_ym(y), mask) + self._norm("um", self.W_um(u))[:, None])  # (B,Td,2H)
            scores = self.w_ms(m).squeeze(-1)
        else:
            scores = torch.einsum("btc,bc->bt", y, self._norm("su", self.W_s(u)))
        scores = scores.masked_fill(~mask, float("-inf"))  # (B, Td)
        attention = scores.softmax(dim=1)
        r = torch.einsum("bt,btc->bc", attention, y)  # (B, 2H)
        g = torch.tanh(self._norm("rg", self.W_rg(r)) + self._norm("ug", self.W_ug(u)))
        logits = self.W_g(g).masked_fill(~candidates, float("-inf"))  # the softmax runs over the document's entities
        return logits, attention
