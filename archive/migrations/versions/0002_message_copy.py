"""messages.copy: which copy of a message a row is (received, sent, decrypted, encrypted)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Issue 3 item 1: an outbound message is archived as received (plaintext) and as sent
(signed/encrypted), an inbound encrypted one as received and decrypted; the rows of
one message link to each other (``linked_id``) and say which copy they are.  "" is
the only copy of a message the gateway did not change (every row before this one).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('messages') as batch:
        batch.add_column(sa.Column('copy', sa.String(length=16), nullable=False,
                                   server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('messages') as batch:
        batch.drop_column('copy')
