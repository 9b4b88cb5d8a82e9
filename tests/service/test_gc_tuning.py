"""`coffer serve` takes its start-up objects out of the cyclic collector's sight."""

from __future__ import annotations

import gc

from gateway.service import GC_THRESHOLDS, tune_gc


def test_tune_gc_freezes_what_exists_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        assert gc.get_freeze_count() == 0
        tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
