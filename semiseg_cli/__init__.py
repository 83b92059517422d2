"""semiseg: label-efficient semantic segmentation behind one CLI."""
__version__ = "0.1.0"
