"""Flower adapters over the compressor core: wire codec and the ConEF strategy."""

from conef_fl.flower.codec import decode_payloads, encode_payloads
from conef_fl.flower.strategy import ConEFStrategy

__all__ = ["ConEFStrategy", "decode_payloads", "encode_payloads"]
