"""README.md stays true: its Python blocks run as written, its method and option lists are
the registry's and the option table's, and its test command is the one CI runs."""
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_there_are_python_examples():
    assert len(PYTHON_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(index, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), {})


def test_generated_lists_are_up_to_date():
    update = runpy.run_path(str(ROOT / "docs" / "update_readme.py"), run_name="readme")
    assert update["with_generated"](README) == README, "run `python docs/update_readme.py`"


def test_ci_runs_the_readme_commands():
    commands = re.findall(r"```bash\n(.*?)```", README, re.S)
    install, tests = commands[0].strip(), commands[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "the README's test command is not the last step of CI"
    assert ci.strip().splitlines()[-1] == tests
    for step in install.split(" && ")[:-1]:  # the last one runs the main job
        assert step.replace("pip install", "pip install -q") in ci or step in ci, step
