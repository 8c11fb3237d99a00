"""The Docker image's recipe, checked without Docker: ``docker/Dockerfile``, ``.dockerignore`` and ``docker/README.md``.

Docker cannot run where the suite runs, so this reads the files: a small Dockerfile parser (line continuations,
comments, JSON and shell forms, ARG scoping) and a ``.dockerignore`` matcher with Docker's semantics (patterns
anchored at the context root, ``**``, a pattern that matches a folder excludes what is inside, ``!`` re-includes, the
last match wins). Checked: only real instructions; FROM takes the BASE_IMAGE argument declared before it; every
variable is declared where it is used; everything COPY names exists in the repository and reaches the build context;
no data is copied; torch is installed (from TORCH_INDEX_URL) before the project; a non-root USER before the ENTRYPOINT;
the ENTRYPOINT is the ``bnlstm-lit`` console script of pyproject.toml, importable and callable; the README's configs,
build arguments, image tags and mounts agree with the Dockerfile and the configs.
"""

from __future__ import annotations

import importlib
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKER_README = ROOT / "docker" / "README.md"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

#: Every Dockerfile instruction (https://docs.docker.com/reference/dockerfile/), MAINTAINER included (deprecated).
KNOWN_INSTRUCTIONS = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}
#: Instructions whose argument may be a JSON array (exec form).
JSON_FORM = {"ADD", "CMD", "COPY", "ENTRYPOINT", "RUN", "SHELL", "VOLUME"}
#: Instructions that take leading ``--flag[=value]`` options.
FLAGGED = {"ADD", "COPY", "FROM", "RUN", "HEALTHCHECK"}
#: Environment variables every base image defines (may be referenced without an ARG/ENV in the Dockerfile).
BASE_ENV = {"PATH", "HOME", "HOSTNAME"}

VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::[-+][^}]*)?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


# ---------------------------------------------------------------------------------------------------------------------
# Dockerfile parser


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    flags: tuple[str, ...]  # leading --name[=value] options (COPY --chown=..., FROM --platform=...)
    args: str  # the argument text after the flags, continuations joined (shell form)
    exec_form: tuple[str, ...] | None  # the JSON array, where the argument is one
    line: int  # 1-based line of the instruction's first line


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comment lines (also inside continuations) and blank lines dropped, lines ending in
    a backslash joined with the next, JSON arrays decoded for the instructions that accept them."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment and empty lines, also between continued lines
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        instructions.append(_instruction(" ".join(part for part in pending if part), start))
        pending = []
    if pending:
        raise ValueError(f"line {start}: the last instruction ends with a line continuation")
    return instructions


def _instruction(text: str, line: int) -> Instruction:
    keyword, _, rest = text.partition(" ")
    if not re.fullmatch(r"[A-Za-z]+", keyword):
        raise ValueError(f"line {line}: {keyword!r} is not an instruction")
    keyword = keyword.upper()
    rest = rest.strip()
    flags: list[str] = []
    if keyword in FLAGGED:
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
    exec_form = None
    if keyword in JSON_FORM and rest.startswith("["):
        try:
            decoded = json.loads(rest)
        except json.JSONDecodeError:
            decoded = None  # not valid JSON: Docker runs it in shell form
        if isinstance(decoded, list) and all(isinstance(item, str) for item in decoded):
            exec_form = tuple(decoded)
    return Instruction(keyword, tuple(flags), rest, exec_form, line)


def parse_assignments(text: str) -> dict[str, str]:
    """``ENV``/``ARG``/``LABEL`` arguments: ``K=V K2="V 2"`` (or the legacy ``ENV K V``); an ``ARG`` without a default
    maps to ``""``."""
    tokens = shlex.split(text)
    if len(tokens) >= 2 and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}  # legacy ENV K V
    pairs = {}
    for token in tokens:
        name, _, value = token.partition("=")
        pairs[name] = value
    return pairs


def expand(text: str, variables: dict[str, str]) -> str:
    """Docker's variable substitution: ``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME:+alternative}``."""

    def substitute(match: re.Match[str]) -> str:
        whole = match.group(0)
        name = match.group("braced") or match.group("bare")
        value = variables.get(name, "")
        if whole.startswith("${") and ":-" in whole:
            return value or whole[whole.index(":-") + 2 : -1]
        if whole.startswith("${") and ":+" in whole:
            return whole[whole.index(":+") + 2 : -1] if value else ""
        return value

    return VARIABLE.sub(substitute, text)


