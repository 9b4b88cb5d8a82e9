"""The PostgreSQL metadata database in a backup: pg_dump at an exported snapshot, pg_restore.

``coffer backup create`` must snapshot the database *before* it writes the
ledger checkpoint the copy ends at (reports.backup: every row then already has
its blob and ledger entry).  One REPEATABLE READ transaction exports its
snapshot (``pg_export_snapshot()``); ``pg_dump --snapshot`` dumps exactly that
state, and the same transaction counts the message rows in it, while the
gateway keeps committing.  The dump is pg_dump's custom format (compressed,
restorable table by table), made with the PostgreSQL client tools (Debian:
postgresql-client; scripts/setup.sh installs it).

A URL whose ``options`` set a ``search_path`` (one schema per archive) dumps
that schema only, and restores into the schema of the same name (which must not
exist yet in the target database: pg_restore creates it).  ``pg_restore``
restores into the database the target URL names, in one transaction (all or
nothing), without owners or grants (the restoring role owns what it creates);
that database must hold no Coffer tables yet, so a restore never mixes two
archives.

The password, if the URL has one, reaches the tools through ``PGPASSWORD`` in
their environment, never on a command line other users can read.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, inspect, select, text
from sqlalchemy.engine import make_url

from archive.metadata import Message, Metadata
from reports.errors import BackupError

__all__ = ["DUMP_NAME", "Libpq", "dump", "libpq", "restore"]

DUMP_NAME = "metadata.pgdump"
_SEARCH_PATH = re.compile(r"-c\s*search_path\s*=\s*([^\s,]+)")


@dataclass(frozen=True)
class Libpq:
    """How the command-line tools reach the database a SQLAlchemy URL names."""

    args: list[str]  # --host/--port/--username/--dbname
    env: dict[str, str]
    schema: str | None


def libpq(url: str) -> Libpq:
    """The libpq arguments of a ``postgresql[+driver]://`` URL (pure)."""
    u = make_url(url)
    if not u.drivername.startswith("postgresql") or not u.database:
        raise BackupError("the PostgreSQL metadata URL must name a database "
                          "(postgresql://USER@HOST:PORT/DBNAME)")
    args = [f"--dbname={u.database}"]
    if u.host:
        args.append(f"--host={u.host}")
    if u.port:
        args.append(f"--port={u.port}")
    if u.username:
        args.append(f"--username={u.username}")
    env = {"PGPASSWORD": u.password} if u.password else {}
    options = u.query.get("options")
    found = _SEARCH_PATH.search(options if isinstance(options, str) else " ".join(options or ()))
    return Libpq(args, env, found.group(1).strip('"') if found else None)


def _run(tool: str, args: list[str], conn: Libpq) -> None:
    exe = shutil.which(tool)
    if exe is None:
        raise BackupError(f"{tool} not found: install the PostgreSQL client tools "
                          "(Debian: apt-get install postgresql-client)")
    done = subprocess.run([exe, *args, *conn.args], env={**os.environ, **conn.env},
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()
        raise BackupError(f"{tool} failed (exit {done.returncode}): "
                          f"{detail[-1] if detail else 'no message'}")


def dump(url: str, dest: Path) -> int:
    """Dump the database at one snapshot into ``dest``; the message rows it holds."""
    conn = libpq(url)
    with Metadata(url) as meta, meta.engine.connect() as c:
        c = c.execution_options(isolation_level="REPEATABLE READ")
        with c.begin():
            snapshot = c.execute(text("SELECT pg_export_snapshot()")).scalar_one()
            rows = int(c.execute(select(func.count()).select_from(Message)).scalar_one())
            # The snapshot stays valid while this transaction is open: pg_dump runs now.
            _run("pg_dump", ["--format=custom", "--no-owner", "--no-privileges",
                             f"--snapshot={snapshot}", f"--file={dest}",
                             *([f"--schema={conn.schema}"] if conn.schema else [])], conn)
    os.chmod(dest, 0o640)
    return rows


def restore(src: Path, url: str, schema: str | None) -> None:
    """Restore a dump (of ``schema``, or of a whole database) into the empty database
    ``url`` names, all or nothing."""
    conn = libpq(url)
    if conn.schema != schema:
        raise BackupError(f"the backup holds the database {_what(schema)}; the target URL "
                          f"works in {_what(conn.schema)} (set options=-csearch_path="
                          f"{schema or 'public'} or use a URL without options)")
    with Metadata(url) as meta:
        try:
            tables = inspect(meta.engine).get_table_names(schema=conn.schema)
        except Exception as exc:
            raise BackupError(f"cannot reach the target database: "
                              f"{str(exc).splitlines()[0]}") from None
    if "messages" in tables or "alembic_version" in tables:
        raise BackupError("the target PostgreSQL database already holds an archive's "
                          "tables; restore into an empty database (createdb NAME)")
    _run("pg_restore", ["--no-owner", "--no-privileges", "--exit-on-error",
                        "--single-transaction", str(src)], conn)


def _what(schema: str | None) -> str:
    return f"schema {schema}" if schema else "default schema"
