"""sslpipe: a reproducible pipeline for self-supervised pretraining of image encoders."""

__version__ = "0.1.0"
