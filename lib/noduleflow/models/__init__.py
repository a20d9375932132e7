"""Generative models: the VAE that compresses nodule patches, and flow-matching velocity networks."""
