"""The error-feedback family: one ``step(update) → payload`` per worker and tensor.

=================  ==========================================================
method             one step (``u`` = update, ``ê`` = stored error estimate)
=================  ==========================================================
none               ``Δ = Q(u)`` (SGD with identity Q; QSGD, rbSGD, ATOMO)
efsgd              ``p = u + e; Δ = Q(p); e ← p − Δ``
conef              ``p = u + (1−β)ê; Δ = Q(p)``; linear C (count sketch):
                   ``S ← S + C(u − Δ)`` (mass-conserving); other C:
                   ``state ← C(ê + u − Δ)``
iconef-v1          ``p = u + ẽ + q; Δ = Q(p); ẽ ← C(p − Δ); q ← C(p − Δ − ẽ)``
iconef-v2          same with ``ẽ ← Q'(p − Δ)`` (the gradient compressor, private seed)
hefsgd             ``p = u + e; Δ = Q(p); e ← top-k(p − Δ)`` (stored sparse)
=================  ==========================================================

The receiver computes ``x ← x − η·mean_i Δ_i``. See ``ALGORITHMS.md``; the
sketch update is the mass-conserving one (a literal ``β·S + C(p − Δ)`` diverges).

Roles (GRACE's memory): ``compensate_(u) → p`` reads the error, ``absorb_(p − Δ)``
stores the new one; ``step`` is ``compensate_``, ``Q``, ``absorb_`` fused (the fast
path). Callers that communicate between the two halves (the DDP PowerSGD path) call
them one at a time.

Memory. With a linear error store and a selective Q (random-block-k, random-k,
rbSGD), ConEF never materialises ``p``: it needs ê only at the ``k`` selected
coordinates, then adds ``C(u)`` and subtracts ``C(Δ)`` (O(k)); the update
itself is not modified. With ``consume=True`` (the caller hands the buffer over)
it subtracts ``Δ`` from ``u`` on the selection and adds ``C(u − Δ)`` in one pass.
Otherwise ``p`` is formed in the update's buffer when ``consume=True``, or in one copy.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch

from conef_fl.compressors import make_compressor
from conef_fl.compressors.base import Compressor, Payload, SelectiveCompressor
from conef_fl.compressors.sign import ScaledSign
from conef_fl.config import MethodConfig
from conef_fl.error_stores.base import DenseError, ErrorStore, NonFiniteError, check_finite
from conef_fl.error_stores.decayed import make_decayed
from conef_fl.error_stores.quantizer import QuantizedError
from conef_fl.error_stores.sketch import CountSketch, SketchGeometry
from conef_fl.error_stores.sketch_group import GROUP_MAX_NUMEL, SketchGroup
from conef_fl.error_stores.topk import TopKError
from conef_fl.seeding import derive_seed

__all__ = [
    "ErrorFeedback",
    "NoFeedback",
    "EFSGD",
    "ConEF",
    "IConEF",
    "HEFSGD",
    "GroupedConEF",
    "NonFiniteError",
    "make_compressor_for",
    "make_error_store",
    "make_feedback",
]


def make_compressor_for(config: MethodConfig, *, generator: torch.Generator | None = None) -> Compressor:
    """The gradient compressor Q described by ``config``."""
    name = config.compressor
    kwargs: dict[str, object] = {}
    if name in ("random-block-k", "random-k", "top-k", "rbsgd"):
        kwargs = {"ratio": config.k_ratio, "value_dtype": config.value_dtype}
    elif name in ("powersgd",):
        kwargs = {"rank": config.rank, "value_dtype": config.value_dtype}
    elif name == "atomo":
        kwargs = {"rank": config.rank, "generator": generator, "seed": derive_seed(config.seed, "atomo")}
    elif name == "qsgd":
        kwargs = {"levels": config.qsgd_levels, "generator": generator, "seed": derive_seed(config.seed, "qsgd")}
    elif name == "identity":
        kwargs = {"value_dtype": config.value_dtype}
    return make_compressor(name, **kwargs)


def make_error_store(
    config: MethodConfig, numel: int, key: str = "", device: torch.device | str = "cpu", kind: str | None = None
) -> ErrorStore:
    """The error store C of ``config`` for a tensor of ``numel`` elements (seeded per ``key``)."""
    kind = kind or config.error_compressor
    try:
        factory = ERROR_STORES[kind]
    except KeyError:
        raise ValueError(f"error_compressor={kind!r} is not valid; allowed: {', '.join(ERROR_STORES)}") from None
    return factory(config, numel, derive_seed(config.seed, "error-store", kind, key), device)


def _count_sketch(config: MethodConfig, numel: int, seed: int, device: torch.device | str) -> ErrorStore:
    geometry = SketchGeometry.for_ratio(numel, config.sketch_ratio, config.sketch_rows, unit=config.sketch_unit or None)
    return CountSketch(geometry, seed=seed, dtype=config.sketch_dtype, device=device,
                       estimate_scale=config.estimate_scale)


#: Error compressor C (``MethodConfig.error_compressor``) → ``factory(config, numel, seed, device)``.
ERROR_STORES: dict[str, Callable[[MethodConfig, int, int, torch.device | str], ErrorStore]] = {
    "count-sketch": _count_sketch,
    "quantizer": lambda c, n, seed, dev: QuantizedError(n, levels=c.quant_levels, seed=seed, device=dev),
    "identity": lambda c, n, seed, dev: DenseError(n, device=dev),
    "top-k": lambda c, n, seed, dev: TopKError(n, ratio=c.error_topk_ratio, device=dev),
    "decayed": make_decayed,  # dense error ageing like the count sketch (stale-error control)
}


class ErrorFeedback(ABC):
    """One worker's compression of one tensor (flat or shaped).

    Parameters
    ----------
    shape:
        Shape of the tensor (the payload keeps it; the error is stored flat).
    compressor:
        The gradient compressor Q (shared by all tensors of a worker).
    config:
        The method configuration.
    key:
        Stable name of the tensor (layer name or bucket index): seeds hashes and selections.
    device:
        Device of the error state.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        compressor: Compressor,
        config: MethodConfig,
        key: str = "",
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)
        if self.numel < 1:
            raise ValueError(f"shape={self.shape} has no elements")
        self.compressor = compressor
        self.config = config
        self.key = key
        self.device = torch.device(device)
        self.steps = 0

    # -- accounting ---------------------------------------------------------------------------
    def stores(self) -> dict[str, ErrorStore]:
        """The error stores kept between steps, by role."""
        return {}

    def persistent_tensors(self) -> list[torch.Tensor]:
        """Every tensor kept between steps (error state, warm starts)."""
        out = [t for s in self.stores().values() for t in s.persistent_tensors()]
        out += [t for t in self.compressor.state_dict().values() if isinstance(t, torch.Tensor)]
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of error state kept between steps (excluding Q's own warm-start state)."""
        return sum(s.nbytes for s in self.stores().values())

    # -- the step -------------------------------------------------------------------------------
    def step(self, update: torch.Tensor, *, seed: int = 0, consume: bool = False) -> Payload:
        """Compress ``update`` with error feedback and return the payload to send.

        Parameters
        ----------
        update:
            ``u`` (gradient in DDP, ``x_global − x_local`` in FL), ``numel`` elements.
        seed:
            The shared seed of this step/round (identical on every worker).
        consume:
            The caller hands over ``update``'s buffer, which may then be overwritten
            (avoids one copy of the update). With ``False`` it is never modified.

        Raises
        ------
        NonFiniteError
            If ``update`` has NaN/Inf; the error state is left untouched.
        ValueError
            If ``update`` has the wrong number of elements or is not floating point.
        """
        check_finite(update, f"update for {self.key!r}")
        return self.step_checked(update, seed=seed, consume=consume)

    def step_checked(self, update: torch.Tensor, *, seed: int = 0, consume: bool = False) -> Payload:
        """:meth:`step` for a caller that has already refused NaN/Inf in ``update`` (one finite check a step)."""
        self._check_update(update)
        payload = self._step(update.reshape(-1), seed, consume)
        self.steps += 1
        return payload

    def _check_update(self, update: torch.Tensor) -> None:
        if update.numel() != self.numel:
            raise ValueError(f"update for {self.key!r} has {update.numel()} elements, expected {self.numel}")
        if not update.is_floating_point():
            raise ValueError(f"update for {self.key!r} has dtype {update.dtype}, expected a floating dtype")

    def _step(self, u: torch.Tensor, seed: int, consume: bool) -> Payload:
        """The three roles in turn; subclasses with a fused fast path override this."""
        p = self._compensate_(self._buffer(u, consume))
        payload = self._compress(p, seed)
        self._absorb_residual_(payload, p)
        return payload

    def _absorb_residual_(self, payload: Payload, p: torch.Tensor) -> None:
        """Store the error of ``p − Δ`` (``p`` may be overwritten); subclasses may fuse the two."""
        self.compressor.decompress_add_(payload, p, alpha=-1.0)  # p := p − Δ
        self._absorb_(p)

    # -- the step's two memory roles, one at a time (callers that communicate between them) -----
    def compensate_(self, update: torch.Tensor, *, consume: bool = False) -> torch.Tensor:
        """``p``: ``update`` plus the fed-back error, flat float32; the error state is only read.

        With ``consume`` the caller hands over ``update``'s buffer, which then holds ``p``
        (when it is contiguous float32); otherwise ``p`` is a new tensor. Unlike :meth:`step`
        it does not check for NaN/Inf. ``step`` equals ``compensate_``, ``Q``, ``absorb_(p − Q(p))``.
        """
        self._check_update(update)
        return self._compensate_(self._buffer(update.reshape(-1), consume))

    def absorb_(self, residual: torch.Tensor) -> None:
        """Store the error from ``residual = p − Δ`` of this step's :meth:`compensate_`; ends the step.

        ``residual`` (``numel`` float32 elements, contiguous) may be overwritten.
        """
        if residual.numel() != self.numel:
            raise ValueError(f"residual for {self.key!r} has {residual.numel()} elements, expected {self.numel}")
        self._absorb_(residual.view(-1))
        self.steps += 1

    @abstractmethod
    def _compensate_(self, buf: torch.Tensor) -> torch.Tensor:
        """``buf := p = u + fed-back error`` in place (``buf`` holds ``u``); returns ``buf``."""

    @abstractmethod
    def _absorb_(self, residual: torch.Tensor) -> None:
        """Update the error state from ``residual = p − Δ`` (may overwrite it)."""

    def _buffer(self, u: torch.Tensor, consume: bool) -> torch.Tensor:
        """A float32 buffer holding ``u`` that may be overwritten."""
        if consume and u.dtype == torch.float32 and u.is_contiguous():
            return u
        return u.to(torch.float32, copy=True).contiguous()

    def _compress(self, p: torch.Tensor, seed: int) -> Payload:
        return self.compressor.compress(p.view(self.shape), seed=seed, key=self.key)

    def reset(self) -> None:
        """Forget the error (error reset)."""
        for s in self.stores().values():
            s.zero_()

    # -- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Error stores and compressor state, with validation metadata."""
        return {
            "method": type(self).__name__,
            "numel": self.numel,
            "steps": self.steps,
            "stores": {k: s.state_dict() for k, s in self.stores().items()},
            "compressor": self.compressor.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, object], *, atomic: bool = True) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` on any mismatch.

        With ``atomic`` (default) the current state is backed up first and put back on
        failure. A caller that discards the object on failure (a freshly built worker)
        passes ``atomic=False`` and saves that copy of the state.
        """
        if state.get("method") != type(self).__name__:
            raise ValueError(f"state is for method {state.get('method')!r}, not {type(self).__name__!r}")
        if state.get("numel") != self.numel:
            raise ValueError(f"state has numel={state.get('numel')}, expected {self.numel}")
        stores = state.get("stores")
        mine = self.stores()
        if not isinstance(stores, Mapping) or set(stores) != set(mine):
            got = sorted(stores) if isinstance(stores, Mapping) else stores
            raise ValueError(f"state has stores {got}, expected {sorted(mine)}")
        if not atomic:
            for k, s in mine.items():
                s.load_state_dict(stores[k])
        else:
            backups = {
                k: {kk: (vv.clone() if isinstance(vv, torch.Tensor) else vv) for kk, vv in s.state_dict().items()}
                for k, s in mine.items()
            }
            try:
                for k, s in mine.items():
                    s.load_state_dict(stores[k])
            except Exception:
                for k, s in mine.items():
                    s.load_state_dict(backups[k])
                raise
        comp = state.get("compressor", {})
        if isinstance(comp, Mapping) and comp:
            self.compressor.load_state_dict(comp)
        self.steps = int(state.get("steps", 0))  # type: ignore[arg-type]


class NoFeedback(ErrorFeedback):
    """No memory: ``Δ = Q(u)`` (SGD with identity Q; QSGD, rbSGD, ATOMO)."""

    def _step(self, u: torch.Tensor, seed: int, consume: bool) -> Payload:
        return self._compress(u, seed)

    def _compensate_(self, buf: torch.Tensor) -> torch.Tensor:
        return buf  # p = u

    def _absorb_(self, residual: torch.Tensor) -> None:
        pass  # no memory


class EFSGD(ErrorFeedback):
    """Error feedback with a dense float32 error (4·numel bytes): ``p = u + e; Δ = Q(p); e ← p − Δ``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.error = DenseError(self.numel, device=self.device)

    def stores(self) -> dict[str, ErrorStore]:
        return {"e": self.error}

    def _step(self, u: torch.Tensor, seed: int, consume: bool) -> Payload:
        e = self.error.e
        e.add_(u.to(e.dtype))  # e := p
        payload = self._compress(e, seed)
        self.compressor.decompress_add_(payload, e, alpha=-1.0)  # e := p − Δ
        return payload

    def _compensate_(self, buf: torch.Tensor) -> torch.Tensor:
        return self.error.estimate_add_(buf)  # p = u + e

    def _absorb_(self, residual: torch.Tensor) -> None:
        self.error.assign_(residual)  # e ← p − Δ


class ConEF(ErrorFeedback):
    """Partial contractive error feedback with error store C (``beta = 0``: plain ConEF).

    Takes the arguments of :class:`ErrorFeedback`, and:

    Parameters
    ----------
    store:
        The error compressor C; default from ``config.error_compressor``.
    beta:
        Partial feedback β ∈ [0, 1); default ``config.beta``.
    """

    #: Kind of error store built when ``store`` is not given (``None``: ``config.error_compressor``).
    store_kind: ClassVar[str | None] = None

    def __init__(self, *args: object, store: ErrorStore | None = None, beta: float | None = None,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.store = store if store is not None else make_error_store(self.config, self.numel, self.key,
                                                                      self.device, kind=self.store_kind)
        self.beta = self.config.beta if beta is None else float(beta)
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta={self.beta} is out of range; allowed: [0, 1)")

    def stores(self) -> dict[str, ErrorStore]:
        return {"e": self.store}

    def step(self, update: torch.Tensor, *, seed: int = 0, consume: bool = False) -> Payload:
        """:meth:`ErrorFeedback.step`; with a count sketch, a non-selective Q and the compiled
        kernels, the finite check of ``update`` is made in the same pass that adds ``(1−β)·ê``
        (the same refusal, the error state untouched; ``docs/design.md``, "Native kernels")."""
        if (self.beta < 1.0 and update.dtype == torch.float32 and isinstance(self.store, CountSketch)
                and not isinstance(self.compressor, SelectiveCompressor)):
            self._check_update(update)
            buf = self._buffer(update.reshape(-1), consume)  # float32: a copy is exact
            with self.store.reuse_hashes():
                if type(self.compressor) is ScaledSign:
                    payload = self._sign_step(buf)
                    if payload is not None:
                        self.steps += 1
                        return payload
                finite = self.store.estimate_add_finite_(buf, alpha=1.0 - self.beta)  # buf := p (or untouched)
                if finite is not None:
                    if not finite:
                        raise self._refusal()
                    payload = self._compress(buf, seed)
                    self._absorb_residual_(payload, buf)
                    self.steps += 1
                    return payload
            return super().step(buf, seed=seed, consume=True)  # buf is untouched: check, then the usual step
        return super().step(update, seed=seed, consume=consume)

    def _step(self, u: torch.Tensor, seed: int, consume: bool) -> Payload:
        with self.store.reuse_hashes():  # the store's hashes are computed once per step
            if self.store.linear and isinstance(self.compressor, SelectiveCompressor):
                return self._step_selective(u, seed, consume)
            if type(self.compressor) is ScaledSign and isinstance(self.store, CountSketch):
                u = self._buffer(u, consume)
                payload = self._sign_step(u)
                if payload is not None:
                    return payload
                consume = True
            return super()._step(u, seed, consume)  # compensate_, Q, absorb_

    def _sign_step(self, buf: torch.Tensor) -> Payload | None:
        """The scaled sign's whole step in one compiled call (:meth:`CountSketch.sign_step_`), checking
        ``buf`` for NaN/Inf in its first pass; ``None`` (nothing done) where that does not apply."""
        done = self.store.sign_step_(buf, 1.0 - self.beta)  # type: ignore[attr-defined]
        if done is None:
            return None
        finite, signs, scale = done
        if not finite:
            raise self._refusal()
        return Payload(ScaledSign.name, self.shape, {"signs": signs, "scale": scale}, {})

    def _refusal(self) -> NonFiniteError:
        """The refusal of an update found non-finite inside a fused pass (the error state untouched)."""
        return NonFiniteError.refusal(f"update for {self.key!r}")

    def _step_selective(self, u: torch.Tensor, seed: int, consume: bool = False) -> Payload:
        q = self.compressor
        assert isinstance(q, SelectiveCompressor)
        tseed = q.tensor_seed(seed, self.key)  # type: ignore[attr-defined]
        sel = q.select(self.numel, tseed, u.device)
        fb = 1.0 - self.beta
        chunk = 1 << 12
        if consume and sel.indices is None and sel.start + sel.k <= self.numel and u.dtype == torch.float32 \
                and u.is_contiguous():  # one block: p on its units in one sparse product
            span = self.store.estimate_span(u, sel.start, sel.start + sel.k, alpha=fb)
            if span is not None:
                payload = q.pack(span, sel, self.shape, tseed, owned=True)
                sel.add_(u, payload.arrays["values"], alpha=-q.value_scale(self.numel))
                self.store.accumulate_(u)
                return payload
        # p on the selection only, built chunk by chunk: p_sel = u_sel + (1−β)·ê_sel
        p_sel = torch.empty(sel.k, dtype=torch.float32, device=u.device)
        if sel.indices is None:
            off = 0
            for lo, hi in sel.slices():
                p_sel[off : off + hi - lo].copy_(u[lo:hi])
                if fb:
                    self.store.estimate_block_add_(p_sel[off : off + hi - lo], lo, alpha=fb)
                off += hi - lo
        else:
            for c in range(0, sel.k, chunk):
                idx = sel.indices[c : c + chunk]
                if u.dtype == torch.float32:
                    torch.index_select(u, 0, idx.to(u.device), out=p_sel[c : c + chunk])
                else:
                    p_sel[c : c + chunk].copy_(u.index_select(0, idx.to(u.device)))
                if fb:
                    p_sel[c : c + chunk].add_(self.store.estimate_at(idx).to(u.device), alpha=fb)
        payload = q.pack(p_sel, sel, self.shape, tseed, owned=True)
        del p_sel
        values = payload.arrays["values"]
        scale = -q.value_scale(self.numel)
        if consume and u.dtype == torch.float32 and u.is_contiguous():
            # u is ours: u := u − Δ on the selection, then ONE pass S ← S + C(u − Δ)
            # (the mass-conserving update below, summed in another order)
            sel.add_(u, values, alpha=scale)
            self.store.accumulate_(u)
            return payload
        # S ← S + C(u) − C(Δ): the mass-conserving update; u itself is not modified
        self.store.accumulate_(u)
        if sel.indices is None:
            off = 0
            for lo, hi in sel.slices():
                self.store.accumulate_block_(values[off : off + hi - lo], lo, alpha=scale)
                off += hi - lo
        else:
            for c in range(0, sel.k, chunk):
                self.store.accumulate_sparse_(sel.indices[c : c + chunk], values[c : c + chunk], alpha=scale)
        return payload

    def _absorb_residual_(self, payload: Payload, p: torch.Tensor) -> None:
        """As :meth:`ErrorFeedback._absorb_residual_`; with a scaled sign and a one-row count sketch
        the compiled kernels read ``p − Δ`` on the fly in the sketch update (one pass less,
        bit-identical; ``p`` is left as it is)."""
        if isinstance(self.compressor, ScaledSign) and isinstance(self.store, CountSketch) \
                and payload.kind == ScaledSign.name and p.dtype == torch.float32:
            scale = payload.arrays["scale"]
            s = -float(scale.to(torch.float32)) if scale.numel() == 1 else None
            if s is not None and self.store.feedback_accumulate_signs_(p, 1.0 - self.beta, payload.arrays["signs"], s):
                return
        super()._absorb_residual_(payload, p)

    def _compensate_(self, buf: torch.Tensor) -> torch.Tensor:
        return self.store.estimate_add_(buf, alpha=1.0 - self.beta)  # buf := p = u + (1−β)ê

    def _absorb_(self, buf: torch.Tensor) -> None:
        fb = 1.0 - self.beta
        if self.store.linear:
            # S_new = S + C(u − Δ) = S − (1−β)C(ê) + C(p − Δ)
            if isinstance(self.store, CountSketch) and self.store.feedback_accumulate_(buf, fb):
                return  # both terms in one pass over the table
            if self.store.subtract_estimate_feedback_(fb):
                self.store.accumulate_(buf)
            else:
                self.store.estimate_add_(buf, alpha=-fb)  # buf := u − Δ (old state still intact)
                self.store.accumulate_(buf)
        else:
            self.store.estimate_add_(buf, alpha=self.beta)  # buf := ê + u − Δ
            self.store.assign_(buf)


class GroupedConEF:
    """One ConEF step for many small tensors of a worker in a few torch calls (the layer-wise fast path).

    The tensors' count sketches form one :class:`~conef_fl.error_stores.sketch_group.SketchGroup`;
    the updates are concatenated, the estimate at every selected coordinate is one gather,
    ``u − Δ`` one ``index_add_`` and the sketch update one sparse product. Payloads, error
    states and step counters are exactly those of :meth:`ConEF.step` with ``consume=True``
    on each tensor in turn (bit-identical: the same kernels sum the same terms in the same
    order); the caller's update buffers are not modified.

    Parameters
    ----------
    feedbacks:
        Name → :class:`ConEF` of the tensors of the group, each :meth:`eligible`, sharing
        one compressor and ``beta``.

    Raises
    ------
    ValueError
        If a feedback is not eligible or they do not share the compressor and ``beta``.
    """

    def __init__(self, feedbacks: Mapping[str, ErrorFeedback]) -> None:
        fbs = list(feedbacks.values())
        bad = [k for k, fb in feedbacks.items() if not self.eligible(fb)]
        if not fbs or bad:
            raise ValueError(f"tensors {bad} cannot be grouped (empty group: {not fbs})")
        if len({id(fb.compressor) for fb in fbs}) != 1 or len({fb.beta for fb in fbs}) != 1:  # type: ignore[attr-defined]
            raise ValueError("grouped tensors must share one compressor and one beta")
        self.keys = list(feedbacks)
        self.feedbacks: list[ConEF] = fbs  # type: ignore[assignment]
        self.compressor: SelectiveCompressor = fbs[0].compressor  # type: ignore[assignment]
        self.group = SketchGroup([fb.store for fb in self.feedbacks])  # type: ignore[misc]
        self._offsets = [0]
        for fb in self.feedbacks:
            self._offsets.append(self._offsets[-1] + fb.numel)

    @staticmethod
    def eligible(fb: ErrorFeedback) -> bool:
        """ConEF (exactly), an unscaled block-selecting Q, a one-row float32 CPU count sketch, a small tensor."""
        q = fb.compressor
        return (type(fb) is ConEF and isinstance(q, SelectiveCompressor) and q.block_selection
                and type(q).value_scale is SelectiveCompressor.value_scale
                and fb.numel <= GROUP_MAX_NUMEL and SketchGroup.eligible(fb.store))  # type: ignore[attr-defined]

    def step(self, updates: Mapping[str, torch.Tensor], seed: int) -> dict[str, Payload] | None:
        """The payloads of every tensor of the group, or ``None`` (nothing changed) where the fast path does not apply.

        It applies to block selections with an unscaled Q (random-block-k, identity) and
        float32 contiguous updates; the caller has checked names, shapes and finiteness.
        """
        q = self.compressor
        us = [updates[k] for k in self.keys]
        if any(u.dtype != torch.float32 or not u.is_contiguous() for u in us):
            return None
        sels = []
        lo_hi: list[tuple[int, int]] = []
        for fb, off in zip(self.feedbacks, self._offsets, strict=False):
            tseed = q.tensor_seed(seed, fb.key)  # type: ignore[attr-defined]
            sel = q.select(fb.numel, tseed)
            if sel.indices is not None or q.value_scale(fb.numel) != 1.0:
                return None
            sels.append((tseed, sel))
            lo_hi += [(off + lo, off + hi) for lo, hi in sel.slices()]
        idx = _block_indices(lo_hi)
        u = torch.cat([t.reshape(-1) for t in us])
        tables = self.group.tables()
        p = u.index_select(0, idx)  # p on the selections: u + (1−β)ê
        self.group.estimate_at_add_(p, tables, idx, alpha=1.0 - self.feedbacks[0].beta)
        payloads: dict[str, Payload] = {}
        values = []
        for key, fb, (tseed, sel), part in zip(self.keys, self.feedbacks, sels, p.split([s.k for _, s in sels]),
                                               strict=True):
            payloads[key] = q.pack(part, sel, fb.shape, tseed)
            values.append(payloads[key].arrays["values"])
        wire = torch.cat(values) if values[0].dtype != torch.float32 else p
        u.index_add_(0, idx, wire.to(torch.float32), alpha=-1.0)  # u − Δ on the selections
        self.group.accumulate_(tables, u)  # S ← S + C(u − Δ), every tensor in one pass
        self.group.store_tables_(tables)
        for fb in self.feedbacks:
            fb.steps += 1
        return payloads


def _block_indices(lo_hi: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``cat(arange(lo, hi) for lo, hi in lo_hi)`` as int64 in four torch calls."""
    starts = torch.tensor([lo for lo, _ in lo_hi], dtype=torch.int64)
    lengths = torch.tensor([hi - lo for lo, hi in lo_hi], dtype=torch.int64)
    before = torch.cumsum(lengths, 0).sub_(lengths)
    total = int(sum(hi - lo for lo, hi in lo_hi))
    return torch.arange(total, dtype=torch.int64).add_(torch.repeat_interleave(starts.sub_(before), lengths))


class HEFSGD(ConEF):
    """hEFSGD: EFSGD whose error is kept as its own top-k (``config.error_topk_ratio``), stored sparse."""

    store_kind = "top-k"

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("beta", 0.0)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


class IConEF(ErrorFeedback):
    """Improved ConEF (Alg. 3): two error terms, ``p = u + ẽ + q``.

    ``version=1``: ``ẽ ← C(p − Δ)`` and ``q ← C(p − Δ − ẽ)`` with two independently
    seeded error stores. ``version=2``: ``ẽ ← Q(p − Δ)`` kept as Q's payload
    (private seed), ``q ← C(p − Δ − ẽ)``.
    """

    def __init__(self, *args: object, version: int = 1, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if version not in (1, 2):
            raise ValueError(f"iConEF version={version!r}; allowed: 1, 2")
        self.version = version
        config, key, device = self.config, self.key, self.device
        self.q_store = make_error_store(config, self.numel, key + "#q", device)
        self.e_store: ErrorStore | None = (
            make_error_store(config, self.numel, key + "#e", device) if version == 1 else None
        )
        self.e_payload: Payload | None = None
        self._v2_q = make_compressor_for(config) if version == 2 else None

    def stores(self) -> dict[str, ErrorStore]:
        out: dict[str, ErrorStore] = {"q": self.q_store}
        if self.e_store is not None:
            out["e"] = self.e_store
        return out

    @property
    def nbytes(self) -> int:
        extra = self.e_payload.nbytes if self.e_payload is not None else 0
        return super().nbytes + extra

    def persistent_tensors(self) -> list[torch.Tensor]:
        out = super().persistent_tensors()
        if self.e_payload is not None:
            out += list(self.e_payload.arrays.values())
        return out

    def _compensate_(self, buf: torch.Tensor) -> torch.Tensor:
        self.q_store.estimate_add_(buf)
        if self.e_store is not None:
            self.e_store.estimate_add_(buf)
        elif self.e_payload is not None and self._v2_q is not None:
            self._v2_q.decompress_add_(self.e_payload, buf)
        return buf  # p = u + ẽ + q

    def _absorb_(self, buf: torch.Tensor) -> None:  # buf = r = p − Δ
        if self.e_store is not None:
            self.e_store.assign_(buf)
            self.e_store.estimate_add_(buf, alpha=-1.0)  # buf := r − ẽ
        else:
            assert self._v2_q is not None
            private = derive_seed(self.config.seed, "iconef-v2", self.steps)
            self.e_payload = self._v2_q.compress(buf.view(self.shape), seed=private, key=self.key)
            self._v2_q.decompress_add_(self.e_payload, buf, alpha=-1.0)
        self.q_store.assign_(buf)

    def reset(self) -> None:
        super().reset()
        self.e_payload = None


def make_feedback(
    config: MethodConfig,
    shape: tuple[int, ...],
    key: str = "",
    *,
    compressor: Compressor | None = None,
    device: torch.device | str = "cpu",
) -> ErrorFeedback:
    """The :class:`ErrorFeedback` of ``config.feedback`` for one tensor (see :data:`FEEDBACK_CLASSES`)."""
    q = compressor if compressor is not None else make_compressor_for(config)
    try:
        factory = FEEDBACK_CLASSES[config.feedback]
    except KeyError:
        raise ValueError(
            f"feedback={config.feedback!r} is not valid; allowed: {', '.join(FEEDBACK_CLASSES)}"
        ) from None
    return factory(shape, q, config, key, device)


#: Feedback family (``MethodConfig.feedback``) → the class (or partial) that runs it.
FEEDBACK_CLASSES: dict[str, Callable[..., ErrorFeedback]] = {
    "none": NoFeedback,
    "efsgd": EFSGD,
    "conef": ConEF,
    "hefsgd": HEFSGD,
    "iconef-v1": functools.partial(IConEF, version=1),
    "iconef-v2": functools.partial(IConEF, version=2),
}