@dataclass(frozen=True)
class Build:
    """A parsed single-stage Dockerfile with its variables resolved to their defaults."""

    instructions: list[Instruction]
    global_args: dict[str, str]  # ARGs before the FROM
    stage_args: dict[str, str]  # ARGs after the FROM (defaults; a redeclared global ARG inherits its value)
    env: dict[str, str]  # ENV after the FROM

    def index(self, keyword: str) -> list[int]:
        return [i for i, ins in enumerate(self.instructions) if ins.keyword == keyword]

    def variables_at(self, position: int) -> dict[str, str]:
        """ARG and ENV values in scope just before instruction ``position`` (ENV wins over ARG, as in Docker)."""
        scope: dict[str, str] = {}
        in_stage = False
        for ins in self.instructions[:position]:
            if ins.keyword == "FROM":
                in_stage, scope = True, {}
            elif ins.keyword == "ARG":
                for name, value in parse_assignments(ins.args).items():
                    scope[name] = value or (self.global_args.get(name, "") if in_stage else "")
            elif ins.keyword == "ENV":
                for name, value in parse_assignments(ins.args).items():
                    scope[name] = expand(value, scope)
        return scope

    def workdir_at(self, position: int) -> str:
        workdir = "/"
        for i in self.index("WORKDIR"):
            if i < position:
                target = expand(self.instructions[i].args, self.variables_at(i))
                workdir = posixpath.normpath(posixpath.join(workdir, target))
        return workdir

    def copies(self) -> list[tuple[int, Instruction, list[str], str]]:
        """``(position, instruction, sources, destination)`` of every COPY/ADD from the build context, variables
        expanded and the destination made absolute against the WORKDIR in effect."""
        found = []
        for i, ins in enumerate(self.instructions):
            if ins.keyword not in {"COPY", "ADD"} or any(flag.startswith("--from") for flag in ins.flags):
                continue
            words = list(ins.exec_form) if ins.exec_form is not None else ins.args.split()
            words = [expand(word, self.variables_at(i)) for word in words]
            assert len(words) >= 2, f"line {ins.line}: {ins.keyword} needs a source and a destination"
            *sources, destination = words
            absolute = posixpath.join(self.workdir_at(i), destination)
            if destination.endswith("/"):
                absolute += "/"
            found.append((i, ins, sources, absolute))
        return found


def load_build(text: str) -> Build:
    instructions = parse_dockerfile(text)
    froms = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    first = froms[0] if froms else len(instructions)
    global_args: dict[str, str] = {}
    for ins in instructions[:first]:
        global_args.update(parse_assignments(ins.args))
    stage_args: dict[str, str] = {}
    env: dict[str, str] = {}
    for ins in instructions[first:]:
        if ins.keyword == "ARG":
            for name, value in parse_assignments(ins.args).items():
                stage_args[name] = value or global_args.get(name, "")
        elif ins.keyword == "ENV":
            env.update(parse_assignments(ins.args))
    return Build(instructions, global_args, stage_args, env)


# ---------------------------------------------------------------------------------------------------------------------
# .dockerignore matcher


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Translate a .dockerignore pattern (Go filepath.Match plus ``**``) to a regex over ``/``-separated paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body[:1] in {"^", "!"} else body) + "]")
            i = end + 1
        elif pattern[i] == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def read_dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """``(negated, regex)`` for each pattern line, in order; comments and blank lines skipped, patterns cleaned as
    Docker does (leading ``/`` dropped, ``.``/``..`` segments resolved)."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if negated else line).lstrip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def is_excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether ``path`` (relative to the context root) is left out of the build context: the last rule that matches
    the path or one of its parent folders decides."""
    parts = posixpath.normpath(path).split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


# ---------------------------------------------------------------------------------------------------------------------
# README helpers


