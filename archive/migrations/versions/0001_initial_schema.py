"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-27

The whole schema of archive.metadata as first released.  Timestamps are naive UTC
(archive.metadata.UtcDateTime); JSON is JSONB on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# INTEGER PRIMARY KEY is SQLite's auto-increment rowid; BIGINT on PostgreSQL.
ID_ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON_ = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('id', ID_, nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('who', sa.String(length=255), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('query', sa.Text(), nullable=True),
    sa.Column('result_count', sa.Integer(), nullable=True),
    sa.Column('target', sa.String(length=255), nullable=True),
    sa.Column('detail', JSON_, nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_audit_events_action', 'audit_events', ['action'], unique=False)
    op.create_index('ix_audit_events_at', 'audit_events', ['at'], unique=False)

    op.create_table('blobs',
    sa.Column('id', ID_, nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('stored_at', sa.DateTime(), nullable=False),
    sa.Column('indexed_at', sa.DateTime(), nullable=True),
    sa.Column('shredded_at', sa.DateTime(), nullable=True),
    sa.Column('scan_flags', JSON_, nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sha256')
    )
    op.create_index('ix_blobs_indexed_at', 'blobs', ['indexed_at'], unique=False)

    op.create_table('holds',
    sa.Column('id', ID_, nullable=False),
    sa.Column('case', sa.String(length=255), nullable=False),
    sa.Column('query', sa.Text(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('created_by', sa.String(length=255), nullable=False),
    sa.Column('released_at', sa.DateTime(), nullable=True),
    sa.Column('released_by', sa.String(length=255), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('case')
    )
    op.create_table('attachments',
    sa.Column('id', ID_, nullable=False),
    sa.Column('blob_id', ID_, nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('content_type', sa.String(length=255), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('depth', sa.Integer(), nullable=False),
    sa.Column('scanned', sa.Boolean(), nullable=False),
    sa.Column('flags', JSON_, nullable=False),
    sa.ForeignKeyConstraint(['blob_id'], ['blobs.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_attachments_blob_id', 'attachments', ['blob_id'], unique=False)
    op.create_index('ix_attachments_sha256', 'attachments', ['sha256'], unique=False)

    op.create_table('messages',
    sa.Column('id', ID_, nullable=False),
    sa.Column('blob_id', ID_, nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('message_id', sa.String(length=998), nullable=False),
    sa.Column('date', sa.DateTime(), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('from_addr', sa.String(length=320), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('attachment_count', sa.Integer(), nullable=False),
    sa.Column('direction', sa.String(length=16), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.Column('retention_until', sa.DateTime(), nullable=True),
    sa.Column('source', sa.String(length=255), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('flags', JSON_, nullable=False),
    sa.Column('mail_from', sa.String(length=320), nullable=False),
    sa.Column('client_ip', sa.String(length=64), nullable=False),
    sa.Column('helo', sa.String(length=255), nullable=False),
    sa.Column('tls', sa.String(length=128), nullable=False),
    sa.Column('auth_user', sa.String(length=255), nullable=False),
    sa.Column('spf', sa.String(length=16), nullable=False),
    sa.Column('dkim', sa.String(length=16), nullable=False),
    sa.Column('dmarc', sa.String(length=16), nullable=False),
    sa.Column('linked_id', ID_, nullable=True),
    sa.Column('ledger_ref', sa.String(length=128), nullable=True),
    sa.Column('expired_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['blob_id'], ['blobs.id'], ),
    sa.ForeignKeyConstraint(['linked_id'], ['messages.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_messages_blob_id', 'messages', ['blob_id'], unique=False)
    op.create_index('ix_messages_date_id', 'messages', ['date', 'id'], unique=False)
    op.create_index('ix_messages_direction', 'messages', ['direction'], unique=False)
    op.create_index('ix_messages_dkim', 'messages', ['dkim'], unique=False)
    op.create_index('ix_messages_dmarc', 'messages', ['dmarc'], unique=False)
    op.create_index('ix_messages_message_id', 'messages', ['message_id'], unique=False)
    op.create_index('ix_messages_received_at', 'messages', ['received_at'], unique=False)
    op.create_index('ix_messages_retention_until', 'messages', ['retention_until'], unique=False)
    op.create_index('ix_messages_sha256', 'messages', ['sha256'], unique=False)
    op.create_index('ix_messages_size', 'messages', ['size'], unique=False)
    op.create_index('ix_messages_spf', 'messages', ['spf'], unique=False)

    op.create_table('decisions',
    sa.Column('id', ID_, nullable=False),
    sa.Column('message_pk', ID_, nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('trace', JSON_, nullable=False),
    sa.Column('decided_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['message_pk'], ['messages.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('message_pk')
    )
    op.create_table('hold_items',
    sa.Column('hold_id', ID_, nullable=False),
    sa.Column('message_pk', ID_, nullable=False),
    sa.ForeignKeyConstraint(['hold_id'], ['holds.id'], ),
    sa.ForeignKeyConstraint(['message_pk'], ['messages.id'], ),
    sa.PrimaryKeyConstraint('hold_id', 'message_pk')
    )
    op.create_index('ix_hold_items_message_pk', 'hold_items', ['message_pk'], unique=False)

    op.create_table('participants',
    sa.Column('id', ID_, nullable=False),
    sa.Column('message_pk', ID_, nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['message_pk'], ['messages.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_participants_address_role', 'participants', ['address', 'role'],
                    unique=False)
    op.create_index('ix_participants_message_pk', 'participants', ['message_pk'], unique=False)

    op.create_table('rule_hits',
    sa.Column('message_pk', ID_, nullable=False),
    sa.Column('rule', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['message_pk'], ['messages.id'], ),
    sa.PrimaryKeyConstraint('message_pk', 'rule')
    )
    op.create_index('ix_rule_hits_rule', 'rule_hits', ['rule'], unique=False)

    op.create_table('verdicts',
    sa.Column('id', ID_, nullable=False),
    sa.Column('message_pk', ID_, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('result', sa.String(length=32), nullable=False),
    sa.Column('detail', JSON_, nullable=False),
    sa.ForeignKeyConstraint(['message_pk'], ['messages.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_verdicts_message_pk', 'verdicts', ['message_pk'], unique=False)



def downgrade() -> None:
    op.drop_index('ix_verdicts_message_pk', table_name='verdicts')

    op.drop_table('verdicts')
    op.drop_index('ix_rule_hits_rule', table_name='rule_hits')

    op.drop_table('rule_hits')
    op.drop_index('ix_participants_message_pk', table_name='participants')
    op.drop_index('ix_participants_address_role', table_name='participants')

    op.drop_table('participants')
    op.drop_index('ix_hold_items_message_pk', table_name='hold_items')

    op.drop_table('hold_items')
    op.drop_table('decisions')
    op.drop_index('ix_messages_spf', table_name='messages')
    op.drop_index('ix_messages_size', table_name='messages')
    op.drop_index('ix_messages_sha256', table_name='messages')
    op.drop_index('ix_messages_retention_until', table_name='messages')
    op.drop_index('ix_messages_received_at', table_name='messages')
    op.drop_index('ix_messages_message_id', table_name='messages')
    op.drop_index('ix_messages_dmarc', table_name='messages')
    op.drop_index('ix_messages_dkim', table_name='messages')
    op.drop_index('ix_messages_direction', table_name='messages')
    op.drop_index('ix_messages_date_id', table_name='messages')
    op.drop_index('ix_messages_blob_id', table_name='messages')

    op.drop_table('messages')
    op.drop_index('ix_attachments_sha256', table_name='attachments')
    op.drop_index('ix_attachments_blob_id', table_name='attachments')

    op.drop_table('attachments')
    op.drop_table('holds')
    op.drop_index('ix_blobs_indexed_at', table_name='blobs')

    op.drop_table('blobs')
    op.drop_index('ix_audit_events_at', table_name='audit_events')
    op.drop_index('ix_audit_events_action', table_name='audit_events')

    op.drop_table('audit_events')
