"""Flower ServerApp of conef-fl."""
