"""surgery: declarative model surgery, training, export and serving for PyTorch."""

__version__ = "0.1.0"
