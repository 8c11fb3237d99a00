"""The README's plain-PyTorch snippet of the layer runs as written (the front door must not rot)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_layer_snippet_runs():
    section = README.read_text().split("## The layer on its own", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section shows one python block"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert tuple(namespace["out"].shape) == (8, 100, 64)
    assert tuple(namespace["h_n"].shape) == (2, 8, 64)
    assert namespace["rnn"].cells[0].weight_hh.grad is not None
    assert not namespace["rnn"].training
