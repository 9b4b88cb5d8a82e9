"""The policy package's exception hierarchy.

    gateway.errors.ConfigError        file, line, column, key, message
    └── PolicyError                   any mistake in a policy (or a file it includes)
        ├── PolicySyntaxError         the YAML itself could not be read or parsed
        ├── PolicySchemaError         wrong type, unknown key, unknown condition or action
        ├── PolicyReferenceError      unknown list or retention class, missing or cyclic include
        ├── UnsafeRegexError          a regex that does not compile or could backtrack forever
        ├── UnreachableRuleError      a rule that can never run (after an unconditional stop)
        └── PolicyErrors              several of the above at once (``.errors``), so that
                                      ``coffer policy check`` reports every problem in one run

Every error names the file, line, column and key of the mistake, because a
compliance officer fixing a rule needs to find it.  Evaluation itself never
raises: a condition that fails on odd input is recorded as a miss with its
reason (see policies.engine).
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.errors import ConfigError


class PolicyError(ConfigError):
    """A mistake in a policy document, located in its file."""


class PolicySyntaxError(PolicyError):
    pass


class PolicySchemaError(PolicyError):
    pass


class PolicyReferenceError(PolicyError):
    pass


class UnsafeRegexError(PolicyError):
    pass


class UnreachableRuleError(PolicyError):
    pass


class PolicyErrors(PolicyError):
    """Several problems found in one load; the first one gives the location."""

    def __init__(self, errors: Sequence[PolicyError]) -> None:
        if not errors:
            raise ValueError("PolicyErrors needs at least one error")
        self.errors: list[PolicyError] = list(errors)
        first = self.errors[0]
        more = len(self.errors) - 1
        message = first.message + (
            f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        )
        super().__init__(
            message, file=first.file, line=first.line, column=first.column, key=first.key
        )


__all__ = [
    "PolicyError",
    "PolicyErrors",
    "PolicyReferenceError",
    "PolicySchemaError",
    "PolicySyntaxError",
    "UnreachableRuleError",
    "UnsafeRegexError",
]
