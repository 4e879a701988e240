"""The README's commands are what CI runs and what a new user types."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _command_after(marker: str, text: str) -> str:
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if marker in line)
    return lines[index + 1].strip()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = _command_after("README test command", ci)
    assert command in readme, command
    assert "pytest" in command


def test_readme_has_exactly_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in setup.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2, commands
