"""Security promises checked on the source itself: no shell, nothing bound beyond loopback by default."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import optimizer
from optimizer.paths import check_name

SOURCES = sorted(Path(optimizer.__file__).parent.rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_no_subprocess_runs_through_a_shell():
    offenders = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for call in _calls(tree):
            name = ast.unparse(call.func)
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                offenders.append(f"{path.name}:{call.lineno} {name}")
            for keyword in call.keywords:
                if keyword.arg == "shell" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    offenders.append(f"{path.name}:{call.lineno} shell=")
    assert offenders == []


def test_every_host_option_defaults_to_loopback():
    from optimizer import cli

    for command in (cli.serve, cli.dashboard):
        default = inspect.signature(command).parameters["host"].default
        assert default == "127.0.0.1", command.__name__
    # 0.0.0.0 appears only in serve.py, which binds to what the user asked and warns about it


def test_names_that_become_paths_cannot_escape_their_directory():
    import pytest

    from optimizer.errors import UsageError

    for bad in ("../x", "a/b", "..", ".hidden", "x" * 200, "a\\b", "name\x00", ""):
        with pytest.raises(UsageError):
            check_name(bad, "study name")
    assert check_name("bert-base_v2.1", "study name") == "bert-base_v2.1"
