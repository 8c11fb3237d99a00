"""The CNN question corpus: the .question format, validation, the official test list, the archive, the cache, the
entity shuffling, sentence selection, bucketing and batches. Corpora are written here in the exact file format (no
real corpus offline); the 5 real questions of the offline sample cnn_sample/cnn_snippet.jtr.json are among them."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from bnlstm_lit.data import cnn
from bnlstm_lit.data.cnn import (
    ENTITY_OFFSET,
    OFFICIAL_TEST_DIGEST,
    PLACEHOLDER,
    UNK,
    BucketSampler,
    CNNQuestions,
    QABatch,
    Question,
    QuestionFormatError,
    TestList,
    check_cnn_archive,
    format_question,
    names_digest,
    parse_question,
    preprocess,
    read_test_list,
    select_sentences,
    synthetic,
    synthetic_corpus,
)

SPLIT_FOLDERS = {"train": "training", "valid": "validation", "test": "test"}


def toks(text: str) -> list[str]:
    return text.split()


ENTITY = re.compile(r"@entity\d+")


# ------------------------------------------------------------------------------------------------------ generators


def question_text(url: str, context: str, query: str, answer: str, mapping: list[str]) -> str:
    """A file's content written straight from FORMAT.md (independently of cnn.format_question)."""
    return url + "\n\n" + context + "\n\n" + query + "\n\n" + answer + "\n\n" + "\n".join(mapping)


def write_named(folder: Path, text: str | bytes) -> Path:
    """Write ``text`` as ``<sha1 of its bytes>.question`` in ``folder``."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha1(data).hexdigest()}.question"
    path.write_bytes(data)
    return path


WORDS = toks("the of to and a in said he was for on that is with his it by at as from has have an") + [
    "e-mail",
    "n't",
    "'s",
    "--",
    '"',
    "(",
    ")",
    "30",
    "u.s.",
    "café",
    "naïve",
]


def random_question(rng: random.Random) -> dict[str, Any]:
    """Fields of a random well-formed question: sparse entity ids, surface forms with spaces, colons and accents,
    the mapping in arbitrary order (Python 2 dict order in the real files), some entities only in the question."""
    n = rng.randint(1, 8)
    ids = rng.sample(range(300), n + 2)
    doc_entities = [f"@entity{i}" for i in ids[:n]]
    extra = [f"@entity{i}" for i in ids[n:]]  # mentioned in the question only
    context = [rng.choice(WORDS + doc_entities) for _ in range(rng.randint(5, 80))] + doc_entities
    rng.shuffle(context)
    query = [rng.choice(WORDS + doc_entities + extra) for _ in range(rng.randint(0, 10))]
    query.insert(rng.randint(0, len(query)), "@placeholder")
    entities = {
        e: rng.choice(["CNN", "São Paulo", "Washington: D.C.", "John Terry", "@x: y"]) for e in doc_entities + extra
    }
    order = list(entities)
    rng.shuffle(order)
    return {
        "url": f"http://web.archive.org/web/2015id_/http://edition.cnn.com/{rng.randrange(10**6)}/index.html",
        "context": context,
        "query": query,
        "answer": rng.choice(doc_entities),
        "entities": {key: entities[key] for key in order},
    }


def text_of(fields: dict[str, Any]) -> str:
    mapping = [f"{key}:{value}" for key, value in fields["entities"].items()]
    return question_text(
        fields["url"], " ".join(fields["context"]), " ".join(fields["query"]), fields["answer"], mapping
    )


def real_questions(shared_data: Path) -> list[dict[str, Any]]:
    """The 5 real questions of cnn_snippet.jtr.json, with synthesized mapping lines ``@entityN:Name N`` for the
    entities of their context and question (the source has none), in order of first appearance."""
    path = shared_data / "cnn_sample" / "cnn_snippet.jtr.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    out = []
    for instance in json.loads(path.read_text(encoding="utf-8"))["instances"]:
        (question,) = instance["questions"]
        context, query = instance["support"]["text"], question["question"]
        entities = dict.fromkeys(ENTITY.findall(context + " " + query))
        out.append(
            {
                "name": question["id"],
                "url": instance["support"]["id"],
                "context": context.split(" "),
                "query": query.split(" "),
                "answer": question["answers"][0]["text"],
                "entities": {e: f"Name {e[7:]}" for e in entities},
            }
        )
    assert len(out) == 5
    return out


def write_corpus(root: Path, num_train: int = 120, num_valid: int = 30, num_test: int = 30, seed: int = 0) -> Path:
    synthetic_corpus(root, num_train, num_valid, num_test, seed=seed)
    return root


def write_test_list(root: Path) -> Path:
    names = sorted(p.name for p in (root / "questions" / "test").glob("*.question"))
    path = root / "test_list.txt"
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def make_dm(root: Path, **kwargs: Any) -> CNNQuestions:
    kwargs.setdefault("completeness", "off")
    kwargs.setdefault("batch_size", 8)
    return CNNQuestions(data_dir=str(root), **kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only synthetic corpus (120/30/30) shared by the tests that do not change files."""
    return write_corpus(tmp_path_factory.mktemp("cnn"))


