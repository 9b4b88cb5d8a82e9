"""Recovery, eDiscovery export and compliance reports (issue 8).

    reports.export         coffer export: a signed eDiscovery package with chain of custody
    reports.export_verify  coffer export verify: check a package against its signed manifest
    reports.recover        coffer recover: re-deliver archived originals through the relay
    reports.rebuild        coffer archive rebuild: metadata + full-text index from store+ledger
    reports.backup         coffer backup create|restore: a consistent copy while running
    reports.compliance     coffer report NAME: retention, holds, policy, auth, audit
    reports.common         opening the archive, auditing, progress, inline SVG charts
    reports.cli            registers the commands with gateway.cli
    reports/templates/     jinja2 templates (HTML; no network resources)

Everything here reads the archive through archive.facade / archive.metadata; no
module writes to the store except through them, and every export, recovery,
rebuild, backup and report is audited (database row + ledger ``audit`` entry).
"""
