"""The app's configuration schema: every key of ``[tool.flwr.app.config]``, declared once.

Each :class:`AppKey` has the name as the user types it (kebab-case), its type,
default, allowed values, who reads it and a one-line help. Everything else is
derived from :data:`APP_KEYS`:

* :class:`AppConfig`, the validated settings object the ServerApp, the ClientApp
  and the ``sim`` commands read (attribute names are the keys in snake_case);
* the method keys, which are :class:`~conef_fl.config.MethodConfig`'s own field
  declarations (so a method setting has one default, one range, one help);
* ``--set key=value`` parsing in the ``sim`` commands (:func:`parse_overrides`);
* a test that the ``pyproject.toml`` defaults agree with the schema.

Unknown keys and wrong types are refused with a ``ValueError`` that names the
key as the user typed it and suggests near matches, e.g.
``local-lr='fast' is not a number``.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from conef_fl.config import FIELD_HELP, FIELD_SPECS, MethodConfig, ValueSpec

#: Method names (``conef_fl.registry``); repeated here as a literal so the schema has no heavy imports.
METHODS = (
    "sgd", "efsgd", "conef-cs", "partial-efsgd", "conef-q", "iconef-v1", "iconef-v2", "hefsgd", "qsgd",
    "rbsgd", "atomo", "ef-topk", "ef-sign", "ef-powersgd", "conef-powersgd", "decayed-efsgd",
)
#: Inner Flower strategies the ServerApp can wrap (``server.strategies``).
INNER_STRATEGIES = (
    "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum",
)
DATASETS = ("digits", "mnist", "shakespeare")
PARTITIONINGS = ("iid", "dirichlet", "pathological", "natural")
MODELS = ("auto", "mlp", "cnn", "char-lstm", "mlp-wide", "char-gru")
DOWNLINKS = ("", "dense", "random-block-k", "random-k", "top-k", "scaled-sign", "qsgd", "rbsgd", "identity")
#: Method fields that the method name sets (not user keys) or that come from another key (``seed``).
_NOT_KEYS = ("feedback", "error_compressor", "seed")

#: Who reads a key: the ServerApp, the ClientApp, or both. ``node`` keys may also be
#: set per SuperNode with ``--node-config`` (which wins over the run config).
SERVER, CLIENT, BOTH, NODE = "server", "client", "both", "node"


@dataclass(frozen=True)
class AppKey:
    """One app config key."""

    name: str
    spec: ValueSpec
    default: Any
    help: str
    reader: str = SERVER
    #: The :class:`MethodConfig` field it sets ("" for app keys).
    method_field: str = ""

    @property
    def attr(self) -> str:
        """Attribute name in :class:`AppConfig`."""
        return self.name.replace("-", "_")


def _k(name: str, spec: ValueSpec, default: Any, help: str, reader: str = SERVER) -> AppKey:  # noqa: A002
    return AppKey(name, spec, default, help, reader)


def _int(lo: int | None = None, hi: int | None = None) -> ValueSpec:
    return ValueSpec("int", lo, hi)


def _float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> ValueSpec:
    return ValueSpec("float", lo, hi, lo_open=lo_open, hi_open=hi_open)


_STR = ValueSpec("str")
_BOOL = ValueSpec("bool")


def _method_keys() -> tuple[AppKey, ...]:
    defaults = MethodConfig()
    return tuple(
        AppKey(name.replace("_", "-"), spec, getattr(defaults, name), FIELD_HELP[name], SERVER, name)
        for name, spec in FIELD_SPECS.items()
        if name not in _NOT_KEYS
    )


#: Every app key, in the order of ``pyproject.toml``.
APP_KEYS: tuple[AppKey, ...] = (
    # rounds and sampling
    _k("num-server-rounds", _int(1, 1_000_000), 100, "federated rounds"),
    _k("fraction-train", _float(0.0, 1.0, lo_open=True), 0.1, "fraction of connected nodes sampled per round"),
    _k("fraction-evaluate", _float(0.0, 1.0), 0.0, "fraction of nodes for federated evaluation (0 = off)"),
    _k("min-train-nodes", _int(1), 2, "fewest nodes a round trains with"),
    _k("min-available-nodes", _int(1), 2, "nodes to wait for before sampling (sim.run sets it to the node count)"),
    _k("sampling", ValueSpec("str", choices=("random", "cyclic")), "random",
       "random (seeded) or cyclic (nodes in order, each trains once every 1/fraction-train rounds)"),
    _k("sample-by", ValueSpec("str", choices=("partition", "node")), "partition",
       "draw over the nodes' data partitions (same partitions on every engine; node ids where unknown) or node ids"),
    _k("node-wait-seconds", _float(0.0, 86_400.0, lo_open=True), 120.0,
       "how long to wait for min-available-nodes; then run with the nodes there (>= min-train-nodes) or stop"),
    # the server's strategy
    _k("inner-strategy", ValueSpec("str", choices=INNER_STRATEGIES), "fedavg", "Flower strategy ConEF wraps"),
    _k("server-lr", _float(0.0), 0.0,
       "server step size: FedAvgM's server_learning_rate, FedAdam/FedYogi/FedAdagrad's eta (0 = the strategy's "
       "default)"),
    _k("server-momentum", _float(0.0, 1.0, hi_open=True), 0.0, "FedAvgM's server momentum"),
    _k("proximal-mu", _float(0.0), 0.0, "FedProx's proximal term (clients add mu/2 ||w - w_global||^2)", BOTH),
    _k("fedopt-tau", _float(0.0, lo_open=True), 1e-3, "FedAdam/FedYogi/FedAdagrad's adaptivity tau"),
    _k("fedopt-beta-1", _float(0.0, 1.0, hi_open=True), 0.9, "FedAdam/FedYogi's first-moment decay"),
    _k("fedopt-beta-2", _float(0.0, 1.0, hi_open=True), 0.99, "FedAdam/FedYogi's second-moment decay"),
    _k("trimmed-beta", _float(0.0, 0.5, hi_open=True), 0.2, "FedTrimmedAvg's cut fraction per side"),
    _k("num-malicious-nodes", _int(0), 0, "Krum's assumed number of malicious nodes"),
    # robustness
    _k("max-update-norm", _float(0.0), 0.0, "refuse replies whose update L2 norm is larger (0 = off)"),
    _k("norm-guard", _float(0.0), 10.0,
       "refuse replies whose update norm exceeds this many times the round's median (0 = off)"),
    _k("allow-state-reset", _BOOL, False,
       "clients whose stored error state is for another method config start afresh instead of refusing"),
    # method
    _k("method", ValueSpec("str", choices=METHODS), "conef-cs", "compression method (see the README's table)"),
    *_method_keys(),
    # local training on clients
    _k("local-epochs", _int(0, 10_000), 0, "local epochs per round instead of local-steps (0 = use local-steps)",
       CLIENT),
    _k("local-steps", _int(0, 10_000_000), 10, "local SGD steps per round while local-epochs = 0 (the same work on any "
       "partition size)", CLIENT),
    _k("batch-size", _int(1, 1_000_000), 8, "local batch size", CLIENT),
    _k("local-lr", _float(0.0, 100.0, lo_open=True), 0.2, "local learning rate", CLIENT),
    _k("lr-decay-rounds", _STR, "", "rounds from which local-lr is multiplied by lr-decay-factor, e.g. '200,260'",
       CLIENT),
    _k("lr-decay-factor", _float(0.0, 1.0, lo_open=True), 0.1, "step decay factor of local-lr", CLIENT),
    _k("local-momentum", _float(0.0, 1.0, hi_open=True), 0.0, "local SGD momentum", CLIENT),
    _k("weight-decay", _float(0.0, 1.0), 0.0, "local SGD weight decay", CLIENT),
    _k("train-device", _STR, "cpu", "device clients train on ('cpu', 'cuda', 'cuda:1'); compression stays on CPU",
       NODE),
    # data and model
    _k("dataset", ValueSpec("str", choices=DATASETS), "digits",
       "digits (bundled with scikit-learn), mnist, shakespeare", BOTH),
    _k("data-dir", _STR, "", "dataset folder ('' = ../shared/data/<dataset>)", NODE),
    _k("partitioning", ValueSpec("str", choices=PARTITIONINGS), "iid", "how the training set is split", CLIENT),
    _k("dirichlet-alpha", _float(0.0, lo_open=True), 0.5, "Dirichlet concentration (partitioning=dirichlet)",
       CLIENT),
    _k("num-partitions", _int(0), 0,
       "partitions of the data (0 = the node config's num-partitions, which the simulation sets)", NODE),
    _k("model", ValueSpec("str", choices=MODELS), "auto", "model architecture (auto: the dataset's default)", BOTH),
    _k("seed", _int(0, 2**31 - 1), 0, "seed of the model, the data split, the round seeds and the sampling", BOTH),
    # outputs
    _k("output-dir", _STR, "outputs", "results folder (relative: to the directory you started from)"),
    _k("run-name", _STR, "", "results subfolder and client state key ('' = <method>-<dataset>-<time>)", BOTH),
    _k("eval-every", _int(1), 1, "central evaluation every this many rounds (and the last)"),
    _k("checkpoint-dir", _STR, "", "server checkpoints ('' = the run's output folder)"),
    _k("resume", _BOOL, False, "continue from the checkpoint of run-name"),
    # compressed downlink
    _k("downlink", ValueSpec("str", choices=DOWNLINKS), "", "'' = dense model to clients; or a compressor"),
    _k("downlink-k-ratio", _float(0.0, 1.0, lo_open=True), 0.1, "fraction the downlink compressor keeps"),
    _k("downlink-log-rounds", _int(1, 10_000), 50, "rounds of downlink updates kept to catch up stale clients"),
    # client state
    _k("state-dir", _STR, "", "clients keep their error state on disk here, in memory only a pointer ('' = in memory)",
       NODE),
    _k("state-max-bytes", _int(1024, 1 << 34), 64 * 1024 * 1024, "largest state file a client writes or reads",
       NODE),
)

KEYS: dict[str, AppKey] = {k.name: k for k in APP_KEYS}
#: Keys only a SuperNode's ``--node-config`` sets (never in the run config).
NODE_ONLY_KEYS = {"partition-id": _int(0)}

AppConfig = dataclasses.make_dataclass(
    "AppConfig",
    [(k.attr, Any, dataclasses.field(default=k.default)) for k in APP_KEYS],
    frozen=True,
)
AppConfig.__module__ = __name__
AppConfig.__doc__ = """Validated app settings; one attribute per :data:`APP_KEYS` entry (snake_case)."""


def _suggest(name: str, names: Iterable[str]) -> str:
    near = difflib.get_close_matches(name, list(names), n=2)
    return f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""


def check_key(name: str, value: Any, *, where: str = "run config") -> Any:
    """The validated value of one key; ``ValueError`` naming ``name`` as typed for bad names and values."""
    key = KEYS.get(name)
    if key is None:
        raise ValueError(f"unknown {where} key {name!r}{_suggest(name, KEYS)}")
    return key.spec.check(name, value)


def read_app_config(*sources: Mapping[str, Any], where: str = "run config") -> Any:
    """An :class:`AppConfig` from mappings of user keys; later sources win, missing keys take defaults.

    Raises
    ------
    ValueError
        Naming the first unknown key (with near matches) or bad value, and checking
        the keys that depend on each other (local epochs/steps, lr-decay-rounds).
    """
    values: dict[str, Any] = {}
    for src in sources:
        for name, value in src.items():
            values[name] = check_key(name, value, where=where)
    cfg = AppConfig(**{KEYS[n].attr: v for n, v in values.items()})
    _check_together(cfg)
    return cfg


def _check_together(cfg: Any) -> None:
    if cfg.local_epochs == 0 and cfg.local_steps == 0:
        raise ValueError("local-epochs=0 and local-steps=0: one of them must be >= 1")
    decay_rounds(cfg)
    if cfg.inner_strategy == "fedavg" and cfg.server_lr not in (0.0, 1.0):
        raise ValueError(f"server-lr={cfg.server_lr!r} needs a strategy with a server step; "
                         "use inner-strategy='fedavgm' (or fedadam, fedyogi, fedadagrad)")
    if cfg.server_momentum and cfg.inner_strategy != "fedavgm":
        raise ValueError(f"server-momentum={cfg.server_momentum!r} is FedAvgM's; set inner-strategy='fedavgm'")


def decay_rounds(cfg: Any) -> tuple[int, ...]:
    """``lr-decay-rounds`` as sorted rounds (``"200,260"`` → ``(200, 260)``)."""
    text = str(cfg.lr_decay_rounds).strip()
    if not text:
        return ()
    try:
        rounds = tuple(sorted(int(x) for x in text.split(",")))
    except ValueError:
        raise ValueError(
            f"lr-decay-rounds={cfg.lr_decay_rounds!r} is not a comma-separated list of rounds, e.g. '200,260'"
        ) from None
    if any(r < 1 for r in rounds):
        raise ValueError(f"lr-decay-rounds={cfg.lr_decay_rounds!r} is out of range; allowed: rounds >= 1")
    return rounds


def local_lr_at(cfg: Any, server_round: int) -> float:
    """The clients' learning rate in ``server_round`` (step decay by ``lr-decay-factor``)."""
    passed = sum(1 for r in decay_rounds(cfg) if server_round >= r)
    return float(cfg.local_lr * cfg.lr_decay_factor**passed)


def method_settings(cfg: Any) -> dict[str, Any]:
    """The :class:`MethodConfig` fields the app config sets (``seed`` included)."""
    out = {k.method_field: getattr(cfg, k.attr) for k in APP_KEYS if k.method_field}
    out["seed"] = cfg.seed
    return out


def parse_value(raw: str) -> Any:
    """A command-line value parsed as TOML (``0.1`` → float, ``true`` → bool); plain words stay strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings → validated values; ``ValueError`` naming the key as typed."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        name, raw = item.split("=", 1)
        name = name.strip()
        out[name] = check_key(name, parse_value(raw.strip()), where="app config")
    read_app_config(out, where="app config")  # keys that depend on each other
    return out


def render_toml() -> str:
    """The ``[tool.flwr.app.config]`` table with every key's default and help (for pyproject.toml)."""
    lines = ["[tool.flwr.app.config]"]
    for k in APP_KEYS:
        value = k.default
        text = ("true" if value else "false") if isinstance(value, bool) else (
            f'"{value}"' if isinstance(value, str) else repr(value))
        lines.append(f"{k.name} = {text}".ljust(34) + f"# {k.help}")
    return "\n".join(lines) + "\n"


def defaults() -> dict[str, Any]:
    """Every key with its default (what ``[tool.flwr.app.config]`` must say)."""
    return {k.name: k.default for k in APP_KEYS}
