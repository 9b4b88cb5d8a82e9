"""messages.crlf_size: IMAP's RFC822.SIZE recorded when a message is archived

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

The embedded IMAP server (archive.imap) answers RFC822.SIZE with a message's length
as served, every bare LF as CRLF.  It learnt that size by reading and decrypting
each blob on the first SELECT of a folder (7.2 s at 100,000 messages); the archive
stage, the importer and the rebuild now record it from the bytes they hold.  Rows
archived before this revision stay NULL: IMAP measures those as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('messages') as batch:
        batch.add_column(sa.Column('crlf_size', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('messages') as batch:
        batch.drop_column('crlf_size')
