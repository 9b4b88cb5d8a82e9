"""Helpers for the queue worker tests: an injectable clock and test stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.pipeline import MessageContext, StageResult


@dataclass
class FakeClock:
    """Time the worker sees; tests move it instead of sleeping for minutes."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordingStage:
    """A stage that returns a fixed result (or raises) and counts its runs."""

    name: str
    result: StageResult = field(default_factory=StageResult)
    error: Exception | None = None
    once: bool = False
    runs: int = 0
    seen_facts: list[dict[str, object]] = field(default_factory=list)

    async def run(self, ctx: MessageContext) -> StageResult:
        self.runs += 1
        self.seen_facts.append(dict(ctx.facts))
        if self.error is not None:
            raise self.error
        return self.result
