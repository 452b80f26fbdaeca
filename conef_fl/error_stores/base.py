"""Error memories: how a worker stores its error-feedback vector between steps.

An :class:`ErrorStore` holds a compressed representation of the error ``e``
of one flat tensor of ``numel`` elements. Linear stores (the count sketch, the
dense identity store) can be *accumulated* into without decompressing; the
others are *assigned* a new vector each step (``state ← C(x)``).

All estimate/accumulate operations work in place and in bounded chunks, so no
operation creates a temporary of ``numel`` elements unless documented.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch


class NonFiniteError(ValueError):
    """An update or a state contains NaN or Inf."""

    @classmethod
    def refusal(cls, what: str) -> NonFiniteError:
        """The refusal of ``what`` (an update), with the error state left untouched: one wording everywhere."""
        return cls(f"{what} contains NaN or Inf; refused (error state left untouched)")


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` if ``x`` has NaN/Inf.

    Fast path: one ``sum`` (a streaming reduction, no temporary of ``x``'s size); only
    when the sum is not finite — NaN/Inf, or a sum of huge finite values that
    overflowed — is the exact element-wise check run.
    """
    if x.numel() == 0:
        return
    flat = x.detach().reshape(-1)
    if bool(torch.isfinite(flat.sum(dtype=torch.float64 if flat.dtype == torch.float64 else torch.float32))):
        return
    if not bool(torch.isfinite(torch.linalg.vector_norm(flat, ord=float("inf")))):
        raise NonFiniteError.refusal(what)


class ErrorStore(ABC):
    """Compressed storage of one error vector (the error compressor C)."""

    #: ``accumulate_`` is available: ``C(a + b) = C(a) + C(b)``.
    linear: ClassVar[bool] = False
    name: ClassVar[str] = ""

    numel: int

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes kept between steps (the storage of every persistent tensor)."""

    @abstractmethod
    def persistent_tensors(self) -> list[torch.Tensor]:
        """Every tensor kept between steps."""

    @abstractmethod
    def estimate_add_(self, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha · ê`` in place."""

    @abstractmethod
    def estimate_at(self, indices: torch.Tensor) -> torch.Tensor:
        """ê at flat ``indices`` (float32)."""

    @abstractmethod
    def estimate_block(self, start: int, length: int) -> torch.Tensor:
        """ê on ``[start, start + length)`` (float32)."""

    @abstractmethod
    def assign_(self, x: torch.Tensor) -> ErrorStore:
        """``state ← C(x)`` (x is not modified)."""

    @abstractmethod
    def zero_(self) -> ErrorStore:
        """``state ← 0``."""

    @abstractmethod
    def state_dict(self) -> dict[str, object]:
        """Everything needed to restore the store, with validation metadata."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore from :meth:`state_dict`, validating shapes, dtypes and parameters."""

    def estimate_block_add_(self, target: torch.Tensor, start: int, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha · ê[start : start + len(target)]`` in bounded chunks."""
        flat = target.view(-1)
        step = 1 << 16
        for off in range(0, flat.numel(), step):
            n = min(step, flat.numel() - off)
            flat[off : off + n].add_(self.estimate_block(start + off, n).to(flat.dtype), alpha=alpha)
        return target

    def estimate_span(self, source: torch.Tensor, lo: int, hi: int, alpha: float = 1.0) -> torch.Tensor | None:
        """``source[lo:hi] + alpha · ê[lo:hi]`` in a new buffer, where a store has a fast path; else ``None``."""
        return None

    def decompress(self) -> torch.Tensor:
        """ê as a new dense float32 vector (allocates ``numel`` floats: tests and inspection only)."""
        out = torch.zeros(self.numel, dtype=torch.float32, device=self.persistent_tensors()[0].device)
        return self.estimate_add_(out)

    def reuse_hashes(self) -> contextlib.AbstractContextManager[object]:
        """A ``with`` block inside which per-call structures (hashes) are computed once (default: none)."""
        return contextlib.nullcontext(self)

    # Linear stores only -------------------------------------------------------
    def accumulate_(self, x: torch.Tensor, alpha: float = 1.0) -> ErrorStore:
        """``state ← state + alpha · C(x)``."""
        raise NotImplementedError(f"{type(self).__name__} is not linear")

    def accumulate_block_(self, values: torch.Tensor, start: int, alpha: float = 1.0) -> ErrorStore:
        """``state ← state + alpha · C(z)``, ``z`` zero except on ``[start, start+len(values))``."""
        raise NotImplementedError(f"{type(self).__name__} is not linear")

    def accumulate_sparse_(self, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> ErrorStore:
        """``state ← state + alpha · C(z)``, ``z`` zero except ``z[indices] = values``."""
        raise NotImplementedError(f"{type(self).__name__} is not linear")

    def subtract_estimate_feedback_(self, coeff: float) -> bool:
        """Try ``state ← state − coeff · C(ê)`` exactly and cheaply; return False if unsupported."""
        return False


def _check_same(name: str, got: object, expected: object) -> None:
    if got != expected:
        raise ValueError(f"error state has {name}={got!r}, expected {expected!r}")


def validate_tensor(state: Mapping[str, object], key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Fetch ``state[key]`` and check it is a tensor of ``shape`` and ``dtype``."""
    t = state.get(key)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"error state entry {key!r} is missing or not a tensor (got {type(t).__name__})")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"error state entry {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise ValueError(f"error state entry {key!r} has dtype {t.dtype}, expected {dtype}")
    return t


class DenseError(ErrorStore):
    """The identity error compressor: a dense float32 vector (what EFSGD keeps; 4·numel bytes)."""

    linear = True
    name = "identity"

    def __init__(self, numel: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.numel = int(numel)
        self.e = torch.zeros(self.numel, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.e.untyped_storage().nbytes()

    def persistent_tensors(self) -> list[torch.Tensor]:
        return [self.e]

    def estimate_add_(self, target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        target.view(-1).add_(self.e.to(target.dtype), alpha=alpha)
        return target

    def estimate_at(self, indices: torch.Tensor) -> torch.Tensor:
        return self.e.index_select(0, indices.reshape(-1).to(self.e.device, torch.int64)).float()

    def estimate_block(self, start: int, length: int) -> torch.Tensor:
        return self.e[start : start + length].float().clone()

    def assign_(self, x: torch.Tensor) -> DenseError:
        self.e.copy_(x.reshape(-1))
        return self

    def zero_(self) -> DenseError:
        self.e.zero_()
        return self

    def accumulate_(self, x: torch.Tensor, alpha: float = 1.0) -> DenseError:
        self.e.add_(x.reshape(-1).to(self.e.dtype), alpha=alpha)
        return self

    def accumulate_block_(self, values: torch.Tensor, start: int, alpha: float = 1.0) -> DenseError:
        self.e[start : start + values.numel()].add_(values.reshape(-1).to(self.e.dtype), alpha=alpha)
        return self

    def accumulate_sparse_(self, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> DenseError:
        idx = indices.reshape(-1).to(self.e.device, torch.int64)
        self.e.index_add_(0, idx, values.reshape(-1).to(self.e.dtype), alpha=alpha)
        return self

    def subtract_estimate_feedback_(self, coeff: float) -> bool:
        self.e.mul_(1.0 - coeff)
        return True

    def state_dict(self) -> dict[str, object]:
        return {"kind": self.name, "numel": self.numel, "e": self.e}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        _check_same("kind", state.get("kind"), self.name)
        _check_same("numel", state.get("numel"), self.numel)
        e = validate_tensor(state, "e", (self.numel,), self.e.dtype)
        check_finite(e, "loaded error state")
        self.e.copy_(e)
