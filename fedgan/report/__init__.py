"""Tables, curves and pictures made from run directories."""

from fedgan.report.plots import plot_metrics

__all__ = ["plot_metrics"]
