"""fedcl's own driver of a ``ContinualStrategy``: Flower's ``Strategy.start`` loop plus what it
does not do.

Round for round it calls what Flower's loop calls (``configure_train`` with the arrays the last
round returned, the exchange, ``aggregate_train``), so a run has the same results either way. On
top: a killed run continues from its checkpoint (``resume``), and replies are handed to
``aggregate_train`` as they arrive, so the driver decodes them one by one instead of holding a
round's worth (Flower's ``send_and_receive`` returns them all at once).
"""
from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message

from fedcl.server import checkpoint

PULL_S = 0.05  # how often the server asks for replies while a round runs


def run(strategy, grid, timeout: float | None = None) -> dict:
    """Run (or, with ``strategy.resume``, continue) every round on ``grid``; results.json's content."""
    if strategy.resume and (saved := checkpoint.load(strategy.run_dir)) is not None:
        strategy.load_state_dict(saved)
    round_timeout = timeout if timeout is not None else float(strategy.cfg.get("round_timeout_s", 3600))
    arrays = strategy.initial_arrays()
    for plan in strategy.plans[strategy.state.rounds_done:]:
        messages = strategy.configure_train(plan.global_round, arrays, ConfigRecord(), grid)
        arrays, _ = strategy.aggregate_train(plan.global_round, exchange(grid, messages, round_timeout))
    return strategy.result if strategy.result is not None else strategy.finish()


def exchange(grid, messages: list[Message], timeout: float):
    """Send a round's messages and yield the replies as they arrive. Replies missing at
    ``timeout`` count as timeouts (``aggregate_train`` finds them unanswered)."""
    waiting = set(grid.push_messages(messages))
    del messages
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        replies = list(grid.pull_messages(waiting))
        for reply in replies:
            waiting.discard(reply.metadata.reply_to_message_id)
            yield reply
        del replies
        if waiting:
            time.sleep(PULL_S)
