"""SQLite: the embedded default (see :mod:`app.backends.sqlite.backend`).

Imports nothing: the log's writer process imports :mod:`app.backends.sqlite.process` and what
it needs, and no more.
"""
