"""The client side: one logical client's round from a message (``app``), its state on disk
(``store``), and the wire format both sides share (``codec``). Knows nothing of the server."""