def code_commands(markdown: str) -> list[str]:
    """The shell commands in the fenced code blocks of a markdown text: continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"^[ \t]*```[a-z]*\n(.*?)^[ \t]*```", markdown, flags=re.MULTILINE | re.DOTALL):
        joined = re.sub(r"[ \t]*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def build_args(command: str) -> dict[str, str]:
    return dict(re.findall(r"--build-arg\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)", command))


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def build() -> Build:
    return load_build(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    return read_dockerignore(DOCKERIGNORE.read_text())


@pytest.fixture(scope="module")
def readme() -> str:
    return DOCKER_README.read_text()


@pytest.fixture(scope="module")
def readme_commands(readme: str) -> list[str]:
    return code_commands(readme)


# ---------------------------------------------------------------------------------------------------------------------
# The helpers themselves (they decide every other test)


def test_parser_joins_continuations_drops_comments_and_reads_both_forms() -> None:
    text = (
        "# syntax comment\n"
        "ARG BASE_IMAGE=python:3.11-slim\n"
        "FROM ${BASE_IMAGE}\n"
        "RUN set -eux; \\\n"
        "    # a comment inside a continuation\n"
        "\n"
        "    echo one; \\\n"
        "    echo two\n"
        "COPY --chown=1000:1000 a b /dst/\n"
        'ENV A=1 \\\n    B="two words" \\\n    C=$A\n'
        'ENTRYPOINT ["tool", "--flag"]\n'
        "CMD [not json\n"
        "run echo lower case\n"
    )
    instructions = parse_dockerfile(text)
    assert [ins.keyword for ins in instructions] == ["ARG", "FROM", "RUN", "COPY", "ENV", "ENTRYPOINT", "CMD", "RUN"]
    run = instructions[2]
    assert run.args == "set -eux; echo one; echo two" and run.exec_form is None and run.line == 4
    assert instructions[3].flags == ("--chown=1000:1000",) and instructions[3].args == "a b /dst/"
    assert parse_assignments(instructions[4].args) == {"A": "1", "B": "two words", "C": "$A"}
    assert instructions[5].exec_form == ("tool", "--flag")
    assert instructions[6].exec_form is None  # invalid JSON: shell form
    built = load_build(text)
    assert built.global_args == {"BASE_IMAGE": "python:3.11-slim"}
    assert built.variables_at(5)["C"] == "1"
    assert expand("${X:-fallback} $X ${Y:+alt}", {"Y": "y"}) == "fallback  alt"
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM x\nRUN echo \\\n")
    with pytest.raises(ValueError, match="not an instruction"):
        parse_dockerfile("FROM x\n--bad thing\n")


def test_dockerignore_matcher_follows_docker_semantics() -> None:
    rules = read_dockerignore("# comment\n/data\n**/__pycache__\n*.ckpt\n**/*.pt\nrun?\nlogs\n!logs/keep.txt\n")
    assert is_excluded("data", rules) and is_excluded("data/ptb/ptb.train.txt", rules)  # a folder and what it holds
    assert not is_excluded("src/data/base.py", rules)  # anchored at the root
    assert is_excluded("__pycache__/x.pyc", rules) and is_excluded("src/pkg/__pycache__/x.pyc", rules)
    assert is_excluded("model.ckpt", rules) and not is_excluded("other/model.ckpt", rules)  # `*` stays in one folder
    assert is_excluded("out.pt", rules) and is_excluded("runs/a/b/out.pt", rules)
    assert is_excluded("runs/x", rules) and not is_excluded("runs2", rules)
    assert is_excluded("logs/a.txt", rules) and not is_excluded("logs/keep.txt", rules)  # the last match wins


def test_readme_command_extraction() -> None:
    markdown = (
        "text\n```bash\n# comment\ndocker build -f a \\\n  --build-arg X=1 .   # trailing\n```\n  ```\n  ls\n  ```\n"
    )
    assert code_commands(markdown) == ["docker build -f a --build-arg X=1 .", "ls"]
    assert build_args("docker build --build-arg X=1 --build-arg Y=$(id -u) .") == {"X": "1", "Y": "$(id"}


# ---------------------------------------------------------------------------------------------------------------------
# The Dockerfile


def test_dockerfile_has_only_known_instructions_and_starts_with_from(build: Build) -> None:
    keywords = [ins.keyword for ins in build.instructions]
    assert set(keywords) <= KNOWN_INSTRUCTIONS, f"unknown instructions: {set(keywords) - KNOWN_INSTRUCTIONS}"
    first_other = next(ins for ins in build.instructions if ins.keyword != "ARG")
    assert first_other.keyword == "FROM", "only ARG may come before the first FROM"
    for keyword in ("RUN", "COPY", "WORKDIR", "USER", "ENTRYPOINT", "CMD"):
        assert keyword in keywords, f"no {keyword}"
    assert keywords.count("ENTRYPOINT") == 1 and keywords.count("CMD") == 1


def test_from_takes_the_base_image_argument_declared_before_it(build: Build) -> None:
    froms = [build.instructions[i] for i in build.index("FROM")]
    assert len(froms) == 1, "one stage: the CPU variant is a build argument"
    image = froms[0].args.split()[0]
    assert image in {"${BASE_IMAGE}", "$BASE_IMAGE"}, f"FROM {image}: expected the BASE_IMAGE argument"
    default = build.global_args.get("BASE_IMAGE")
    assert default, "ARG BASE_IMAGE=<default> must be declared before FROM"
    repository, _, tag = default.partition(":")
    assert repository == "nvidia/cuda" and "-runtime-" in tag and "devel" not in tag, default
    cuda_major = tag.split(".")[0]
    index_default = build.stage_args.get("TORCH_INDEX_URL", "")
    assert re.fullmatch(rf"https://download\.pytorch\.org/whl/cu{cuda_major}\d+", index_default), (
        f"the default torch index {index_default!r} does not match the CUDA {cuda_major} base image"
    )


def test_every_variable_is_declared_where_it_is_used(build: Build) -> None:
    first_from = build.index("FROM")[0]
    for i, ins in enumerate(build.instructions):
        if ins.keyword == "ARG" or ins.exec_form is not None:
            continue  # JSON form is not expanded
        scope = build.global_args if i <= first_from else build.variables_at(i)
        names = {m.group("braced") or m.group("bare") for m in VARIABLE.finditer(ins.args)}
        if ins.keyword == "RUN":  # the shell's own variables are lower case; the build's are upper case
            names = {name for name in names if name.isupper()}
        missing = names - set(scope) - BASE_ENV
        assert not missing, f"line {ins.line}: {ins.keyword} uses {sorted(missing)}, not declared in its scope"


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_run_commands_are_valid_shell(build: Build) -> None:
    """Every shell-form RUN parses with ``sh -n`` (dash on Debian/Ubuntu, as in both base images)."""
    for i in build.index("RUN"):
        ins = build.instructions[i]
        assert ins.exec_form is None, f"line {ins.line}: exec-form RUN does not expand the build arguments"
        result = subprocess.run(["sh", "-n", "-c", ins.args], capture_output=True, text=True)
        assert result.returncode == 0, f"line {ins.line}: {result.stderr.strip()}"


def _tracked_files() -> set[str] | None:
    """The repository's files under version control (None outside a git checkout: every file counts)."""
    import subprocess

    try:
        done = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return {name for name in done.stdout.decode().split("\0") if name}


