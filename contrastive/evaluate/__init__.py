"""Measuring a representation: kNN and linear probe on frozen features."""
