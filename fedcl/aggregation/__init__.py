"""Pure numpy aggregation: rules that combine client updates (mean, median, trimmed mean, Krum)."""
from fedcl.aggregation.rules import MEAN, AggregationRule, Krum, Mean, Median, TrimmedMean

__all__ = ["MEAN", "AggregationRule", "Krum", "Mean", "Median", "TrimmedMean"]