def test_every_copied_path_exists_and_reaches_the_build_context(build: Build, ignore_rules) -> None:
    copies = build.copies()
    assert copies, "nothing is copied"
    for _, ins, sources, _ in copies:
        for source in sources:
            assert not re.match(r"[a-z]+://", source), f"line {ins.line}: {source} is fetched at build time"
            path = ROOT / source
            assert path.exists(), f"line {ins.line}: {source} does not exist in the repository"
            assert not is_excluded(source, ignore_rules), f"line {ins.line}: {source} is excluded by .dockerignore"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            tracked = _tracked_files()  # build outputs (an editable install's egg-info) are rightly ignored
            shipped = [
                p for p in files
                if "__pycache__" not in p.parts and p.suffix not in {".pyc", ".pyo"}
                and (tracked is None or p.relative_to(ROOT).as_posix() in tracked)
            ]  # fmt: skip
            assert shipped, f"line {ins.line}: {source} holds no files"
            for file in shipped:
                relative = file.relative_to(ROOT).as_posix()
                assert not is_excluded(relative, ignore_rules), f"{relative} would be left out of the image"


def test_the_package_sources_and_configs_are_copied(build: Build) -> None:
    copied = {source.rstrip("/"): destination for _, _, sources, destination in build.copies() for source in sources}
    assert {"pyproject.toml", "README.md", "src", "configs"} <= set(copied), sorted(copied)
    workdir = build.workdir_at(len(build.instructions))
    assert workdir == "/workspace"
    assert copied["configs"].rstrip("/") in {f"{workdir}/configs", workdir + "/"}, (
        "configs must land in WORKDIR/configs, so that --config configs/... works as in the repository"
    )


def test_no_data_and_no_build_context_wholesale_copy(build: Build, ignore_rules) -> None:
    for _, ins, sources, _ in build.copies():
        for source in sources:
            normal = posixpath.normpath(source)
            assert normal not in {".", "*"}, f"line {ins.line}: copies the whole context, data folders included"
            assert not normal.startswith(("..", "/")), f"line {ins.line}: {source} is outside the build context"
            first = normal.split("/")[0]
            assert first not in {"data", "shared", "runs", "lightning_logs"}, f"line {ins.line}: copies {source}"
    for path in (
        "data",
        "data/ptb/ptb.train.txt",
        "shared/data/mnist/train-images-idx3-ubyte.gz",
        "runs/ptb_bnlstm/lightning_logs/version_0/checkpoints/last.ckpt",
        "lightning_logs/version_0/hparams.yaml",
        "some/where/model.ckpt",
        ".git/HEAD",
        "venv/bin/python",
        ".venv/bin/python",
        "src/bnlstm_lit/__pycache__/cli.cpython-311.pyc",
        "tests/.pytest_cache/v/cache",
        "text8.zip",
    ):
        assert is_excluded(path, ignore_rules), f".dockerignore lets {path} into the build context"


