"""The Flower plugin: a client mod and a strategy wrapper over the compressor core.

* :func:`conef_mod` — add to ``ClientApp(mods=[conef_mod])``;
* :class:`ConEF` — wrap the server's strategy: ``ConEF(FedAvg(...), method="conef-cs")``.
"""

from conef_fl.flower.codec import decode_payloads, encode_payloads
from conef_fl.flower.mod import conef_mod
from conef_fl.flower.wrapper import ConEF, RoundStats, aggregation_mode

__all__ = ["ConEF", "RoundStats", "aggregation_mode", "conef_mod", "decode_payloads", "encode_payloads"]
