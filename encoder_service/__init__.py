"""Encoder service: the CNN autoencoder, its training, and the runtimes that serve its embeddings."""
