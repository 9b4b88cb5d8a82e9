"""The README's two commands exist, and CI runs the test command exactly as the README gives it."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _two_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL)]


def test_readme_gives_exactly_two_commands() -> None:
    commands = _two_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), "each command is one line"


def test_readme_commands_are_executable_scripts_in_the_repo() -> None:
    for command in _two_commands():
        script = REPO / command.split()[0]
        assert script.is_file(), f"{command}: {script} is missing"
        assert os.access(script, os.X_OK), f"{script} is not executable (chmod +x, then git add)"


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert "set -euo pipefail" in lines
    test_command = _two_commands()[1]
    assert "run-tests" in test_command
    assert lines[-1] == test_command


def test_readme_links_to_docs_that_exist() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]*)?\)", text)
    assert links, "the README links its documentation"
    missing = [link for link in links if not (REPO / link).is_file()]
    assert missing == [], f"README links to missing files: {missing}"
