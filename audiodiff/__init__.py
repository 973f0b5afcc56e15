"""audiodiff: fine-tune and mass-generate mel-spectrogram audio diffusion models on Ray."""

__version__ = "0.1.0"
