"""The server side: ``ContinualStrategy`` (a Flower Strategy) and what it drives: the schedule,
the downlink, screening, the reply spool, central evaluation, callbacks, checkpoints, and the
``ServerApp`` that runs it (``app``). May use the client side's codec and timing names."""
