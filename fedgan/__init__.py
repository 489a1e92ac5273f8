"""fedgan: federated GANs for medical imaging across hospitals, built on Flower."""

__version__ = "0.1.0"
