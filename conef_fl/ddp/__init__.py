"""PyTorch DDP communication hooks over the compression core: ``state`` (the hook-state base),
``segments`` (the planner), ``comm`` (every ``torch.distributed`` call), the hooks ``conef`` (with
its ``powersgd`` path) and ``liec``. Layout and use: ``docs/ddp.md``."""

from conef_fl.ddp.conef import (
    ConEFHookState,
    conef_hook,
    dense_error_bytes,
    expected_bytes_per_step,
    register_conef_hook,
    supported_compressors,
)
from conef_fl.ddp.liec import (
    COMPENSATIONS,
    DOWNLINK_FEEDBACKS,
    LIECHookState,
    default_downlink,
    default_uplink,
    downlink_compressors,
    liec_average_,
    liec_hook,
    register_liec_hook,
)

__all__ = [
    "COMPENSATIONS",
    "DOWNLINK_FEEDBACKS",
    "ConEFHookState",
    "LIECHookState",
    "conef_hook",
    "default_downlink",
    "default_uplink",
    "dense_error_bytes",
    "downlink_compressors",
    "expected_bytes_per_step",
    "liec_average_",
    "liec_hook",
    "register_conef_hook",
    "register_liec_hook",
    "supported_compressors",
]
