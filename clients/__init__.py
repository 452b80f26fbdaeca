"""Flower ClientApp of conef-fl."""
