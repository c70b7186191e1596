"""Sequential fine-tuning with FedAvg: no defence against forgetting (the lower bound)."""
from fedcl.methods.base import Method


class Finetune(Method):
    """The base ``Method`` unchanged: train on the current task only."""
