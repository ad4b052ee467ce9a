"""What the Bento carries: bentofile.yaml includes exactly the modules serving imports."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

IMPORT_SERVING = """
import sys
import service, malaria.bento, malaria.model  # service.__init__ imports the last two lazily
print("\\n".join(sorted(m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "malaria")))
"""


def test_bentofile_includes_exactly_what_serving_imports():
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_SERVING], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    imported = {str(Path(f).relative_to(REPO_ROOT)) for f in out.split()}
    include = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())["include"]
    patterns = [p for p in include if p.endswith(".py")]
    runtime_files = {p for p in include if p.endswith("/")}  # folders read at run time (alembic loads migrations)
    assert runtime_files == {"malaria/serving/ui/", "malaria/serving/migrations/"}
    packaged = {
        str(p.relative_to(REPO_ROOT))
        for p in REPO_ROOT.glob("malaria/**/*.py")
        if any(fnmatch.fnmatch(str(p.relative_to(REPO_ROOT)), pattern) for pattern in patterns)
        and not str(p.relative_to(REPO_ROOT)).startswith(tuple(runtime_files))
    }
    assert imported - packaged == set(), "serving imports modules the Bento would not carry"
    assert packaged - imported == set(), "the Bento carries modules serving never imports"


def test_compat_refuses_another_bentoml_release(monkeypatch):
    import importlib

    import bentoml

    import malaria.serving.compat as compat

    monkeypatch.setattr(bentoml, "__version__", "1.5.0")
    with pytest.raises(ImportError, match=r"written for BentoML 1\.4\.x, found 1\.5\.0"):
        importlib.reload(compat)
    monkeypatch.undo()
    importlib.reload(compat)


def test_pre_commit_runs_the_lint_tools_of_the_projects_venv():
    import shlex

    [repo] = yaml.safe_load((REPO_ROOT / ".pre-commit-config.yaml").read_text())["repos"]
    assert repo["repo"] == "local", "hooks cloned from GitHub cannot be fetched here"
    commands = [shlex.split(hook["entry"]) for hook in repo["hooks"]]
    for command in commands:
        assert (REPO_ROOT / command[0]).is_file(), f"{command[0]} missing: make install"
    lint = (REPO_ROOT / "Makefile").read_text().split("\nlint:")[1].split("\n\n")[0]
    for tool in ("ruff check", "ruff format", "mypy"):
        assert f"$(BIN)/{tool}" in lint, f"make lint runs {tool}"
        hooks = [" ".join([Path(command[0]).name, *command[1:]]) for command in commands]
        assert any(hook.startswith(tool) for hook in hooks), f"a hook runs {tool}"
