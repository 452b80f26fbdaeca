"""The project's ServerApp and ClientApp with a 1.07M-parameter MLP, for the 10,000-client scale run.

The app's models stop at 185k parameters (MNIST CNN), and ``model`` has no wider
choice in the app config schema. This module serves the very same apps
(:data:`server.server_app.app`, :data:`clients.client_app.app`: data, local
training, ``conef_mod``, the ConEF wrapper, results) with one substitution: for
MNIST, ``build_model`` returns :data:`WIDE_HIDDEN` = 784-1024-256-10
(1,068,810 parameters), on the server and on every client. ``sim.scale`` runs
it through an app folder written by :func:`sim.metrics_probe.write_app_dir`.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from torch import nn

import clients.client_app as _client
import server.server_app as _server
from conef_fl.flower import conef_mod
from conef_fl.tasks import build_model as _project_build_model
from conef_fl.tasks.models import MLP

#: Hidden widths of the scale model (784 inputs, 10 classes): 1,068,810 parameters.
WIDE_HIDDEN = (1024, 256)
#: Component strings for ``pyproject.toml``.
SERVERAPP = "sim.scale_app:server_app"
CLIENTAPP = "sim.scale_app:client_app"


def build_wide_model(task: Any, model: str = "auto", *, seed: int | None = None) -> nn.Module:
    """The 1.07M-parameter MLP for MNIST (any ``model`` value); other tasks get the project's model."""
    name = task if isinstance(task, str) else getattr(task, "name", "")
    if name != "mnist":
        return _project_build_model(task, model, seed=seed)
    if seed is None:
        return MLP(28 * 28, WIDE_HIDDEN, 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(28 * 28, WIDE_HIDDEN, 10)


# both apps look ``build_model`` up in their own module at call time
_server.build_model = build_wide_model
_client.build_model = build_wide_model
server_app = _server.app

#: The project's ClientApp functions behind a ClientApp of this module. Flower's simulation
#: pickles the loaded ClientApp to its Ray actors, and functions travel by reference: with
#: the functions defined here, an actor imports this module (and so applies the substitution)
#: before it calls the project's train/evaluate.
client_app = ClientApp(mods=[conef_mod])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """The project's train function (with the wide model)."""
    return _client.train(msg, context)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The project's evaluate function (with the wide model)."""
    return _client.evaluate_fn(msg, context)