def test_torch_is_installed_from_the_index_before_the_project(build: Build) -> None:
    runs = [(i, build.instructions[i].args) for i in build.index("RUN")]
    torch_runs = [
        i
        for i, text in runs
        if "pip install" in text
        and re.search(r"--index-url[ =]\"?\$\{?TORCH_INDEX_URL\}?", text)
        and re.search(r"torch==\$\{?TORCH_VERSION\}?", text)
    ]
    assert len(torch_runs) == 1, "one RUN installs torch==${TORCH_VERSION} with --index-url ${TORCH_INDEX_URL}"
    project_dir = next(dest for _, _, sources, dest in build.copies() if "pyproject.toml" in sources).rstrip("/")
    install = re.compile(re.escape(project_dir) + r"(?:\[(?P<extras>[^\]]*)\])?(?=[\"'\s]|$)")
    project_runs = [(i, m) for i, text in runs if "pip install" in text for m in [install.search(text)] if m]
    assert len(project_runs) == 1, f"one RUN pip-installs the copied project ({project_dir})"
    project_run, match = project_runs[0]
    assert torch_runs[0] < project_run, "torch must be installed before the project"
    assert "plots" in (match.group("extras") or "").split(","), "the `plots` extra (matplotlib) is installed"
    assert re.search(r"torch==\$\{?TORCH_VERSION\}?", build.instructions[project_run].args), (
        "the project install pins the torch already installed, so pip cannot swap it for another build"
    )
    src_copy = next(i for i, _, sources, _ in build.copies() if "src" in sources)
    assert torch_runs[0] < src_copy < project_run, "torch's layer must not depend on the sources"


def test_torch_version_is_the_one_the_project_tests(build: Build) -> None:
    pins = set(re.findall(r"torch==([0-9][0-9.]*[0-9])", (ROOT / "README.md").read_text()))
    assert len(pins) == 1, f"the main README pins torch inconsistently: {pins}"
    assert build.stage_args.get("TORCH_VERSION") == pins.pop()


def test_environment_workdir_and_virtualenv(build: Build) -> None:
    assert build.env.get("PYTHONUNBUFFERED") == "1"
    assert build.env.get("PIP_NO_CACHE_DIR") == "1"
    assert build.env.get("PATH", "").startswith("/opt/venv/bin:"), "the virtual environment's bin comes first"
    assert any("-m venv /opt/venv" in build.instructions[i].args for i in build.index("RUN"))
    assert [build.instructions[i].args for i in build.index("WORKDIR")] == ["/workspace"]


def test_a_non_root_user_is_created_and_set_before_the_entrypoint(build: Build) -> None:
    entrypoint = build.index("ENTRYPOINT")[0]
    users = [i for i in build.index("USER") if i < entrypoint]
    assert users, "no USER before ENTRYPOINT: the image would run as root"
    last = users[-1]
    assert all(i < entrypoint for i in build.index("USER")), "USER changed after the ENTRYPOINT"
    user = expand(build.instructions[last].args, build.variables_at(last))
    name, _, group = user.partition(":")
    assert name and name not in {"root", "0"}, f"USER {user} is root"
    assert group not in {"root", "0"}, f"USER {user} has the root group"
    created = [
        i
        for i in build.index("RUN")
        if i < last and "useradd" in build.instructions[i].args and "${USER_UID}" in build.instructions[i].args
    ]
    assert created, "the user is never created (useradd --uid ${USER_UID})"
    assert build.stage_args.get("USER_UID", "0") not in {"", "0"} and build.stage_args.get("USER_GID") not in {"", "0"}


