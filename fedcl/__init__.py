"""fedcl: a federated continual learning simulator (Flower + Ray + Hydra)."""

__version__ = "0.1.0"
