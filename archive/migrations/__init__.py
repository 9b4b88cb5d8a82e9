"""Alembic migrations of the archive metadata database (see archive.metadata.Metadata.migrate)."""