def test_entrypoint_is_the_console_script_and_importable(build: Build) -> None:
    entrypoint = build.instructions[build.index("ENTRYPOINT")[0]]
    assert entrypoint.exec_form is not None, "ENTRYPOINT must be JSON (exec form): signals reach the process"
    assert entrypoint.exec_form[0] == "bnlstm-lit"
    cmd = build.instructions[build.index("CMD")[0]]
    assert cmd.exec_form == ("--help",), "CMD supplies the default arguments of the entry point in exec form"
    toml = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    scripts = toml.loads(PYPROJECT.read_text())["project"].get("scripts", {})
    assert "bnlstm-lit" in scripts, "bnlstm-lit is not a [project.scripts] entry of pyproject.toml"
    module_name, _, attribute = scripts["bnlstm-lit"].partition(":")
    assert module_name and attribute, scripts["bnlstm-lit"]
    target = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    assert callable(target)


# ---------------------------------------------------------------------------------------------------------------------
# docker/README.md


def test_readme_configs_exist_and_resolve_inside_the_mounts(readme: str) -> None:
    configs = set(re.findall(r"(?<![\w/])configs/[\w./-]+\.ya?ml", readme))
    assert "configs/ptb_bnlstm.yaml" in configs
    missing = sorted(c for c in configs if not (ROOT / c).is_file())
    assert not missing, f"docker/README.md names configs that do not exist: {missing}"
    # The README says the configs' relative data_dir / default_root_dir land in the /workspace/data and
    # /workspace/runs mounts with no override: check it for every shipped experiment config.
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        data_dir = ((config.get("data") or {}).get("init_args") or {}).get("data_dir")
        root_dir = (config.get("trainer") or {}).get("default_root_dir")
        assert data_dir is None or data_dir.startswith("data/"), f"{path.name}: data_dir {data_dir}"
        assert root_dir is None or root_dir.startswith("runs/"), f"{path.name}: default_root_dir {root_dir}"


def test_readme_build_arguments_are_declared_and_the_defaults_documented(build: Build, readme, readme_commands):
    declared = set(build.global_args) | set(build.stage_args)
    builds = [c for c in readme_commands if c.startswith("docker build")]
    assert len(builds) >= 2, "GPU and CPU build commands"
    for command in builds:
        assert "-f docker/Dockerfile" in command and command.endswith(" ."), (
            f"build from the repository root: {command}"
        )
        unknown = set(build_args(command)) - declared
        assert not unknown, f"{command}: build arguments the Dockerfile does not declare: {unknown}"
    cpu = [build_args(c) for c in builds if re.search(r"-t\s+\S*cpu\b", c)]
    assert len(cpu) == 1, "one CPU build command (tagged ...cpu)"
    assert cpu[0].get("BASE_IMAGE", "").startswith("python:3.1"), cpu[0]
    assert cpu[0].get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu", cpu[0]
    lines = DOCKERFILE.read_text().splitlines()
    header = "\n".join(lines[: next(n for n, line in enumerate(lines) if not line.startswith("#"))])
    assert build_args(header) == cpu[0], "the CPU command in the Dockerfile's header comment differs from the README's"
    for name in ("BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_VERSION", "USER_UID"):
        default = build.global_args.get(name) or build.stage_args.get(name)
        assert f"`{default}`" in readme, f"the README does not give {name}'s default `{default}`"


def test_readme_run_commands_use_built_images_and_mount_data_and_runs(build: Build, readme, readme_commands):
    tags = {m for c in readme_commands if c.startswith("docker build") for m in re.findall(r"-t\s+(\S+)", c)}
    runs = [c for c in readme_commands if c.startswith("docker run")]
    assert runs
    workdir = build.workdir_at(len(build.instructions))
    for command in runs:
        images = [t for t in shlex.split(command) if t.startswith("bnlstm-lit:")]
        assert len(images) == 1 and images[0] in tags, f"{command}: not one of the images built above {tags}"
        for target in re.findall(r"-v\s+\S+:(/[^\s\"']+)", command):
            assert target.startswith(workdir + "/"), f"{command}: mounts outside WORKDIR ({target})"
    gpu_fits = [c for c in runs if "--gpus all" in c and " fit " in c]
    assert gpu_fits, "a GPU training example"
    for command in gpu_fits:
        assert f":{workdir}/data" in command and f":{workdir}/runs" in command, f"{command}: data and runs mounted"
        assert "--shm-size" in command or "--ipc=host" in command, f"{command}: shared memory for workers / NCCL"
    assert any(f"--data.init_args.data_dir={workdir}/data/ptb" in c and "configs/ptb_bnlstm.yaml" in c for c in runs)
    assert any("--trainer.devices=4" in c and "--trainer.strategy=ddp" in c for c in gpu_fits), "a multi-GPU example"
    assert "--shm-size" in readme and "dataloader" in readme.lower()
