"""The check stage: who really sent this message?

Every message entering Coffer has its sender authenticated before the policy
decides what to do with it:

    dns.py          the one DNS resolver every check uses (configured nameservers,
                    timeouts -> temperror, NXDOMAIN/NODATA -> none, a TTL cache),
                    with the adapters pyspf and dkimpy need
    spf.py          RFC 7208: MAIL FROM, or HELO for the null sender (pyspf)
    dkim_verify.py  RFC 6376 / RFC 8463: each DKIM-Signature, rsa-sha256 and
                    ed25519-sha256 (dkimpy)
    arc.py          RFC 8617: the ARC chain's cv= (dkimpy), and sealing
    dmarc.py        RFC 7489: record discovery, alignment, p/sp/pct
    authresults.py  RFC 8601: the Authentication-Results header, and removal of
                    forged ones that claim our authserv-id
    verdicts.py     the typed record of all of the above, stored as facts
    headers.py      byte-exact reading and removal of header fields
    stage.py        CheckStage, the pipeline stage tying it together
    config.py       CheckConfig, the ``check:`` section of coffer.yaml

The stage never rejects: it records verdicts, and the policy decides.
"""
