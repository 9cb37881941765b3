"""Backbones shared by the models."""
