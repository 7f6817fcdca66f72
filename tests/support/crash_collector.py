"""The real `exam-collector` command (collector.cli) in a process that SIGKILLs itself once, at a chosen point of
storing a segment, for crash tests on real parts (docs/design/durability.md, write order to `stored`):

- `after-place` (or `after-place=N`: the Nth time): right after the footage store's `place` returns (the bytes
  are in the store, on S3 an object version exists and is locked), before the row naming them is committed; this
  also serves `storage migrate`, which places through the same store;
- `after-commit`: when the first `stored` reply is about to be published (the row is committed), before it is.

Run from the repository root: `python -m tests.support.crash_collector POINT --config PATH serve`. The line
`crash point reached: ...` is printed (flushed) just before the kill. Nothing in production code knows of this:
the store returned by `collector.footage_store.open_store`, or `CollectorService.publish_reply`, is wrapped here.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

KILL_POINTS = ("after-place", "after-commit")
REACHED = "crash point reached"


def _die(what: str) -> None:
    print(f"{REACHED}: {what}; SIGKILL", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    name, _, nth = point.partition("=")
    if name == "after-place":
        from collector import footage_store

        placed_count = [0]
        kill_at = int(nth or 1)

        real_open = footage_store.open_store

        def open_store(config: Any) -> Any:
            store = real_open(config)
            real_place = store.place

            def place(*args: Any, **kwargs: Any) -> Any:
                placed = real_place(*args, **kwargs)
                placed_count[0] += 1
                if placed_count[0] == kill_at:
                    _die(f"placed {placed.relpath} version {placed.version} (created {placed.created})")
                return placed

            store.place = place   # type: ignore[method-assign]  (this instance only)
            return store

        footage_store.open_store = open_store   # collector.cli imports it at each call
    elif name == "after-commit":
        from collector.service import CollectorService
        from exam_contract.protocol import Reply, ReplyState

        real_publish = CollectorService.publish_reply

        def publish_reply(self: CollectorService, agent: str, reply: Reply) -> None:
            if reply.state == ReplyState.STORED:
                _die(f"row of record {reply.record} committed, `stored` reply to {agent} not sent")
            real_publish(self, agent, reply)

        CollectorService.publish_reply = publish_reply   # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown kill point {point!r}: use one of {', '.join(KILL_POINTS)}")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: python -m tests.support.crash_collector {{{'|'.join(KILL_POINTS)}}} ARGS...")
    arm(sys.argv[1])
    from collector.cli import main as collector_main

    collector_main(sys.argv[2:])


if __name__ == "__main__":
    main()
