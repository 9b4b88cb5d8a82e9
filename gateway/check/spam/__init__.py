"""Spam filtering: the "spam" part of the check stage (issue 9).

    message.py     the message taken apart once (headers, text, links, parts)
    symbols.py     the model: named symbols with weights, actions by thresholds
    heuristics.py  header, structure, URL, attachment and encoding rules; auth verdicts
    bayes.py       the statistical classifier and its token database
    dnsbl.py       DNS blocklists (client IP) and URI blocklists (link domains)
    external.py    optional scanners: rspamd (/checkv2) and SpamAssassin's spamd
    scorer.py      heuristics + classifier (offline, no DNS)
    stage.py       SpamStage: all of the above; facts["spam"] for the policy
    config.py      the ``spam:`` section of coffer.yaml
"""
