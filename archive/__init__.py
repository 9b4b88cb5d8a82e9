"""The immutable, encrypted, tamper-evident, searchable archive.

    archive/
    ├── errors.py       the exception tree (ArchiveError and below)
    ├── keys.py         archive keys (AES-256, with ids, rotation, OpenPGP escrow)
    │                   and the Ed25519 ledger-signing key
    ├── store.py        write-once blob store: SHA-256 addressed, zstd, AES-256-GCM
    │                   under a per-blob data key wrapped by the archive key, records
    │                   appended to pack segments (group commit, compaction)
    ├── pack.py         the segment, record, key table and index formats (pure)
    ├── segment.py      reading segments, key tables and indexes (file I/O)
    ├── blob.py         the one-object-per-blob format of the S3 store
    ├── ledger.py       append-only hash-chained ledger with signed checkpoints
    ├── facade.py       ``Archive`` (put/get/shred/append) and the asyncio ``BatchWriter``
    ├── verify.py       re-checks store + ledger with only the public key
    ├── metadata.py     the metadata database (SQLAlchemy 2)
    ├── index/          full-text engines (FTS5, whoosh, PostgreSQL)
    ├── query.py        the officers' query language
    ├── extract.py      text from messages and attachments for the index
    ├── search.py       audited search and view
    ├── retention.py    expiry: crypto-shredding after retention, never under a hold
    ├── holds.py        legal holds by case (dynamic: the query is re-evaluated)
    ├── importer.py     mbox, Maildir and .eml import (idempotent)
    ├── audit.py        audit events to the database and the ledger; database check
    ├── s3store.py      S3 Object Lock blob store (COMPLIANCE retention, legal hold)
    ├── imap/           read-only IMAP4rev1 server over the archive
    ├── cli_verify.py   ``coffer archive verify|checkpoint|compact|keys ...``
    ├── cli_search.py   ``coffer search``, ``coffer show``
    ├── cli_admin.py    ``coffer archive expire|import|reindex|audit-db``, ``coffer hold``,
    │                   ``coffer audit log``
    └── cli_common.py   the shared ``coffer archive`` sub-command

On disk, under the data directory: ``archive/store/packs/`` (segments of
encrypted records, their key tables of wrapped data keys, their indexes),
``archive/ledger/`` (segments), ``archive/keys/`` and the index and database.
The store and the ledger are the proof; the database and the index are
rebuildable views of them.
"""
