"""The README is the user's front door: every command it shows must still parse, every file
and doc it links must exist, and its two Makefile targets must be there."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tulu.cli import _parse

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _commands(prefix: str) -> list[list[str]]:
    """Every command line in the README's bash blocks that starts with `prefix`, continuation
    lines joined, comments dropped, shell variables given a value."""
    commands = []
    for block in _shell_blocks(README):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith(prefix + " "):
                continue
            line = line.replace("$MODEL", "model").replace('"$OPENAI_API_KEY"', "key")
            commands.append(shlex.split(line)[1:])
    return commands


TULU_COMMANDS = _commands("tulu")


def test_readme_shows_every_command_family() -> None:
    shown = {argv[0] for argv in TULU_COMMANDS}
    assert {"info", "chat", "generate", "serve", "data", "train", "eval", "bench"} <= shown


@pytest.mark.parametrize("argv", TULU_COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_readme_tulu_commands_parse(argv: list[str]) -> None:
    argv = [a for a in argv if a != "..."]
    args = _parse(argv)
    assert args.command == argv[0]


def test_readme_torchrun_command_parses() -> None:
    import argparse

    from tulu.train.cli import _add_train_arguments

    (argv,) = _commands("torchrun")
    module = argv.index("-m")
    assert argv[module + 1] == "tulu.train"
    parser = argparse.ArgumentParser()
    _add_train_arguments(parser)
    args = parser.parse_intermixed_args(argv[module + 2 :])
    assert Path(ROOT / args.config).is_file()


def test_readme_links_and_paths_exist() -> None:
    links = re.findall(r"\]\(((?:docs|configs)/[^)#]+)\)", README)
    paths = re.findall(r"\b(configs/[\w./-]+\.yaml)\b", README)
    assert links and paths
    for path in {*links, *paths}:
        assert (ROOT / path).is_file(), path


def test_readme_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in re.findall(r"^make (\w+)", "\n".join(_shell_blocks(README)), flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
