"""What only a backend knows stays in its package: outside ``app/backends/`` no code asks
which database it is on, and the SQLite writer process imports no more than it needs."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from app.backends import Appender, Backend, backend_for
from app.backends.base import Appender as AppenderProtocol
from app.backends.postgres.appender import PostgresAppender
from app.backends.sqlite.process import ProcessAppender
from app.backends.sqlite.thread import ThreadAppender
from tests.support import ROOT

APP = ROOT / "app"
BACKENDS = APP / "backends"

#: Modules that name a database in code: its drivers and SQLAlchemy's dialects.
DATABASE_MODULES = ("sqlite3", "asyncpg", "aiosqlite", "sqlalchemy.dialects")
#: A string the code compares with or passes on that is a database's name...
DATABASE_NAMES = {"sqlite", "postgres", "postgresql"}
#: ... or SQL in one database's dialect.
DATABASE_SQL = ("pg_", "printf(", "json_quote(", "to_json(", "pragma ", "begin immediate")
#: Where naming a database is configuration, not a branch: the settings and their names.
CONFIGURATION = {APP / "config" / "settings.py"}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.add(id(value))
    return found


def database_knowledge(path: Path, root: Path = ROOT) -> list[str]:
    """Where the module's code (not its comments or docstrings) names a database."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.startswith(DATABASE_MODULES):
                    found.append(f"{where} imports {name}")
        elif isinstance(node, ast.Attribute):
            if node.attr == "get_backend_name" or (
                node.attr == "name"
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "dialect"
            ):
                found.append(f"{where} asks for the dialect")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and path not in CONFIGURATION
        ):
            lowered = node.value.lower()
            if lowered in DATABASE_NAMES or any(sql in lowered for sql in DATABASE_SQL):
                found.append(f"{where} names a database in {node.value[:60]!r}")
    return sorted(found)


def test_no_module_outside_the_backends_asks_which_database_it_is_on() -> None:
    modules = [path for path in APP.rglob("*.py") if BACKENDS not in path.parents]
    assert len(modules) > 50
    found = [problem for path in modules for problem in database_knowledge(path)]
    assert found == []


def test_the_check_finds_a_branch_on_the_database(tmp_path: Path) -> None:
    module = tmp_path / "leak.py"
    module.write_text(
        '"""A docstring may say SQLite."""\n'
        "import sqlite3\n"
        "from sqlalchemy.dialects import postgresql\n"
        "# a comment may say postgres\n"
        "def f(connection):\n"
        '    if connection.dialect.name == "sqlite":\n'
        '        return "SELECT pg_notify(1)"\n'
    )
    found = database_knowledge(module, tmp_path)
    assert [problem.split(" ", 1)[0] for problem in found] == [
        "leak.py:2",
        "leak.py:3",
        "leak.py:6",
        "leak.py:6",
        "leak.py:7",
    ], found


def test_every_backend_implements_the_whole_interface() -> None:
    for url in ("sqlite+aiosqlite:///x.db", "postgresql+asyncpg://u@h/d"):
        backend = backend_for(url)
        assert isinstance(backend, Backend)
        assert not inspect.isabstract(type(backend)), type(backend)
    interface = {
        name
        for name, member in vars(AppenderProtocol).items()
        if callable(member) and not name.startswith("_")
    }
    assert interface == {"start", "submit", "probe", "turn", "write_guarded", "close"}
    for appender in (ProcessAppender, ThreadAppender, PostgresAppender):
        assert not inspect.isabstract(appender)
        assert interface <= set(dir(appender)), appender


def test_a_url_no_backend_serves_is_refused_naming_the_schemes() -> None:
    with pytest.raises(ValueError, match=r"sqlite\+aiosqlite:// or postgresql\+asyncpg://"):
        backend_for("mysql://u@h/d")


def test_the_writer_process_imports_neither_sqlalchemy_nor_the_event_store() -> None:
    probe = (
        "import sys, app.backends.sqlite.process as p\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'litestar')"
        " or m.startswith('app.eventlog')))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert ran.stdout.strip() == "[]"


def test_appender_is_the_protocol_re_exported() -> None:
    assert Appender is AppenderProtocol
