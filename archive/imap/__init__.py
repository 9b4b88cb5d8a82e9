"""Read-only IMAP4rev1 access to the archive (issue 7).

    parser.py          command grammar, RFC 3501 §9 (pure)           -> Command
    render.py          ENVELOPE / BODYSTRUCTURE / BODY[section] from raw bytes (pure)
    search.py          SEARCH key evaluation, RFC 3501 §6.4.4 (pure)
    backend.py         the Backend port + MemoryBackend (a complete in-memory store)
    archive_backend.py the archive adapter: metadata, blob store, full-text index, audit
    accounts.py        users / officers / admins (argon2id), folder UIDs, private flags
    server.py          asyncio sessions: TLS, auth, states, FETCH / SEARCH / STORE / IDLE
    cli.py             ``coffer imap serve`` and officers' saved searches

Where RFC 3501 leaves room, the answers are Dovecot's (the differential test in
tests/imap compares them byte for byte).  Deliberate choices:

* SELECT answers ``[READ-ONLY]`` (issue 7), yet STORE of \\Seen and \\Flagged works
  after SELECT: they are the user's private view state, never the archive's.  EXAMINE
  refuses STORE.  Python's imaplib raises on a READ-ONLY answer to SELECT, so
  ``ImapConfig.select_read_only=False`` answers ``[READ-WRITE]`` for such clients.
* Messages are served with bare LF as CRLF and NUL as 0x80 (RFC 3501 §4.3, as Dovecot);
  RFC822.SIZE is always the length of exactly those bytes: recorded with the message
  row when it was archived (archive.extract.crlf_size), else measured from the blob once.
* Only \\Seen and \\Flagged are kept (PERMANENTFLAGS); other flags are refused with
  ``NO [CANNOT]`` rather than silently kept for the session.
"""
