"""The compressor core and the DDP hook on a GPU: NCCL against gloo, CUDA against CPU.

Skipped without CUDA (CI has none). One process: a world of size 1 whose default
group has both backends (``cpu:gloo,cuda:nccl``), so the same hook runs over gloo
on CPU tensors and over NCCL on CUDA tensors, from the same initial model and data.
With one rank the all-reduce is an identity, so what is compared is everything
the hook computes around it: compression, error feedback, the sketch, scatter-back.
(Two NCCL ranks need two GPUs; ``sim.ddp_train`` under ``torchrun`` covers that.)
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from ddp.harness import free_port
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from conef_fl.ddp import expected_bytes_per_step, register_conef_hook
from conef_fl.error_stores.sketch import CountSketch, SketchGeometry
from conef_fl.feedback import make_compressor_for, make_feedback
from conef_fl.registry import method_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on CI machines)")

STEPS = 8


@pytest.fixture(scope="module")
def process_group():
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc1 = nn.Linear(8 * 26 * 26, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _train(device: str, method: str, **overrides: Any) -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Net()
        g = torch.Generator().manual_seed(1)
        x_fixed = torch.randn(16, 1, 28, 28, generator=g)  # one batch, seen every step: the loss must fall
        y_fixed = torch.randint(0, 10, (16,), generator=g)
    model = model.to(device)
    ddp = DDP(model, device_ids=[0] if device == "cuda" else None)
    state = register_conef_hook(ddp, method, warmup_steps=1, **overrides)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = x_fixed.to(device), y_fixed.to(device)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    flat = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
    return {
        "params": flat,
        "losses": losses,
        "sent": state.last_bytes_sent,
        "expected": expected_bytes_per_step(state),
        "error_bytes": state.stats()["error_state_bytes"],
    }


#: Q selects by value (sign, top-k, PowerSGD's projections): a CUDA-vs-CPU rounding difference near a
#: threshold (a tiny value's sign, the k-th largest magnitude) flips a few selections: a loose match only.
_SELECTS_BY_VALUE = {"ef-sign", "ef-topk", "ef-powersgd", "conef-powersgd"}


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("efsgd", {"compressor": "random-block-k", "k_ratio": 0.1}),
        ("conef-cs", {"compressor": "random-block-k", "k_ratio": 0.1, "sketch_ratio": 0.1, "beta": 0.9}),
        ("conef-cs", {"compressor": "random-k", "k_ratio": 0.05, "sketch_ratio": 0.2, "beta": 0.5}),
        ("conef-cs", {"compressor": "random-block-k", "k_ratio": 0.1, "sketch_ratio": 0.1, "sketch_rows": 3}),
        ("ef-sign", {}),
        ("ef-topk", {"k_ratio": 0.05}),
        ("ef-powersgd", {"rank": 2}),
        ("conef-powersgd", {"rank": 2}),
    ],
)
def test_nccl_on_cuda_matches_gloo_on_cpu(process_group, method: str, overrides: dict) -> None:
    cpu = _train("cpu", method, **overrides)
    gpu = _train("cuda", method, **overrides)
    assert gpu["sent"] == cpu["sent"] == gpu["expected"]
    assert gpu["error_bytes"] == cpu["error_bytes"]
    assert torch.isfinite(gpu["params"]).all()
    # cuDNN's convolution sums in another order than the CPU's: differences of ~1e-6 per step
    torch.testing.assert_close(torch.tensor(gpu["losses"]), torch.tensor(cpu["losses"]), rtol=1e-2, atol=1e-3)
    if method in _SELECTS_BY_VALUE:
        rel = torch.linalg.vector_norm(gpu["params"] - cpu["params"]) / torch.linalg.vector_norm(cpu["params"])
        assert rel < 5e-2, f"relative L2 distance {rel:.3g}"
    else:
        torch.testing.assert_close(gpu["params"], cpu["params"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_count_sketch_on_cuda_matches_cpu(dtype: torch.dtype) -> None:
    d, w = 1_000_003, 100_000
    g = torch.Generator().manual_seed(3)
    u = torch.randn(d, generator=g)
    est = {}
    for device in ("cpu", "cuda"):
        sk = CountSketch(SketchGeometry.for_ratio(d, w / d), seed=7, dtype=dtype, device=device)
        sk.accumulate_(u.to(device))
        sk.accumulate_block_(u[10_000:60_000].to(device), 10_000, alpha=-0.5)
        est[device] = sk.decompress().float().cpu()
    # bf16 keeps 8 bits of mantissa: one rounding step at |x| in [8, 16) is 0.0625, and the two
    # devices may round partial sums in another order (measured on an H100: 0.094 max, 134 of 1M)
    rtol, atol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-2), torch.bfloat16: (1.6e-2, 0.13)}[dtype]
    torch.testing.assert_close(est["cuda"], est["cpu"], rtol=rtol, atol=atol)


def test_conef_worker_on_cuda_matches_cpu() -> None:
    cfg = method_config("conef-cs", compressor="random-block-k", k_ratio=0.1, sketch_ratio=0.1, beta=0.9)
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(50_000, generator=g) for _ in range(6)]
    q = make_compressor_for(cfg)
    outs = {}
    for device in ("cpu", "cuda"):
        fb = make_feedback(cfg, (50_000,), device=device)
        sent = [q.decompress(fb.step(x.to(device), seed=i)).cpu() for i, x in enumerate(grads)]
        outs[device] = torch.stack(sent)
    torch.testing.assert_close(outs["cuda"], outs["cpu"], rtol=1e-4, atol=1e-5)
