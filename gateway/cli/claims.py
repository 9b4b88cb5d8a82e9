"""Operator commands that change a queued message do it under the message's claim.

The claim is the ``flock`` a queue worker holds on the ``.msg`` file while it
delivers (gateway.queue.spool.Spool.claim).  An event an operator appends beside a
running attempt is lost or contradicted by what the worker writes after it: a
retry undone by the attempt's deferral, a release or a hold on a message the
worker then delivers and removes.  So ``coffer queue retry|hold|release|delete``
and ``coffer quarantine release|delete`` take the claim first, waiting up to
``--wait`` seconds (one deadline for the whole command) for an attempt in
progress to end, and report a message still busy at the deadline, or gone
meanwhile, with exit status 1: nothing is ever silently not done.

Shared here so that both command groups wait, word their help and report the
same way (gateway.cli.queue, gateway.cli.spam).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Literal

from gateway.queue.spool import Spool

Outcome = Literal["done", "gone", "busy"]
POLL_SECONDS = 0.1  # how often a busy claim is tried again until the deadline


def wait_option(default: float) -> argparse.ArgumentParser:
    """``--wait SECONDS`` (``parents=[...]``): 10 s for retry, hold and release, 60 s
    for delete, whose operator may be clearing a message a slow attempt is stuck on."""
    opt = argparse.ArgumentParser(add_help=False)
    opt.add_argument("--wait", type=float, default=default, metavar="SECONDS",
                     help="how long to wait for delivery attempts in progress on the "
                     f"messages (default {default:g}, for all of them together)")
    return opt


def deadline(wait: float) -> float:
    """One deadline for the whole selection: a gateway busy with many of the messages
    must not make the command wait ``--wait`` seconds for each."""
    return time.monotonic() + max(float(wait), 0.0)


def claim_then(spool: Spool, qid: str, until: float, do: Callable[[], object]) -> Outcome:
    """Run ``do`` while holding the message's claim, waiting until ``until`` (a
    :func:`deadline`) for a delivery attempt in progress: "done"; "gone" if the message
    left the queue meanwhile, "busy" if it is still claimed at the deadline."""
    while True:
        with spool.claim(qid) as mine:
            if mine:
                do()
                return "done"
        if not spool.exists(qid):
            return "gone"
        if time.monotonic() >= until:
            return "busy"
        time.sleep(POLL_SECONDS)


def under_claim(spool: Spool, qid: str, until: float, action: str,
                do: Callable[[], object], *, wait: float,
                err: Callable[[str], None]) -> bool:
    """:func:`claim_then`; False, said through ``err``, unless done.  ``action`` is
    the past participle the message names ("released"), ``wait`` the ``--wait`` given."""
    outcome = claim_then(spool, qid, until, do)
    if outcome == "gone":
        err(f"{qid}: delivered or removed meanwhile; not {action}")
    elif outcome == "busy":
        err(f"{qid}: a delivery attempt still holds it after {wait:g}s (the "
            f"message is being delivered now); not {action}: try again (or --wait longer)")
    return outcome == "done"
