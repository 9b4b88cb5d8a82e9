"""SMTP replies as named constants.

Each reply carries its basic code (RFC 5321 §4.2) and enhanced status code
(RFC 3463, registry in RFC 5248).  Code that answers a client uses these
constants instead of writing reply strings inline.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)


# RFC 5321 §4.2.2 / RFC 3463 §3.1 (X.0.X other), §3.2 (X.1.X addressing), §3.3 (X.2.X
# mailbox), §3.4 (X.3.X mail system), §3.5 (X.4.X network/routing), §3.6 (X.5.X
# protocol), §3.7 (X.6.X content), §3.8 (X.7.X security/policy).
OK = Reply(250, "2.0.0", "OK")
QUEUED = Reply(250, "2.0.0", "OK: queued as {qid}")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
BYE = Reply(221, "2.0.0", "Bye")

SERVICE_UNAVAILABLE = Reply(421, "4.3.2", "Service not available, closing transmission channel")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands, closing connection")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
# A message we would reject could not be archived as evidence (issue 3): never a 5xx
# without the evidence; the client retries and the next attempt is archived.
ARCHIVE_FAILED = Reply(451, "4.3.0", "Message could not be recorded, try again later")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")  # RFC 5321 §4.5.3.1.10
TEMPFAIL_POLICY = Reply(451, "4.7.1", "Message deferred by policy")
# RFC 5321 §4.2.2 450 (requested action not taken, try again) with RFC 3463 §3.8 X.7.1
# (not authorized): a client over a sending rate limit keeps its message and retries.
RATE_LIMITED = Reply(450, "4.7.1", "Sending rate limit exceeded; try again later")

SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognised")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")  # RFC 5321 §4.5.3.1.4
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
BAD_NEWLINE = Reply(
    554, "5.5.2", "Bare CR or LF in message; use CRLF line endings (SMTP smuggling guard)"
)
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TLS_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
BAD_MAILBOX_SYNTAX = Reply(553, "5.1.3", "Bad destination mailbox address syntax")
BAD_SENDER_SYNTAX = Reply(553, "5.1.7", "Bad sender mailbox address syntax")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
REJECTED_POLICY = Reply(550, "5.7.1", "Message rejected by policy")
TRANSACTION_FAILED = Reply(554, "5.0.0", "Transaction failed")
