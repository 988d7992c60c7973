"""The README's set-up commands stay true: CI runs exactly its test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks[:2] for line in block.splitlines()
             if line.strip() and not line.startswith("#")]
    return lines


def test_readme_opens_with_the_two_setup_commands():
    main_job, tests = readme_commands()[:2]
    assert main_job.startswith("python3 -m venv .venv") and main_job.endswith("python -m launch.train")
    assert "requirements.txt" in main_job
    assert tests.startswith("python3 -m venv .venv") and "pytest" in tests
    assert "requirements-test.txt" in tests


def test_ci_runs_exactly_the_readme_test_command():
    tests = readme_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines
