"""The D-VAE: config and presets, network, loss, one stage's training loop, the two-stage fit, `Purifier`, checkpoints, noise."""
