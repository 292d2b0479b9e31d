"""diffbias: a harness for the inductive biases of diffusion-model backbones."""

__version__ = "0.1.0"
