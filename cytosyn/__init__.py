"""CytoSyn: data pipeline, trainer, sampler and evaluation for an H&E latent-diffusion model."""

__version__ = "0.1.0"
