"""The README and docs/ as a reader follows them: every relative link resolves, and every flag a command is
shown with exists in that command's `--help`."""
import collections
import os
import re
import subprocess
import sys
import tomllib

import pytest
from commands import ROOT, run_main

from unet_flax.moved import MOVED_COMMANDS

PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)\)")
# A command as the pages show it: a script, a module run with -m, or an installed entry point.
COMMAND = re.compile(r"(?:^|[\s`(])(?:python[\d.]* (?:-m )?([\w./-]+\.py|[a-z_]+(?:\.[a-z_]+)+|pytest)"
                     r"|(unet-flax-[a-z]+))((?:[ \t]+[^\s#&|;`]+)*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
# The bad-input table (docs/reliability.md) shows train.py refusing a flag it does not have.
SHOWN_REFUSED = {("train.py", "--frobnicate")}
# Commands run in this process (cheap) and those that need a process of their own (scripts outside the package).
IN_PROCESS = {"train.py", "sample.py", "evaluate.py"}


def entry_points() -> dict[str, str]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


def heading_anchors(page) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = page if not path else (page.parent / path).resolve()
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def command_lines(text: str) -> list[str]:
    """The code the pages show: fenced blocks (continuation lines joined, comments cut) and inline spans."""
    lines = []
    for block in re.findall(r"^```(?:bash|sh)?\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.split(" #")[0])
    text_outside_blocks = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    lines += re.findall(r"`([^`\n]+)`", text_outside_blocks)
    return lines


def shown_flags() -> dict[tuple[str, str | None], set[str]]:
    """(command, subcommand) -> the flags the pages show it with."""
    aliases = entry_points()
    shown = collections.defaultdict(set)
    for page in PAGES:
        for line in command_lines(page.read_text()):
            for script, entry_point, rest in COMMAND.findall(line):
                command = aliases[entry_point] if entry_point else script
                command = MOVED_COMMANDS.get(command, (command,))[0]
                words = rest.split()
                subcommand = words[0] if command == "unet_flax.scripts.convert" and words \
                    and not words[0].startswith("-") else None
                flags = set(FLAG.findall(rest)) - {flag for name, flag in SHOWN_REFUSED if name == command}
                if flags:
                    shown[command, subcommand] |= flags
    return shown


def help_texts(commands) -> dict[tuple[str, str | None], str]:
    """Each command's --help: the package's commands in this process, the others in processes started together."""
    texts, started = {}, {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command, subcommand in commands:
        args = [subcommand, "--help"] if subcommand else ["--help"]
        if command in IN_PROCESS or command.startswith("unet_flax."):
            done = run_main(command, *args)
            assert done.returncode == 0, (command, done.stderr)
            texts[command, subcommand] = done.stdout
        else:
            program = ["-m", command] if not command.endswith(".py") else [str(ROOT / command)]
            started[command, subcommand] = subprocess.Popen(
                [sys.executable, *program, *args], cwd=ROOT, env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for key, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, (key, stderr)
        texts[key] = stdout
    return texts


def test_every_flag_shown_with_a_command_exists_in_its_help():
    shown = shown_flags()
    assert {("train.py", None), ("sample.py", None), ("unet_flax.scripts.convert", "import-diffusers"),
            ("pytest", None), ("bench.py", None)} <= shown.keys(), sorted(shown)  # the parse finds them
    texts = help_texts(shown)
    missing = {f"{command} {subcommand or ''}".strip(): sorted(flag for flag in flags if not re.search(
        rf"(?<![\w-]){re.escape(flag)}(?![\w-])", texts[command, subcommand])) for (command, subcommand), flags
        in shown.items()}
    assert not {command: flags for command, flags in missing.items() if flags}, missing
    for command, flag in SHOWN_REFUSED:  # shown as refused: it must stay unknown
        assert flag not in texts.get((command, None), run_main(command, "--help").stdout)


@pytest.mark.parametrize("line,expected", [
    ("python train.py --steps 3 --data x  # --not-a-flag", ("train.py", {"--steps", "--data"})),
    ("PYTHONPATH=. python benchmarks/loader.py startup --counts 1000", ("benchmarks/loader.py", {"--counts"})),
    ("unet-flax-convert export-diffusers --workdir w --pipeline", ("unet_flax.scripts.convert", {"--workdir",
                                                                                              "--pipeline"})),
])
def test_the_parse_finds_commands_and_their_flags(line, expected):
    aliases = entry_points()
    script, entry_point, rest = COMMAND.findall(command_lines(f"```bash\n{line}\n```\n")[0])[0]
    assert (aliases[entry_point] if entry_point else script, set(FLAG.findall(rest))) == expected


def test_ci_runs_the_readme_s_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci_command}\n```" in readme
