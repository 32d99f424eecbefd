"""Experiments that compare runs of the trainer, each one command."""
