"""Old module names only: the code moved to ``fedcl.client``, ``fedcl.server`` and ``fedcl.runtime``."""
