"""The README's command lines as a shell passes them: each composes and passes the config checks."""

from __future__ import annotations

import re
import subprocess

import pytest

from recsys import config as schema
from recsys.data.sources import parse_filter
from tests.conftest import ROOT, compose_cfg

# `python -m recsys.<entry> ...` or `torchrun [options] -m recsys.<entry> ...`, in a code block
COMMAND = re.compile(r"^ {4,}(?:python -m |torchrun (?:--\S+ )*-m )recsys\.(\w+)(.*)$")
CONFIG_OF = {
    e: e for e in ("train", "vocabulary", "evaluate", "predict", "export", "serve", "recommend")
}


def readme_commands() -> list[tuple[str, str]]:
    """(entry point, its arguments as written, continuation lines included) of Hydra commands."""
    lines = (ROOT / "README.md").read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        match = COMMAND.match(line)
        if match and match[1] in CONFIG_OF:
            text = [match[2]]
            while text[-1].endswith("\\"):
                text.append(lines[i + len(text)])
            found.append((match[1], "\n".join(text)))
    return found


def shell_words(arguments: str) -> list[str]:
    """The arguments as bash hands them to the program (placeholders such as <run dir> filled)."""
    arguments = re.sub(r"<[\w -]+>", "placeholder", arguments)
    script = 'words() { for w; do printf "%s\\0" "$w"; done; }; words' + arguments
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def overrides(words: list[str]) -> list[str]:
    """Hydra's overrides among the words: without --multirun, --cfg job and an ellipsis."""
    out, skip = [], False
    for word in words:
        if skip or word in ("--multirun", "-m", "..."):
            skip = False
            continue
        skip = word == "--cfg"
        if not skip:
            out.append(word)
    return out


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    entries = {entry for entry, _ in COMMANDS}
    assert len(COMMANDS) > 20 and entries == set(CONFIG_OF)


@pytest.mark.parametrize("entry,arguments", COMMANDS, ids=[a for _, a in COMMANDS])
def test_readme_command_composes(entry, arguments):
    schema.to_object(compose_cfg(*overrides(shell_words(arguments)), config_name=CONFIG_OF[entry]))


def test_readme_filter_examples_reach_the_config_as_written():
    filters = {}
    for _, arguments in COMMANDS:
        if "filter" in arguments:
            data = schema.to_object(compose_cfg(*overrides(shell_words(arguments)))).data
            splits = {f"data.{s}.filter": data.split(s) for s in ("train", "validation", "test")}
            filters |= {k: split.filter for k, split in splits.items() if split and split.filter}
            filters |= {"data.filter": data.filter} if data.filter else {}
    assert filters == {
        "data.filter": "day >= '2026-11-01' and day < '2026-11-08'",
        "data.train.filter": "day < '2026-11-08'",
        "data.validation.filter": "day == '2026-11-08'",
    }
    for key, text in filters.items():
        parse_filter(text, key)
