"""The README is the user's front door: every command it shows must still parse, every file
and doc it links must exist, and its two Makefile targets must be there. The commands of the
user guides in docs/ (data, training, evaluation) are held to the same rule, and every training
command's config and `key=value` overrides must load: argparse accepts any `KEY=VALUE`, so a
misspelt setting would otherwise pass."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tulu.cli import _parse

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: The guides whose bash blocks are commands a user copies (server.md and engine.md have their
#: own tests).
GUIDES = ("docs/data.md", "docs/training.md", "docs/evaluation.md")


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _commands(prefix: str, text: str = README) -> list[list[str]]:
    """Every command line in `text`'s bash blocks that starts with `prefix`, continuation
    lines joined, comments dropped, shell variables given a value."""
    commands = []
    for block in _shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith(prefix + " "):
                continue
            line = line.replace("$MODEL", "model").replace('"$OPENAI_API_KEY"', "key")
            commands.append(shlex.split(line)[1:])
    return commands


TULU_COMMANDS = _commands("tulu")
GUIDE_COMMANDS = [
    (doc, argv)
    for doc in GUIDES
    for argv in _commands("tulu", (ROOT / doc).read_text(encoding="utf-8"))
]


def _check_command(argv: list[str]) -> None:
    """Parse `argv` as the `tulu` command does; a training command's config must also load
    with its overrides, and an evaluation's --task names must exist."""
    from tulu.eval.runner import TASKS
    from tulu.train.config import load_train_config

    argv = [a for a in argv if a != "..."]
    args = _parse(argv)
    assert args.command == argv[0]
    if args.command == "train":
        load_train_config(ROOT / args.config, args.overrides)
    if args.command == "eval":
        assert set(args.task or ()) <= set(TASKS), args.task


def test_readme_shows_every_command_family() -> None:
    shown = {argv[0] for argv in TULU_COMMANDS}
    assert {"info", "chat", "generate", "serve", "data", "train", "eval", "bench"} <= shown


@pytest.mark.parametrize("argv", TULU_COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_readme_tulu_commands_parse(argv: list[str]) -> None:
    _check_command(argv)


def test_guides_show_commands() -> None:
    assert {doc for doc, _ in GUIDE_COMMANDS} == set(GUIDES)


@pytest.mark.parametrize(
    ("doc", "argv"), GUIDE_COMMANDS, ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60]
)
def test_guide_tulu_commands_parse(doc: str, argv: list[str]) -> None:
    _check_command(argv)


def test_a_misspelt_override_fails_the_check() -> None:
    """The config check is what catches a setting argparse lets through."""
    from tulu.errors import ConfigError

    _parse(["train", "configs/tiny-demo.yaml", "optim.lrr=1"])
    with pytest.raises(ConfigError, match="optim.lrr"):
        _check_command(["train", "configs/tiny-demo.yaml", "optim.lrr=1"])


def test_readme_torchrun_command_parses() -> None:
    import argparse

    from tulu.train.cli import _add_train_arguments
    from tulu.train.config import load_train_config

    (argv,) = _commands("torchrun")
    module = argv.index("-m")
    assert argv[module + 1] == "tulu.train"
    parser = argparse.ArgumentParser()
    _add_train_arguments(parser)
    args = parser.parse_intermixed_args(argv[module + 2 :])
    assert Path(ROOT / args.config).is_file()
    load_train_config(ROOT / args.config, args.overrides)


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
