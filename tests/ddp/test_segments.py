"""``conef_fl.ddp.segments``: the segment planner on hand-made buckets (single process)."""

from __future__ import annotations

import torch
from torch import nn

from conef_fl.ddp import ConEFHookState
from conef_fl.ddp.segments import plan, scatter_back


class FakeBucket:
    """What the planner reads of a ``dist.GradBucket``: gradients are views of one flat buffer."""

    def __init__(self, params: list[nn.Parameter], index: int = 0, last: bool = True) -> None:
        self.params, self._index, self._last = params, index, last
        self.flat = torch.arange(sum(p.numel() for p in params), dtype=torch.float32)
        self.grads, off = [], 0
        for p in params:
            self.grads.append(self.flat[off : off + p.numel()].view(p.shape))
            off += p.numel()

    def parameters(self) -> list[nn.Parameter]:
        return self.params

    def gradients(self) -> list[torch.Tensor]:
        return self.grads

    def buffer(self) -> torch.Tensor:
        return self.flat

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def _state(model: nn.Module, **overrides: object) -> ConEFHookState:
    return ConEFHookState.from_method("conef-cs", **overrides).bind(model)  # type: ignore[return-value]


def test_layerwise_segments_are_parameters_viewing_the_bucket() -> None:
    model = _model()
    state = _state(model)
    bucket = FakeBucket(list(model.parameters()))
    works = plan(state, bucket, bucket.flat, layerwise=True)
    assert [w.seg.key for w in works] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [w.seg.shape for w in works] == [(3, 4), (3,), (2, 3), (2,)]
    for w, g in zip(works, bucket.grads, strict=True):
        assert w.vec.data_ptr() == g.data_ptr() and w.scatter is None
    reordered = FakeBucket(list(model.parameters())[::-1])
    plan(state, reordered, reordered.flat, layerwise=True)  # another order
    assert state.segments_created == 4  # keyed by name: the layout does not matter


def test_flat_segment_is_the_bucket_and_a_new_layout_replaces_it() -> None:
    model = _model()
    state = _state(model, layerwise=False)
    params = list(model.parameters())
    state.ddp_iter = 1  # not a new DDP model: no gathering of saved segments
    whole = FakeBucket(params)
    (w,) = plan(state, whole, whole.flat, layerwise=False)
    assert w.seg.key == "bucket0" and w.seg.numel == 23 and w.seg.shape == (23,)
    bucket = FakeBucket(params[:2], index=1)
    plan(state, bucket, bucket.flat, layerwise=False)
    assert list(state.segments) == [("0.weight", "0.bias")]  # the overlapping old layout is dropped
    assert state.segments_created == 2


def test_saved_flat_segments_cover_a_new_models_first_layout() -> None:
    model = _model()
    state = _state(model, layerwise=False)
    params = list(model.parameters())
    first, second = FakeBucket(params[:2], index=0), FakeBucket(params[2:], index=1)
    state.ddp_iter = 1
    for b in (first, second):
        plan(state, b, b.flat, layerwise=False)
    state.bind(model)  # a new DDP model: its first layout is one bucket, in another order
    merged = FakeBucket(params[::-1])
    works = plan(state, merged, merged.flat, layerwise=False)
    assert state.segments_created == 2  # the saved segments are reused
    assert sorted(w.seg.key for w in works) == ["bucket0", "bucket1"]
    by_key = {w.seg.key: w for w in works}
    assert torch.equal(by_key["bucket0"].vec, torch.cat([merged.grads[3].reshape(-1), merged.grads[2]]))
    by_key["bucket0"].vec.fill_(-1.0)
    scatter_back(works)
    assert (merged.grads[3] == -1).all() and (merged.grads[2] == -1).all() and (merged.grads[0] >= 0).all()
