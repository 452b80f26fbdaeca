"""The protocol between :func:`~conef_fl.flower.mod.conef_mod` and the :class:`~conef_fl.flower.wrapper.ConEF` wrapper.

Every record name and config/metric key either side reads or writes is defined
here, once.

Server → client (in the train message's ConfigRecord, next to the inner
strategy's own keys):

* ``conef.method.<field>``: the :class:`~conef_fl.config.MethodConfig` the client runs;
* ``conef.method-name``, ``conef.round-seed`` (the round's shared seed),
  ``conef.arrays-key`` (where the global model is), ``conef.allow-state-reset``;
* with a compressed downlink: ``conef.down.<field>``, ``conef.downlink-mode``,
  ``conef.model-version``, ``conef.base-version``, ``conef.downlink-rounds``,
  ``conef.downlink-seeds`` and one record pair ``conef.down-<round>`` /
  ``conef.down-<round>-meta`` per missed round.

Discovery (once per new node, :mod:`~conef_fl.flower.sampling`): a train message with
only ``conef-discover`` / ``conef.discover``; the mod answers with ``conef.partition-id``.

Client → server: the local model's ArrayRecord is replaced by
``conef.payload`` (wire arrays) + ``conef.payload-meta`` (scalars); the user's
MetricRecord is kept and gains the ``conef.*`` metrics below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conef_fl.config import MethodConfig

PREFIX = "conef."
METHOD_PREFIX = "conef.method."
METHOD_NAME_KEY = "conef.method-name"
ROUND_SEED_KEY = "conef.round-seed"
ARRAYS_KEY_KEY = "conef.arrays-key"
ALLOW_STATE_RESET_KEY = "conef.allow-state-reset"
#: Config key (value True) of a discovery message: the node answers with its partition id only.
DISCOVER_KEY = "conef.discover"
#: The ConfigRecord that carries :data:`DISCOVER_KEY`.
DISCOVER_RECORD = "conef-discover"
#: Flower's own key for the round number (FedAvg's ``configure_train`` writes it).
SERVER_ROUND_KEY = "server-round"

PAYLOAD_RECORD = "conef.payload"
PAYLOAD_META_RECORD = "conef.payload-meta"

# compressed downlink
DOWN_PREFIX = "conef.down."
DOWNLINK_MODE_KEY = "conef.downlink-mode"
MODEL_VERSION_KEY = "conef.model-version"
BASE_VERSION_KEY = "conef.base-version"
DOWNLINK_ROUNDS_KEY = "conef.downlink-rounds"
DOWNLINK_SEEDS_KEY = "conef.downlink-seeds"


def downlink_record(server_round: int) -> tuple[str, str]:
    """Record names (arrays, meta) of the downlink payload of ``server_round``."""
    return f"conef.down-{server_round}", f"conef.down-{server_round}-meta"


# metrics the mod adds to the user's MetricRecord
M_ROUND = "conef.server-round"
M_UPLINK_BYTES = "conef.uplink-bytes"
M_DENSE_BYTES = "conef.dense-bytes"
M_ERROR_STATE_BYTES = "conef.error-state-bytes"
M_SERIALIZED_STATE_BYTES = "conef.serialized-state-bytes"
M_STATE_SOURCE = "conef.state-source"
M_STATE_SAVED = "conef.state-saved"
M_PEAK_RSS = "conef.peak-rss-bytes"
#: The node config's ``partition-id`` (-1 without one): replies are summed in (partition, node) order, which
#: is the same in every run even where node IDs are assigned anew (deployment).
M_PARTITION = "conef.partition-id"
#: Every metric key the mod writes (the wrapper refuses replies without them).
CLIENT_METRICS = (M_ROUND, M_UPLINK_BYTES, M_DENSE_BYTES, M_ERROR_STATE_BYTES, M_SERIALIZED_STATE_BYTES,
                  M_STATE_SOURCE, M_STATE_SAVED)
#: ``conef.state-source`` codes.
STATE_SOURCES = {"fresh": 0, "memory": 1, "disk": 2, "refused": 3, "mismatch": 4}


def method_to_config(method: MethodConfig, prefix: str = METHOD_PREFIX) -> dict[str, Any]:
    """A method config as flat ConfigRecord entries ``<prefix><field>``."""
    return {prefix + k: v for k, v in method.to_dict().items()}


def method_from_config(config: Mapping[str, Any], prefix: str = METHOD_PREFIX) -> MethodConfig:
    """Inverse of :func:`method_to_config` (ignores other keys; validates; ``ValueError`` if none)."""
    values = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    if not values:
        raise ValueError(f"the message config has no '{prefix}*' keys")
    return MethodConfig.from_dict(values)
