"""The inner Flower strategy named by ``inner-strategy``, built from the app config."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)


def build_inner_strategy(cfg: Any) -> Strategy:
    """``cfg.inner_strategy`` with the sampling and server-step settings of ``cfg``.

    ``server-lr = 0`` keeps the strategy's own default step size.
    """
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": min(2, cfg.min_available_nodes),
        "min_available_nodes": cfg.min_available_nodes,
    }
    lr = {"eta": cfg.server_lr} if cfg.server_lr else {}
    betas = {"beta_1": cfg.fedopt_beta_1, "beta_2": cfg.fedopt_beta_2}
    builders = {
        "fedavg": lambda: FedAvg(**common),
        "fedavgm": lambda: FedAvgM(**common, server_learning_rate=cfg.server_lr or 1.0,
                                   server_momentum=cfg.server_momentum),
        "fedprox": lambda: FedProx(**common, proximal_mu=cfg.proximal_mu),
        "fedadam": lambda: FedAdam(**common, **lr, tau=cfg.fedopt_tau, **betas),
        "fedyogi": lambda: FedYogi(**common, **lr, tau=cfg.fedopt_tau, **betas),
        "fedadagrad": lambda: FedAdagrad(**common, **lr, tau=cfg.fedopt_tau),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=cfg.trimmed_beta),
        "krum": lambda: Krum(**common, num_malicious_nodes=cfg.num_malicious_nodes),
    }
    if cfg.inner_strategy not in builders:
        raise ValueError(f"inner-strategy={cfg.inner_strategy!r} is not valid; allowed: {', '.join(builders)}")
    return builders[cfg.inner_strategy]()
