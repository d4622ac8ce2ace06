"""Named points where a crash test makes the process die as `kill -9` would (GATEWAY_TEST_CRASH_AT)."""

from __future__ import annotations

import os
import signal

# Read once, at start-up: unset (always, outside the crash tests) costs one comparison a point.
ARMED = os.environ.get("GATEWAY_TEST_CRASH_AT") or None
POINTS = frozenset({
    "create.recorded",     # the row and its reservation committed, nothing sent upstream
    "create.accepted",     # the upstream accepted the create, its link not yet written
    "create.linked",       # the link committed, the caller not yet answered
    "prediction.settled",  # a final state and its settlement committed, slots not yet released
    "cancel.accepted",     # the upstream accepted a cancel, nothing recorded of it
    "webhook.answered",    # the receiver answered a delivery, not yet marked
})


def reached(point: str) -> None:
    """Die at once, with no clean-up of any kind, if the environment armed this point."""
    if point == ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
