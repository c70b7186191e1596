"""The one adapter to Flower's simulation engine and Ray: the backend's resources (``backend``),
starting and watching a simulation (``simulation``), and the apps ``flwr run`` starts (``flwr_run``)."""
