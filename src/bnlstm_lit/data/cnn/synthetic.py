"""A small learnable corpus in the exact ``.question`` format, for tests and smoke runs (:func:`synthetic_corpus`)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from bnlstm_lit.data.cnn.questions import PLACEHOLDER_TOKEN, SPLIT_FOLDERS, SPLITS, Question, write_question

__all__ = ["synthetic_corpus"]

_FILLER = tuple(
    "the a new report says on after before officials city people year time week government group team country "  # noqa: SIM905
    "home state police world show day told added school family life film game water market plan".split()
)
_CUES = tuple(
    "visited praised joined signed met warned hired blamed thanked sued backed named called beat left chose sold "  # noqa: SIM905
    "found".split()
)


def synthetic_corpus(
    root: str | os.PathLike[str],
    num_train: int,
    num_valid: int,
    num_test: int,
    seed: int = 0,
    min_entities: int = 3,
    max_entities: int = 6,
    max_filler: int = 6,
) -> dict[str, list[str]]:
    """Write a learnable corpus of ``.question`` files under ``root/questions/<split>/``; return the file names.

    The rule: each document has n entities (``min_entities``..``max_entities``) and n distinct cue words (from a
    fixed list of 18 verbs); for every entity there is one sentence ``<filler> <cue> @entityX <filler> .`` and one
    more sentence mentioning it after filler words only, the sentences in random order. The question is
    ``<filler> <cue> @placeholder <filler>`` for one of the cues; **the answer is the entity written immediately
    after that cue in the document**. Every entity occurs exactly twice and the answer is drawn uniformly among
    them, so frequency and position carry no information: choosing among the candidates by anything but reading the
    cue gives 1/n (about 24% for 3..6 entities), while a reader that matches the cue gets every question right.
    Entity indices are sparse (drawn from 0..4n-1, like the real corpus), documents are 20-150 tokens long and every
    file is named by the SHA-1 of its content. Read it with ``CNNQuestions(data_dir=root, completeness="off")``
    (its test split is not the official one). ``max_filler`` bounds the filler runs (the default 6 gives the lengths
    above; 1 gives sentences of 3-4 tokens and questions of 3, quick to learn in tests).
    """
    if not 1 <= min_entities <= max_entities <= len(_CUES):
        raise ValueError(f"need 1 <= min_entities <= max_entities <= {len(_CUES)}")
    if max_filler < 1:
        raise ValueError(f"need max_filler >= 1, got {max_filler}")
    f = max_filler
    rng = random.Random(seed)
    names: dict[str, list[str]] = {}
    for split, count in zip(SPLITS, (num_train, num_valid, num_test), strict=True):
        folder = Path(root) / "questions" / SPLIT_FOLDERS[split]
        folder.mkdir(parents=True, exist_ok=True)
        names[split] = []
        for i in range(count):
            n = rng.randint(min_entities, max_entities)
            entities = [f"@entity{e}" for e in rng.sample(range(4 * n), n)]
            cues = rng.sample(_CUES, n)

            def filler(low: int, high: int) -> list[str]:
                return [rng.choice(_FILLER) for _ in range(rng.randint(low, high))]

            sentences = [
                filler(1, f) + [cue, entity] + filler(0, f - 1) + ["."]
                for cue, entity in zip(cues, entities, strict=True)
            ]
            sentences += [filler(1, max(1, f - 1)) + [entity] + filler(0, max(0, f - 2)) + ["."] for entity in entities]
            rng.shuffle(sentences)
            j = rng.randrange(n)
            question = Question(
                name="",
                url=f"http://synthetic.invalid/{split}/{i}",
                context=tuple(token for sentence in sentences for token in sentence),
                query=tuple(filler(1, max(1, f - 2)) + [cues[j], PLACEHOLDER_TOKEN] + filler(0, max(0, f - 3))),
                answer=entities[j],
                entities={entity: f"Entity {entity[7:]}" for entity in entities},
            )
            names[split].append(write_question(question, folder).name)
    return names
