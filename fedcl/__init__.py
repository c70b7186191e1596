"""fedcl: a federated continual learning simulator (Flower + Ray + Hydra).

``fedcl.ContinualStrategy`` is the whole experiment as a Flower ``Strategy`` for your own ServerApp.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["ContinualStrategy"]


def __getattr__(name: str):
    # loaded on first use: `import fedcl` stays light (no Flower, torch or Ray until needed)
    if name == "ContinualStrategy":
        return importlib.import_module("fedcl.server.strategy").ContinualStrategy
    raise AttributeError(f"module 'fedcl' has no attribute {name!r}")
