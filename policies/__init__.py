"""Coffer's policy engine: the "decide" stage's rule language and evaluator.

    load_policy(path) -> Policy        policies.loader (complete or a located PolicyError)
    evaluate(policy, envelope, message, facts, local_domains=...) -> Decision
                                       policies.engine (never raises)

The rule language is documented in docs/policy.md; shipped rule sets live
beside this file (baseline.yaml, sec17a4-finra.yaml, hipaa.yaml, gdpr.yaml).
"""

from __future__ import annotations

from pathlib import Path

from policies.engine import Decision, RuleTrace, evaluate
from policies.errors import PolicyError
from policies.loader import check_policy, load_policy
from policies.message import MessageView
from policies.schema import Policy, Rule

SHIPPED = Path(__file__).resolve().parent

__all__ = [
    "SHIPPED", "Decision", "MessageView", "Policy", "PolicyError", "Rule", "RuleTrace",
    "check_policy", "evaluate", "load_policy",
]
