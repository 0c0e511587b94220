"""PostgreSQL: several instances on one server (see :mod:`app.backends.postgres.backend`)."""