@pytest.fixture(scope="module")
def loaded(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> CNNQuestions:
    dm = make_dm(corpus, cache_dir=str(tmp_path_factory.mktemp("cache")))
    dm.setup("fit")
    return dm


@pytest.fixture
def count_parses(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the calls of parse_question by the cache builder (its only way to read a question file)."""
    calls: Counter[str] = Counter()
    original = preprocess.parse_question

    def counting(path: Any, **kwargs: Any) -> Question:
        calls["parse"] += 1
        return original(path, **kwargs)

    monkeypatch.setattr(preprocess, "parse_question", counting)
    return calls


# ------------------------------------------------------------------------------------------------------ the format


def test_parser_round_trip_on_generated_files(tmp_path: Path) -> None:
    rng = random.Random(1)
    for _ in range(40):
        fields = random_question(rng)
        text = text_of(fields)
        path = write_named(tmp_path, text)
        q = parse_question(path)
        assert q.name == path.stem == hashlib.sha1(text.encode()).hexdigest()
        assert (q.url, list(q.context), list(q.query), q.answer) == (
            fields["url"],
            fields["context"],
            fields["query"],
            fields["answer"],
        )
        assert q.entities == fields["entities"] and list(q.entities) == list(fields["entities"])  # order kept
        assert format_question(q) == text  # byte-exact writer
        assert q.answer_index == int(fields["answer"][7:])
        assert q.candidates() == sorted({int(t[7:]) for t in fields["context"] if t.startswith("@entity")})


def test_the_five_real_questions_round_trip(shared_data: Path, tmp_path: Path) -> None:
    for fields in real_questions(shared_data):
        text = text_of(fields)
        assert "\n\n" not in " ".join(fields["context"])  # one-line fields, as FORMAT.md says
        path = tmp_path / fields["name"]  # the real name
        path.write_text(text, encoding="utf-8")
        q = parse_question(path, verify_name=False)
        assert q.name == fields["name"].removesuffix(".question")
        assert q.url == fields["url"] and q.answer == fields["answer"]
        assert list(q.context) == fields["context"] and list(q.query) == fields["query"]
        assert q.entities == fields["entities"]
        assert format_question(q) == text
        assert q.answer in q.context and q.query.count("@placeholder") == 1
        # The name is the SHA-1 of the whole original file (rc-data hashes the string it writes), not of the URL;
        # the mapping lines here are synthesized, so the content -- and its SHA-1 -- differs from the original.
        assert hashlib.sha1(q.url.encode()).hexdigest() != q.name
        with pytest.raises(QuestionFormatError, match="not the SHA-1 of the file's content"):
            parse_question(path)
        renamed = write_named(tmp_path / "named", text)
        assert parse_question(renamed).context == q.context


def test_name_is_checked_against_the_sha1_of_the_content(tmp_path: Path) -> None:
    fields = random_question(random.Random(2))
    path = write_named(tmp_path, text_of(fields))
    parse_question(path)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"http", b"HTTP", 1))  # one changed byte, same name
    with pytest.raises(QuestionFormatError, match=r"not the SHA-1") as err:
        parse_question(path)
    assert str(path) in str(err.value) and err.value.path == path
    assert parse_question(path, verify_name=False).url.startswith("HTTP")
    odd = tmp_path / "question-1.question"
    odd.write_bytes(data)
    with pytest.raises(QuestionFormatError, match="40 lowercase hex"):
        parse_question(odd)
    assert parse_question(odd, verify_name=False).name == "question-1"


GOOD = {
    "url": "http://example.invalid/a",
    "context": "@entity3 met @entity7 in @entity9 .",
    "query": "@placeholder met @entity7",
    "answer": "@entity3",
    "mapping": ["@entity7:Bob", "@entity3:Ann", "@entity9:Rome"],
}


def malformed(**change: Any) -> str:
    fields = {**GOOD, **change}
    return question_text(fields["url"], fields["context"], fields["query"], fields["answer"], fields["mapping"])


MALFORMED = {
    "empty file": ("", "the file is empty"),
    "missing answer field": (
        "\n\n".join([GOOD["url"], GOOD["context"], GOOD["query"], "\n".join(GOOD["mapping"])]),
        "4 fields separated by blank lines, expected 5",
    ),
    "missing mapping": ("\n\n".join([GOOD["url"], GOOD["context"], GOOD["query"], GOOD["answer"]]), "4 fields"),
    "empty context": (malformed(context=" "), "the context field is empty"),
    "two-line question": (malformed(query="@placeholder met\n@entity7"), "question field spans 2 lines"),
    "no placeholder": (malformed(query="@entity3 met @entity7"), "no @placeholder"),
    "two placeholders": (malformed(query="@placeholder met @placeholder"), "2 @placeholder tokens"),
    "placeholder in context": (malformed(context="@placeholder met @entity3 ."), "context contains @placeholder"),
    "answer not in document": (malformed(answer="@entity5", mapping=[*GOOD["mapping"], "@entity5:Eve"]), "does not"),
    "answer not an entity": (malformed(answer="ann"), "not an entity marker"),
    "bad mapping line": (malformed(mapping=["@entity7 Bob", "@entity3:Ann", "@entity9:Rome"]), "mapping line 1"),
    "entity mapped twice": (malformed(mapping=[*GOOD["mapping"], "@entity3:Anne"]), "@entity3 is mapped twice"),
    "entity without mapping": (malformed(mapping=GOOD["mapping"][:2]), "@entity9 occurs in the context but has no"),
    "windows line endings": (malformed().replace("\n", "\r\n"), "carriage return"),
    "not utf-8": (malformed().encode("utf-8") + b"\xff", "not UTF-8"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_named_with_its_problem(tmp_path: Path, case: str) -> None:
    content, problem = MALFORMED[case]
    path = write_named(tmp_path, content)  # correctly named: the error is the structural one
    with pytest.raises(QuestionFormatError) as err:
        parse_question(path)
    assert str(err.value).startswith(f"{path}: ")
    assert problem in str(err.value)
    assert isinstance(err.value, ValueError)


def test_good_reference_file_parses(tmp_path: Path) -> None:
    q = parse_question(write_named(tmp_path, malformed()))  # the base of MALFORMED is well formed
    assert q.candidates() == [3, 7, 9] and q.entities["@entity9"] == "Rome"


def test_skip_malformed_counts_the_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_corpus(tmp_path / "c", 40, 10, 10)
    bad = [
        write_named(root / "questions" / "training", MALFORMED["no placeholder"][0]),
        write_named(root / "questions" / "training", MALFORMED["answer not in document"][0]),
        write_named(root / "questions" / "training", b""),
        write_named(root / "questions" / "validation", MALFORMED["missing answer field"][0]),
    ]
    with pytest.raises(QuestionFormatError) as err:
        make_dm(root).setup("fit")
    assert err.value.path in bad
    assert not list((root / ".cache").iterdir())  # no cache, not even a partial one
    with caplog.at_level(logging.WARNING, logger="bnlstm_lit.data.cnn"):
        dm = make_dm(root, skip_malformed=True)
        dm.setup("fit")
    stats = dm.cache_stats
    assert [stats[s]["skipped_malformed"] for s in ("train", "valid", "test")] == [3, 1, 0]
    assert [stats[s]["questions"] for s in ("train", "valid", "test")] == [40, 10, 10]
    assert sorted(stats["train"]["skipped_malformed_names"]) == sorted(p.name for p in bad[:3])
    assert "skipped 4 malformed question files" in caplog.text


# ------------------------------------------------------------------------------------------------------ test list


def test_official_test_list_and_its_digest(shared_data: Path, tmp_path: Path) -> None:
    path = shared_data / "cnn_sample" / "expected_cnn_test.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    names = read_test_list(path)
    assert len(names) == 3198 == cnn.OFFICIAL_TEST_COUNT
    assert names_digest(names) == OFFICIAL_TEST_DIGEST == hashlib.sha256(path.read_bytes()).hexdigest()
    assert TestList.from_file(path).is_official
    # a test folder holding exactly those names passes the digest-only check; one missing fails it
    test = tmp_path / "questions" / "test"
    test.mkdir(parents=True)
    for name in names:
        (test / name).touch()
    dm = CNNQuestions(data_dir=str(tmp_path))
    assert dm.check_complete().complete
    (test / names[7]).unlink()
    with pytest.raises(RuntimeError, match=r"holds 3197 questions, but the official CNN test list .* has 3198") as err:
        dm.check_complete()
    assert "test_list" in str(err.value)  # says how to see the names
    with pytest.raises(RuntimeError, match=rf"1 missing: {names[7]}"):
        CNNQuestions(data_dir=str(tmp_path), test_list=str(path)).check_complete()


def test_completeness_against_a_generated_list(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_corpus(tmp_path / "c", 20, 5, 12)
    listing = write_test_list(root)
    dm = make_dm(root, test_list=str(listing), completeness="error")
    dm.setup("test")
    report = dm.check_complete()
    assert report.complete and report.present == report.expected == 12
    test = root / "questions" / "test"
    removed = sorted(test.iterdir())[:3]
    for path in removed:
        path.unlink()
    extra = write_named(test, malformed())
    with pytest.raises(RuntimeError, match="3 missing: ") as err:
        make_dm(root, test_list=str(listing), completeness="error").setup("test")
    message = str(err.value)
    assert all(p.name in message for p in removed) and f"1 extra: {extra.name}" in message
    with caplog.at_level(logging.WARNING, logger="bnlstm_lit.data.cnn"):
        make_dm(root, test_list=str(listing), completeness="warn").setup("test")
    assert "3 missing" in caplog.text
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("not-a-name\n")
    with pytest.raises(ValueError, match="line 1 'not-a-name' is not a question file name"):
        read_test_list(bad_list)


# ------------------------------------------------------------------------------------------------------ download


def build_archive(root: Path, path: Path, hostile: bool = True) -> Path:
    """cnn.tgz as distributed (cnn/questions/<split>/...), plus hostile members when asked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root / "questions", arcname="cnn/questions")
        if hostile:
            payload = b"owned"

            def add(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = link
                info.size = 0 if link else len(payload)
                tar.addfile(info, None if link else io.BytesIO(payload))

            add("../evil")
            add("/tmp/absolute_evil")
            add("cnn/questions/training/../../../escape.question")
            add(f"cnn/questions/training/{'a' * 40}.question", tarfile.SYMTYPE, "/etc/passwd")
            add(f"cnn/questions/test/{'b' * 40}.question", tarfile.LNKTYPE, "../evil")
            add("cnn/questions/training/README")
    return path


def test_download_extracts_only_question_files(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "source", 16, 4, 6)
    archive = build_archive(source, tmp_path / "served" / "cnn.tgz")
    listing = write_test_list(source)
    data = tmp_path / "sandbox" / "data"
    dm = make_dm(data, download=True, mirrors=[archive.as_uri()], test_list=str(listing), completeness="error")
    dm.prepare_data()
    dm.setup("fit")
    for split, folder in SPLIT_FOLDERS.items():
        want = {p.name: p.read_bytes() for p in (source / "questions" / folder).iterdir()}
        got = {p.name: p.read_bytes() for p in (data / "questions" / folder).iterdir() if p.suffix == ".question"}
        assert got == want, split
    everything = {p.relative_to(tmp_path / "sandbox") for p in (tmp_path / "sandbox").rglob("*")}
    assert not any("evil" in str(p) or "escape" in str(p) or "README" in str(p) for p in everything)
    assert not any(p.is_symlink() for p in (tmp_path / "sandbox").rglob("*"))
    assert not (tmp_path / "evil").exists() and not Path("/tmp/absolute_evil").exists()
    assert not list(data.rglob("*.part"))
    assert (data / "cnn.tgz").is_file() and dm.corpus_ready()
    assert dm.cache_stats["train"]["questions"] == 16
    # the corpus is there: a second run neither downloads nor extracts
    archive.unlink()
    extracted = next((data / "questions" / "training").glob("*.question"))
    before = extracted.stat().st_mtime_ns
    make_dm(data, download=True, mirrors=[archive.as_uri()], test_list=str(listing)).prepare_data()
    assert extracted.stat().st_mtime_ns == before


def test_download_of_the_wrong_archive_extracts_nothing(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "source", 8, 2, 4)
    archive = build_archive(source, tmp_path / "cnn.tgz", hostile=False)
    other = write_corpus(tmp_path / "other", 1, 1, 4, seed=5)
    data = tmp_path / "data"
    dm = make_dm(data, download=True, mirrors=[archive.as_uri()], test_list=str(write_test_list(other)))
    with pytest.raises(RuntimeError, match="not the expected ones: .*4 missing.*4 extra"):
        dm.prepare_data()
    assert not data.exists() or not list(data.rglob("*.question"))
    assert not (data / "cnn.tgz").exists()
    # and the official reference refuses it too (its test split is not the official one)
    with pytest.raises(ValueError, match="not the expected ones.*holds 4 questions, but the official"):
        check_cnn_archive(archive)
    garbage = tmp_path / "garbage.tgz"
    garbage.write_bytes(b"<html>Google Drive can't scan this file for viruses</html>")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        check_cnn_archive(garbage)


# ------------------------------------------------------------------------------------------------------ cache


def test_cache_is_built_once(corpus: Path, tmp_path: Path, count_parses: Counter[str]) -> None:
    cache = tmp_path / "cache"
    first = make_dm(corpus, cache_dir=str(cache))
    first.setup("fit")
    assert count_parses["parse"] == 180  # every file, once
    second = make_dm(corpus, cache_dir=str(cache))
    sizes = (second.input_size, second.output_size, second.max_steps)  # before setup, from the cache
    second.setup("fit")
    assert count_parses["parse"] == 180  # the second run parsed nothing
    assert sizes == (first.input_size, first.output_size, first.max_steps)
    assert [p.name for p in cache.iterdir()] == [first.cache_path.name]  # type: ignore[union-attr]  # no temp left
    a, b = next(iter(first.val_dataloader())), next(iter(second.val_dataloader()))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_cache_is_rebuilt_when_a_file_or_a_setting_changes(tmp_path: Path, count_parses: Counter[str]) -> None:
    root = write_corpus(tmp_path / "c", 30, 6, 6)
    make_dm(root).setup("fit")
    assert count_parses["parse"] == 42
    make_dm(root).setup("fit")
    assert count_parses["parse"] == 42
    make_dm(root, min_count=2).setup("fit")  # a setting
    assert count_parses["parse"] == 84
    make_dm(root, relevant_sentences=2).setup("fit")
    assert count_parses["parse"] == 126
    make_dm(root, batch_size=4, shuffle_entities=False, seed=3).setup("fit")  # loading settings: same cache
    assert count_parses["parse"] == 126
    path = next((root / "questions" / "training").iterdir())
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a file touched
    make_dm(root).setup("fit")
    assert count_parses["parse"] == 168
    synthetic_corpus(tmp_path / "more", 1, 0, 0, seed=9)  # a file added
    shutil.move(next((tmp_path / "more" / "questions" / "training").iterdir()), root / "questions" / "training")
    dm = make_dm(root)
    dm.setup("fit")
    assert count_parses["parse"] == 211 and dm.cache_stats["train"]["questions"] == 31
    assert len([p for p in (root / ".cache").iterdir()]) == 5  # one cache per key, no temporary folder


def test_cached_ids_decode_to_the_parsed_tokens(loaded: CNNQuestions, corpus: Path) -> None:
    for split in ("train", "test"):
        dataset = loaded.datasets[split]
        names = loaded.names(split)
        assert len(names) == len(dataset)
        for i in (0, 7, len(dataset) - 1):
            q = parse_question(corpus / "questions" / SPLIT_FOLDERS[split] / names[i])
            item = dataset[i]  # a plain index: no entity shuffling
            assert loaded.decode(item.context) == list(q.context)  # min_count 1: every training word is known
            assert loaded.decode(item.query) == list(q.query)
            assert item.answer == q.answer_index and item.candidates.tolist() == q.candidates()
    assert loaded.num_entities == 1 + max(
        int(t[7:])
        for folder in SPLIT_FOLDERS.values()
        for p in (corpus / "questions" / folder).iterdir()
        for t in parse_question(p).context
        if t.startswith("@entity")
    )
    longest = max(len(parse_question(p).context) for p in (corpus / "questions" / "training").iterdir())
    assert loaded.max_steps == longest
    assert loaded.vocab_size == ENTITY_OFFSET + loaded.num_entities + len(loaded.words) == loaded.input_size


def test_vocabulary_comes_from_training_and_its_settings(tmp_path: Path) -> None:
    root = tmp_path / "c"
    folders = {s: root / "questions" / f for s, f in SPLIT_FOLDERS.items()}

    def add(split: str, context: str) -> None:
        write_named(folders[split], malformed(context=context + " @entity3 @entity7 @entity9 ."))

    add("train", "zebra zebra zebra apple apple mango")
    add("train", "zebra apple kiwi")
    add("valid", "zebra unseen")
    add("test", "apple durian")
    dm = make_dm(root)
    words = dm.words
    # frequency first (zebra 4, apple 3, '.' 2, met 2 -- 'met' from the two questions -- then ties alphabetically)
    assert words[:4] == ["zebra", "apple", ".", "met"] and words[4:] == ["kiwi", "mango"]
    assert "unseen" not in words and "durian" not in words
    dm.setup("test")
    assert dm.decode(dm.datasets["test"][0].context)[:2] == ["apple", "<unk>"]
    assert dm.datasets["valid"][0].context[1] == UNK
    assert make_dm(root, min_count=2).words == ["zebra", "apple", ".", "met"]
    assert make_dm(root, max_vocab_words=2).words == ["zebra", "apple"]
    assert make_dm(root, max_vocab_words=2).vocab_size == ENTITY_OFFSET + 10 + 2  # @entity9 -> K = 10


def test_state_dict_checks_the_vocabulary(loaded: CNNQuestions, corpus: Path, tmp_path: Path) -> None:
    state = loaded.state_dict()
    assert state["vocabulary"]["vocab_size"] == loaded.vocab_size
    same = make_dm(corpus, cache_dir=str(loaded.cache_dir))
    same.load_state_dict(state)
    other = make_dm(corpus, cache_dir=str(tmp_path / "cache"), max_vocab_words=5)
    with pytest.raises(ValueError, match="another vocabulary"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="no 'vocabulary'"):
        same.load_state_dict({})


# ------------------------------------------------------------------------------------------------------ batches


def test_entity_shuffle_is_a_consistent_bijection(loaded: CNNQuestions, corpus: Path) -> None:
    dataset = loaded.datasets["train"]
    assert dataset.shuffle_entities
    K = loaded.num_entities
    names = loaded.names("train")
    changed = 0
    for i in range(0, len(dataset), 5):
        plain = dataset[i]
        shuffled = dataset[(i, 3)]
        assert len(shuffled.context) == len(plain.context)
        is_entity = (plain.context >= ENTITY_OFFSET) & (plain.context < ENTITY_OFFSET + K)
        assert np.array_equal(shuffled.context[~is_entity], plain.context[~is_entity])  # words untouched
        mapping: dict[int, int] = {}
        for a, b in zip(plain.context[is_entity].tolist(), shuffled.context[is_entity].tolist(), strict=True):
            assert mapping.setdefault(a - ENTITY_OFFSET, b - ENTITY_OFFSET) == b - ENTITY_OFFSET  # a function
        assert len(set(mapping.values())) == len(mapping)  # injective: a bijection of the document's entities
        for a, b in zip(plain.query.tolist(), shuffled.query.tolist(), strict=True):
            if ENTITY_OFFSET <= a < ENTITY_OFFSET + K and a - ENTITY_OFFSET in mapping:
                assert b - ENTITY_OFFSET == mapping[a - ENTITY_OFFSET]
        assert shuffled.answer == mapping[plain.answer]
        assert sorted(shuffled.candidates.tolist()) == sorted(mapping[c] for c in plain.candidates.tolist())
        changed += mapping != {k: k for k in mapping}
        # the synthetic rule still answers it: the entity right after the question's cue word
        cue = next(t for t in parse_question(corpus / "questions/training" / names[i]).query if t in synthetic._CUES)
        tokens = loaded.decode(shuffled.context)
        assert tokens[tokens.index(cue) + 1] == f"@entity{shuffled.answer}"
        # deterministic per (seed, epoch, example); another epoch relabels differently
        again = dataset[(i, 3)]
        assert np.array_equal(again.context, shuffled.context) and again.answer == shuffled.answer
    assert changed >= 20
    epochs = [dataset[(0, e)].answer for e in range(8)]
    assert len(set(epochs)) > 1


def test_batches_have_the_documented_format(loaded: CNNQuestions) -> None:
    K = loaded.num_entities
    for loader, size in ((loaded.train_dataloader(), 8), (loaded.val_dataloader(), 8)):
        batch = next(iter(loader))
        assert isinstance(batch, QABatch)
        assert batch.context.dtype == batch.query.dtype == batch.answer.dtype == torch.int64
        assert batch.context_lengths.dtype == batch.query_lengths.dtype == batch.example.dtype == torch.int64
        assert batch.candidates.dtype == torch.bool and batch.candidates.shape == (size, K)
        assert batch.context.shape == (size, int(batch.context_lengths.max()))
        assert batch.query.shape == (size, int(batch.query_lengths.max()))
        steps = torch.arange(batch.context.shape[1])
        inside = steps[None, :] < batch.context_lengths[:, None]
        assert bool((batch.context[inside] > 0).all()) and bool((batch.context[~inside] == 0).all())
        assert bool(((batch.query == PLACEHOLDER).sum(1) == 1).all())
        assert bool(batch.candidates[torch.arange(size), batch.answer].all())  # the answer is a candidate
        assert bool((batch.answer < K).all())
    assert len(loaded.train_dataloader()) == 120 // 8
    assert sum(len(b.answer) for b in loaded.test_dataloader()) == 30  # evaluation reads every question


def test_bucketing_gives_less_padding(tmp_path: Path) -> None:
    lengths = np.random.default_rng(0).integers(10, 400, size=1000)

    def padding(bucket_batches: int) -> int:
        sampler = BucketSampler(lengths, 16, bucket_batches, seed=1)
        order = [i for i, _ in sampler]
        assert sorted(order) == list(range(1000))  # every example once per epoch
        batches = np.asarray(order[: 1000 // 16 * 16]).reshape(-1, 16)
        return int((lengths[batches].max(1, keepdims=True) - lengths[batches]).sum())

    assert padding(20) * 5 < padding(1)
    sampler = BucketSampler(lengths, 16, 20, seed=1)
    assert np.array_equal(sampler.order(2), sampler.order(2)) and not np.array_equal(sampler.order(2), sampler.order(3))
    sampler.set_epoch(2)
    sampler.skip(48)  # a run resumed after 3 batches reads the rest of the epoch in the same order
    assert [i for i, e in sampler] == sampler.order(2)[48:].tolist()
    assert {e for _, e in sampler} == {2}
    # through the DataModule: bucketed training batches are padded less than unbucketed ones
    root = tmp_path / "c"
    synthetic_corpus(root, 200, 4, 4, seed=3, min_entities=1, max_entities=12)

    def loader_padding(bucket_batches: int) -> int:
        dm = make_dm(root, bucket_batches=bucket_batches)
        dm.setup("fit")
        return sum(int((b.context == 0).sum()) for b in dm.train_dataloader())

    assert loader_padding(25) * 2 < loader_padding(1)


def test_relevant_sentences_keep_k_sentences_in_order(tmp_path: Path) -> None:
    context = toks("a b c . ( @entity1 ) met d . e f ! @entity2 met rome ? x y . @entity1 went to rome . tail")
    query = toks("@placeholder met @entity2 in rome")
    # scores: s0 0, s1 {met} 1, s2 0, s3 {@entity2, met, rome} 3, s4 0, s5 {rome} 1, tail 0
    assert select_sentences(context, query, 1) == toks("@entity2 met rome ?")
    assert select_sentences(context, query, 2) == toks("( @entity1 ) met d . @entity2 met rome ?")
    assert select_sentences(context, query, 3) == toks(
        "( @entity1 ) met d . @entity2 met rome ? @entity1 went to rome ."
    )
    assert select_sentences(context, query, 7) == context
    root = write_corpus(tmp_path / "c", 40, 5, 5)
    full, reduced = make_dm(root), make_dm(root, relevant_sentences=2)
    full.setup("fit")
    reduced.setup("fit")
    assert reduced.max_steps < full.max_steps
    names = reduced.names("train")
    assert names == full.names("train")
    for i in range(0, 40, 4):
        kept = cnn.split_sentences(reduced.decode(reduced.datasets["train"][i].context))  # no entity shuffling
        sentences = cnn.split_sentences(parse_question(root / "questions" / "training" / names[i]).context)
        assert len(kept) == 2 and len(sentences) > 2
        positions = [sentences.index(sentence) for sentence in kept]  # whole sentences of the document ...
        assert positions == sorted(positions)  # ... in document order


def test_long_contexts_are_truncated_or_skipped(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "c", 60, 10, 10)
    lengths = [len(parse_question(p).context) for p in (root / "questions" / "training").iterdir()]
    limit = int(np.median(lengths))
    truncated = make_dm(root, max_context_tokens=limit)
    assert truncated.max_steps == limit and truncated.cache_stats["train"]["questions"] == 60
    skipped = make_dm(root, max_context_tokens=limit, long_contexts="skip")
    stats = skipped.cache_stats
    assert stats["train"]["questions"] == sum(n <= limit for n in lengths)
    assert stats["train"]["skipped_long"] == sum(n > limit for n in lengths)
    assert stats["valid"]["questions"] == 10  # evaluation keeps every question (truncated)


def test_synthetic_corpus_follows_its_rule(corpus: Path) -> None:
    cue_right = frequent_right = total = 0
    for folder in SPLIT_FOLDERS.values():
        for path in (corpus / "questions" / folder).iterdir():
            q = parse_question(path)  # exact format, named by SHA-1
            (cue,) = [t for t in q.query if t in synthetic._CUES]
            assert q.context.count(cue) == 1
            cue_right += q.context[q.context.index(cue) + 1] == q.answer
            counts = Counter(t for t in q.context if t.startswith("@entity"))
            assert set(counts.values()) == {2}  # every entity twice: frequency says nothing
            frequent_right += counts.most_common(1)[0][0] == q.answer
            total += 1
    assert cue_right == total == 180
    assert frequent_right < 0.4 * total  # about 1/n by chance


def test_short_synthetic_corpus_keeps_the_rule_with_bounded_lengths(tmp_path: Path) -> None:
    """max_filler=1: every cue sentence is <filler> <cue> @entity . and every other mention <filler> @entity ., the
    question <filler> <cue> @placeholder; the answer still follows the question's cue."""
    synthetic_corpus(tmp_path, 40, 0, 0, seed=5, max_filler=1)
    for path in (tmp_path / "questions" / SPLIT_FOLDERS["train"]).iterdir():
        q = parse_question(path)
        n = len(q.entities)
        assert len(q.context) == 4 * n + 3 * n and len(q.query) == 3 and q.query[2] == "@placeholder"
        cue = q.query[1]
        assert cue in synthetic._CUES and q.context[q.context.index(cue) + 1] == q.answer
    with pytest.raises(ValueError, match="max_filler >= 1"):
        synthetic_corpus(tmp_path / "bad", 1, 0, 0, max_filler=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"relevant_sentences": 0}, "relevant_sentences"),
        ({"max_context_tokens": -1}, "max_context_tokens"),
        ({"long_contexts": "drop"}, "long_contexts"),
        ({"completeness": "maybe"}, "completeness"),
        ({"bucket_batches": 0}, "bucket_batches"),
    ],
)
def test_bad_arguments_name_the_flag(tmp_path: Path, kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name} \(data.init_args.{name}\)"):
        CNNQuestions(data_dir=str(tmp_path), **kwargs)


def test_missing_corpus_says_where_and_how(tmp_path: Path) -> None:
    dm = CNNQuestions(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="questions/training.*download=True"):
        _ = dm.input_size
    with pytest.raises(RuntimeError, match=r"call setup\('fit'\) first"):
        dm.train_dataloader()


class _Recorder(L.LightningModule):
    """Records every training batch; a bag of embeddings restricted to the candidates."""

    def __init__(self, vocab_size: int, num_entities: int) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, 4)
        self.out = torch.nn.Linear(4, num_entities)
        self.batches: list[tuple[int, list[int], list[int]]] = []

    def training_step(self, batch: QABatch, batch_idx: int) -> torch.Tensor:
        self.batches.append((self.current_epoch, batch.example.tolist(), batch.answer.tolist()))
        logits = self.out(self.embedding(batch.context).mean(1)).masked_fill(~batch.candidates, -1e9)
        return torch.nn.functional.cross_entropy(logits, batch.answer)

    def validation_step(self, batch: QABatch, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_reads_each_epoch_in_its_bucketed_order(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, cache_dir=str(tmp_path / "cache"), batch_size=16, num_workers=1, bucket_batches=4)
    model = _Recorder(dm.input_size, dm.output_size)  # sizes before setup, as the CLI links them
    trainer = L.Trainer(
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    sampler = BucketSampler(dm.datasets["train"].context_lengths, 16, 4, seed=0)
    for epoch in (0, 1):
        examples = [e for ep, batch, _ in model.batches if ep == epoch for e in batch]
        assert examples == sampler.order(epoch)[: 120 // 16 * 16].tolist()  # Lightning set the epoch
    answers: dict[int, dict[int, int]] = {0: {}, 1: {}}
    for ep, batch, ans in model.batches:
        answers[ep].update(zip(batch, ans, strict=True))
    both = set(answers[0]) & set(answers[1])
    assert len(both) > 90
    assert sum(answers[0][e] != answers[1][e] for e in both) > len(both) // 2  # relabelled anew each epoch
