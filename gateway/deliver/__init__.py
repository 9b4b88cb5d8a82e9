"""The deliver stage: hand each recipient to its next hop (SMTP, MX or a local Maildir)."""
