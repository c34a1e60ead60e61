"""FaceScale: distributed training of face-recognition embedding models."""

__version__ = "0.1.0"
