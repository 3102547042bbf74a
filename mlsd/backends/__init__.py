"""Backends supply four things: text encoding, noise prediction, VAE encode and decode."""
