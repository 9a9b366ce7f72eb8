"""Datasets, all usable offline: real MNIST, Moving MNIST made from it, and video."""
