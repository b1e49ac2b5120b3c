"""Prometheus metrics of the serving runtime."""

from metrics.serving import ServingMetrics

__all__ = ["ServingMetrics"]
