"""Time one whole character-LM training step (one-hot -> (BN-)LSTM -> softmax, cross-entropy, backward, clip, Adam).

    python benchmarks/lm_step.py                      # the paper's PTB size (hidden 1000, batch 64, length 100)
    python benchmarks/lm_step.py --hidden 256 --batch 32 --reps 7

Prints the median step time of the LSTM and the BN-LSTM task (``bnlstm_lit.tasks.CharLanguageModel``), interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bnlstm_lit.models.language import CHAR_RNN_SETTINGS
from bnlstm_lit.tasks import CharLanguageModel


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    settings = CHAR_RNN_SETTINGS.replace(hidden_size=args.hidden)
    models = {
        name: CharLanguageModel(args.vocab, args.vocab, args.length, rnn=settings.replace(normalize=normalize))
        for name, normalize in (("lstm", False), ("bnlstm", True))
    }
    optimizers = {name: torch.optim.Adam(m.parameters(), 2e-3) for name, m in models.items()}
    x = torch.randint(0, args.vocab, (args.batch, args.length))
    y = torch.randint(0, args.vocab, (args.batch, args.length))
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for name, model in models.items():
            start = time.perf_counter()
            logits, _ = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizers[name].zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizers[name].step()
            if rep:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    shape = f"hidden {args.hidden}, batch {args.batch}, length {args.length}, vocabulary {args.vocab}"
    print(f"one training step ({shape}; median of {args.reps}, {torch.get_num_threads()} threads):")
    for name, median in medians.items():
        print(f"  {name}: {median:.3f} s")
    return medians


if __name__ == "__main__":
    main()
