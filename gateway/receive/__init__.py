"""Stage 1, receive: the SMTP listeners (aiosmtpd) that take mail in.

    server.py         start_listeners(cfg, acceptor) -> Listeners; drain on close
    session.py        one SMTP session: aiosmtpd subclass, builds the Envelope,
                      hands (envelope, data) to the Acceptor and replies what it says
    addresses.py      RFC 5321 path syntax (pure)
    relay_control.py  never an open relay (pure)
    recipients.py     which local recipients exist: list, verdicts, cache (pure)
    recipient_probe.py  the recipient checks' I/O: list file, next-hop probes
    auth.py           SMTP AUTH against argon2 hashes; hash_password()
    received.py       the Received trace header (pure)
"""

from __future__ import annotations

from gateway.receive.server import Listeners, start_listeners

__all__ = ["Listeners", "start_listeners"]
