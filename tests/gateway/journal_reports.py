"""Journal reports the tests write themselves: Exchange 2010+ and Microsoft 365 layouts."""

from __future__ import annotations

ORIGINAL = (
    b"From: Alice <alice@corp.example>\r\n"
    b"To: Bob <bob@corp.example>\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Message-ID: <q3@corp.example>\r\n"
    b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"The figures are attached in spirit.\r\n"
)

EXCHANGE_TEXT = (
    "Sender: alice@corp.example\r\n"
    "Subject: Quarterly figures\r\n"
    "Message-Id: <q3@corp.example>\r\n"
    "To: bob@corp.example\r\n"
    "Cc: carol@corp.example\r\n"
    "Bcc: dave@corp.example\r\n"
    "To: member@corp.example, Expanded: team@corp.example\r\n"
    "To: eve@corp.example, Forwarded: frank@corp.example\r\n"
)

M365_TEXT = (
    "Sender: alice@corp.example\r\n"
    "Subject: Quarterly figures\r\n"
    "Message-Id: <q3@corp.example>\r\n"
    "On-Behalf-Of: boss@corp.example\r\n"
    "Recipient: bob@corp.example, grace@corp.example\r\n"
    "Bcc: dave@corp.example\r\n"
    "Recipient: member@corp.example, Expanded: team@corp.example,\r\n"
    " Forwarded: frank@corp.example\r\n"
    "TLS: Version=1.2, Cipher=TLS_AES_256\r\n"
)


def report(text: str, original: bytes = ORIGINAL, *, boundary: str = "jrnl-b0und",
           attach: bool = True, header: bool = True,
           subject: str = "Quarterly figures") -> bytes:
    """A journal report message carrying ``original`` as a message/rfc822 part."""
    head = (
        "From: Microsoft Exchange <journal-sender@corp.example>\r\n"
        "To: journal@coffer.example\r\n"
        f"Subject: {subject}\r\n"
        + ("X-MS-Journal-Report: \r\n" if header else "")
        + "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
        "\r\n"
        "This is a journal report.\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode() + text.encode()
    tail = b""
    if attach:
        tail = (f"\r\n--{boundary}\r\n"
                "Content-Type: message/rfc822\r\n"
                "Content-Disposition: attachment\r\n"
                "\r\n").encode() + original
    return head + tail + f"\r\n--{boundary}--\r\n".encode()
