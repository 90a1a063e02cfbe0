"""A damaged study database: truncated by a crash, overwritten with garbage, another program's SQLite file,
or written by a newer Optuna. Each is one line naming the file and what to do, and nothing is written to it."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from optimizer.cli import main


def _truncated(good: Path, path: Path) -> None:
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 3])


def _garbage(good: Path, path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 40)


def _another_programs(good: Path, path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE invoices (id INTEGER, amount REAL)")
    connection.execute("INSERT INTO invoices VALUES (1, 9.5)")
    connection.commit()
    connection.close()


def _newer_schema(good: Path, path: Path) -> None:
    shutil.copy(good, path)
    connection = sqlite3.connect(path)
    connection.execute("UPDATE alembic_version SET version_num = 'v99.0.0.a'")
    connection.commit()
    connection.close()


DAMAGE = {
    "truncated": (_truncated, "is not a readable SQLite database"),
    "garbage": (_garbage, "is not a readable SQLite database (file is not a database)"),
    "another-program": (_another_programs, "holds another program's tables (invoices), not a study"),
    "newer-schema": (_newer_schema, "was written by a newer Optuna than this one"),
}


@pytest.mark.parametrize("command", ["study", "report", "plan"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_database_is_one_line_and_left_as_it_was(
    mixed_study, models, tmp_path, capsys, damage, command
):
    make, fragment = DAMAGE[damage]
    path = tmp_path / "damaged.db"
    make(Path(mixed_study.url.removeprefix("sqlite:///")), path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    storage = ["--study-name", "mixed", "--storage", f"sqlite:///{path}"]
    args = {
        "study": ["study", "--model", str(models["mlp"]), "--budget", "1", *storage],
        "report": ["report", *storage, "--out", str(tmp_path / "report")],
        "plan": ["plan", *storage, "--rps", "100"],
    }[command]
    assert main(args) == 5
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err
    assert str(path) in lines[0] and "nothing was" in lines[0]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not (tmp_path / "report").exists()
