"""The gateway's exception hierarchy.

    CofferError                      every error raised on purpose by the gateway
    ├── ConfigError                  a configuration mistake: file, line, key, message
    ├── SmtpReplyError               carries an SMTP reply (code, enhanced code, public text)
    │   ├── TemporaryFailure         4xx: the client or the queue should retry
    │   └── PermanentFailure         5xx: do not retry
    ├── SpoolError                   the durable queue could not do what was asked
    │   └── SpoolFullError           not enough disk: answer 452 4.3.1, never 250
    ├── StageError                   an unexpected failure inside a pipeline stage
    ├── DeliveryError                the next hop could not be used (per destination)
    ├── RouteError                   a delivery route spec is malformed (deliver/routes.py)
    ├── DnsTempError                 a DNS query timed out or failed (check/dns.py)
    ├── DkimSignError                outbound DKIM signing failed (transform/dkim_sign.py)
    ├── ArcSealError                 ARC sealing failed (check/arc.py)
    └── AlreadyRunning               another gateway holds the data directory (service.py)

Errors are translated at the edge: SmtpReplyError into a reply (gateway.receive),
ConfigError into an exit code and a one-line message (gateway.cli), StageError
into a held message (gateway.pipeline).  Internal causes are logged, never sent
to a client.
"""

from __future__ import annotations

from gateway.replies import Reply


class CofferError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(CofferError):
    """A configuration (or policy) mistake, located in its file."""

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None,
        column: int | None = None, key: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        key = f" [{self.key}]" if self.key else ""
        return f"{where}:{key} {self.message}"


class SmtpReplyError(CofferError):
    """An error with SMTP meaning: the client sees ``reply``, the log sees ``cause``."""

    def __init__(self, reply: Reply, cause: str | None = None) -> None:
        self.reply = reply
        self.cause = cause
        super().__init__(f"{reply}" + (f" ({cause})" if cause else ""))


class TemporaryFailure(SmtpReplyError):
    pass


class PermanentFailure(SmtpReplyError):
    pass


class SpoolError(CofferError):
    pass


class SpoolFullError(SpoolError):
    pass


class StageError(CofferError):
    """A pipeline stage failed unexpectedly; the message goes to the held area."""

    def __init__(self, stage: str, cause: BaseException | str) -> None:
        self.stage = stage
        self.cause = cause
        super().__init__(f"stage {stage!r} failed: {cause}")


class DeliveryError(CofferError):
    """A destination could not be reached or refused the whole transaction."""

    def __init__(self, message: str, *, transient: bool, reply: str | None = None) -> None:
        self.transient = transient
        self.reply = reply
        super().__init__(message)
