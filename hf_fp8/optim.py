"""AdamW for BF16 training: FP32 update, stochastically rounded write-back, FP32 (or BF16) moments.

With BF16 parameters and no FP32 master copy, two things go wrong with a plain optimizer:
BF16 moments lose precision (``exp_avg_sq`` spans many orders of magnitude), and updates
smaller than half a BF16 ulp of the weight are rounded away, so weights stop learning.
Here the moments are FP32, the update is computed in FP32 from the BF16 weight, and the
result is rounded to BF16 *stochastically*: up with probability equal to the fraction of
the ulp it covers, so small updates survive in expectation. Rounding is reproducible: a
``torch.Generator`` seeded by ``seed`` draws one Philox seed per tensor per step, and its
state is part of ``state_dict()``.

On CUDA the whole step for one tensor is one Triton kernel (read p, g, m, v; write p, m, v);
elsewhere the same arithmetic runs as torch ops.

``state_dtype=torch.bfloat16`` keeps BF16 moments instead, the memory ``torch.optim.AdamW``
takes for BF16 parameters (14 bytes per parameter in all). With ``stochastic_rounding=False``
the arithmetic is torch's fused AdamW's up to FP32 rounding order (FP32 math, each state
rounded to nearest once), in one launch per tensor. torch's fused AdamW took 20.3 ms of an
8-layer Llama-3-8B-shaped model's step on the H100, its multi-tensor launches keeping the GPU
at ~1.9 TB/s (``benchmarks/bench_adamw.py`` compares the two).

``defer_step=True`` (with :meth:`AdamW.attach` on the model) makes ``step()`` record the update
and launch it at the start of the model's next forward: the GPU then has the update's ~15 ms of
kernels (an 8-layer Llama-3-8B-shaped model) to run while the host works through the forward's
prelude and first layers, the stretch of an eager step where it otherwise waits for the host.
The numbers are the same bit for bit (the same kernels, on the same gradients, before anything
reads the parameters); see :meth:`AdamW.attach` for when the update runs.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from hf_fp8._backend import use_triton

__all__ = ["AdamW", "stochastic_round"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round FP32 ``x`` to ``dtype`` (BF16 or FP16) up or down with probability proportional to proximity.

    Unbiased: E[result] = x for values inside the target's range. Non-finite values and
    values beyond the target's range take plain round-to-nearest.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round: expected float32 input, got {x.dtype}")
    if dtype == torch.bfloat16:
        # BF16 is the top 16 bits of FP32: add 16 random low bits, truncate. The carry rounds up.
        noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
        bits = (x.view(torch.int32) + noise) & -65536  # 0xFFFF0000 as a signed int32
        out = bits.view(torch.float32).to(torch.bfloat16)
        return torch.where(torch.isfinite(x) & torch.isfinite(out.float()), out, x.to(torch.bfloat16))
    if dtype == torch.float16:
        nearest = x.to(torch.float16)
        other = torch.nextafter(nearest, torch.where(x > nearest.float(), torch.inf, -torch.inf).to(torch.float16))
        gap = (other.float() - nearest.float()).abs()
        p_other = torch.where(gap > 0, (x - nearest.float()).abs() / gap, torch.zeros_like(x))
        u = torch.rand(x.shape, generator=generator, device=x.device)
        out = torch.where(u < p_other, other, nearest)
        return torch.where(torch.isfinite(x) & torch.isfinite(out), out, nearest)
    if dtype == torch.float32:
        return x
    raise ValueError(f"stochastic_round: dtype must be bfloat16, float16 or float32, got {dtype}")


class AdamW(torch.optim.Optimizer):
    """AdamW with FP32 (or BF16) optimizer states for BF16/FP16/FP32 parameters, one kernel per tensor.

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``.
        lr (`float`, defaults to 1e-3), betas (`tuple[float, float]`, defaults to (0.9, 0.999)),
        eps (`float`, defaults to 1e-8), weight_decay (`float`, defaults to 0.01): as ``torch.optim.AdamW``
            (decoupled weight decay).
        stochastic_rounding (`bool`, defaults to `True`): round BF16/FP16 parameters stochastically
            after the FP32 update; `False` rounds to nearest.
        seed (`int`, *optional*): seed of the rounding's random stream (default: from torch's
            global RNG at construction, so ``torch.manual_seed`` makes runs reproducible).
        full_bf16 (`bool`, defaults to `False`): declare full-BF16 training. Then FP16 parameters
            are an error (FP16 lacks BF16's range) and FP32 parameters a warning (nothing to
            round; the model is not full-BF16).
        state_dtype (`torch.dtype`, defaults to `torch.float32`): dtype of both moments.
            `torch.bfloat16` halves their memory (what ``torch.optim.AdamW`` holds for BF16
            parameters); each moment is updated in FP32 and rounded once per step, stochastically
            with ``stochastic_rounding`` (round to nearest freezes a BF16 ``exp_avg_sq``:
            ``0.999 * v`` rounds back to ``v``), to nearest without. Not with ``full_bf16``,
            whose contract is FP32 optimizer states.
        defer_step (`bool`, defaults to `False`): opt-in; ``step()`` records the update (its gradients,
            hyperparameters, step counts and rounding seeds as they are then) and launches it
            later, in :meth:`flush`: at the start of the next forward of a model passed to
            :meth:`attach`, or first thing in ``state_dict()``, ``load_state_dict()``,
            ``zero_grad(set_to_none=False)``, ``add_param_group()`` and the next ``step()``.
            Until then the parameters and moments hold their values from before the step. A
            gradient changed in place in between (``model.zero_grad(set_to_none=False)``, another
            backward without a forward) is an error at the flush, never a silent wrong update.
            :class:`hf_fp8.CudaGraphStep` runs the flush before each replay; sharded (FSDP)
            parameters are refused by :meth:`attach`. Without :meth:`attach` nothing would run
            the update before the next forward: ``step()`` then updates at once, with a warning.

    Example:
        ```python
        >>> import torch, hf_fp8
        >>> model = torch.nn.Linear(16, 16).to(torch.bfloat16)
        >>> opt = hf_fp8.optim.AdamW(model.parameters(), lr=1e-3, seed=0)
        >>> model(torch.randn(4, 16, dtype=torch.bfloat16)).sum().backward()
        >>> opt.step()
        >>> opt.state[model.weight]["exp_avg"].dtype
        torch.float32

        ```
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        stochastic_rounding: bool = True,
        seed: int | None = None,
        full_bf16: bool = False,
        state_dtype: torch.dtype = torch.float32,
        defer_step: bool = False,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
        if not (
            isinstance(betas, (tuple, list))
            and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
        ):
            raise ValueError(f"AdamW: betas must be a pair (beta1, beta2), e.g. (0.9, 0.999); got {betas!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"AdamW: eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay}")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"AdamW: state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        if full_bf16 and state_dtype != torch.float32:
            raise ValueError(
                f"AdamW(full_bf16=True, state_dtype={state_dtype}): full-BF16 training keeps FP32 optimizer states; "
                "drop state_dtype, or full_bf16 for BF16 moments."
            )
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, stochastic_rounding=stochastic_rounding)
        self.defer_step = defer_step
        # the recorded update of a deferred step(): per parameter, (its update's arguments, the gradient's version then)
        self._pending: list[tuple[tuple, int]] | None = None
        self._attached = False  # attach() called: some model's forward runs the deferred update
        super().__init__(params, defaults)
        self.full_bf16 = full_bf16
        self.state_dtype = state_dtype
        self._check_dtypes()
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._generator = torch.Generator().manual_seed(seed)

    def _check_dtypes(self) -> None:
        dtypes = {p.dtype for g in self.param_groups for p in g["params"]}
        if not dtypes <= {torch.float32, torch.bfloat16, torch.float16}:
            raise TypeError(f"AdamW: parameters must be float32, bfloat16 or float16, got {sorted(map(str, dtypes))}")
        if self.full_bf16 and torch.float16 in dtypes:
            raise ValueError(
                "AdamW(full_bf16=True) got float16 parameters: full-BF16 training needs bfloat16 (float16's range "
                "overflows without loss scaling). Convert the model with model.to(torch.bfloat16)."
            )
        if self.full_bf16 and torch.float32 in dtypes:
            warnings.warn(
                "AdamW(full_bf16=True) got float32 parameters: they are updated in FP32 with no rounding, and the "
                "model is not full-BF16. Build it under hf_fp8.set_default_dtype(torch.bfloat16) or call "
                "model.to(torch.bfloat16) first.",
                UserWarning,
                stacklevel=3,
            )

    # ---- state_dict carries the rounding stream ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.flush()
        sd = super().state_dict()
        sd["hf_fp8_rng_state"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flush()
        state_dict = dict(state_dict)
        rng = state_dict.pop("hf_fp8_rng_state", None)
        # torch's loader casts state to each parameter's dtype: keep the moments aside, in state_dtype
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        moments = {
            i: {k: v for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")} for i, st in state_dict["state"].items()
        }
        for group in state_dict["param_groups"]:
            unsupported = [k for k in ("amsgrad", "maximize") if group.get(k)]
            if unsupported:
                raise ValueError(
                    f"hf_fp8.optim.AdamW.load_state_dict: the state was saved with {', '.join(unsupported)}=True, "
                    "which this AdamW does not implement; resume it with torch.optim.AdamW (--fp8_adamw false)"
                )
        super().load_state_dict(state_dict)
        # a torch.optim.AdamW state (a run resumed with hf_fp8's AdamW) lacks this optimizer's own
        # group settings: torch's loader replaces each group with the saved one
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params, strict=True):
            for key, value in moments.get(i, {}).items():
                self.state[p][key] = value.to(device=p.device, dtype=self.state_dtype)
        if rng is not None:  # accelerate moves the whole state dict to the GPU; the generator lives on the CPU
            self._generator.set_state(rng.to("cpu", torch.uint8))

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self._generator).item())

    # ---- deferred steps ---------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """Whether a deferred ``step()`` has not run yet (see ``defer_step``)."""
        return self._pending is not None

    @torch.no_grad()
    def flush(self) -> None:
        """Run the update a deferred ``step()`` recorded, if any (a no-op otherwise).

        Raises:
            RuntimeError: a gradient the update reads changed in place after ``step()``.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        for update, version in pending:
            if update[1]._version != version:  # update[1]: the gradient
                raise RuntimeError(
                    "hf_fp8.optim.AdamW(defer_step=True): a gradient changed in place between step() and the "
                    "deferred update (model.zero_grad(set_to_none=False)? a backward before the next forward?). "
                    "The update was not applied. Zero gradients with set_to_none=True, or call optimizer.flush() "
                    "before touching them."
                )
        for update, _ in pending:
            _apply_update(*update)

    def attach(self, model: torch.nn.Module) -> list:
        """Flush a deferred step when ``model``'s forward starts (first among its forward
        pre-hooks: the update's kernels are queued before anything the forward launches), before
        ``model.state_dict()`` (checkpoints hold updated weights) and before
        ``model.load_state_dict()`` (the update lands on the weights it was computed for, not on
        the loaded ones). Returns the hook handles (``.remove()`` each to detach).

        Parameters read any other way may hold the values from before the last ``step()``: a
        submodule called on its own (``model.model(...)`` in a custom loss), a submodule's
        ``state_dict()``, ``named_parameters()``, ``p.data``, ``copy.deepcopy(model)`` (the copy's
        hooks are inert, as are those of a pickled model). Call :meth:`flush` first. That is
        why deferring is opt-in (``hf_fp8.Trainer`` needs ``--fp8_defer_step true``).

        Raises:
            ValueError: sharded parameters (FSDP's DTensors): FSDP gathers them in forward
                pre-hooks of its own, which may run before this one and would gather the
                weights from before the update."""
        sharded = [p for g in self.param_groups for p in g["params"] if type(p.data) is not torch.Tensor]
        if self.defer_step and sharded:
            raise ValueError(
                f"hf_fp8.optim.AdamW(defer_step=True).attach: {len(sharded)} parameters are not plain tensors "
                f"({type(sharded[0].data).__name__}; FSDP?). Their owner gathers them before the forward, possibly "
                "before the deferred update runs: use defer_step=False with sharded parameters."
            )

        self._attached = True
        return [
            model.register_forward_pre_hook(_FlushHook(self, "forward"), prepend=True),
            model.register_state_dict_pre_hook(_FlushHook(self, "state_dict")),
            model.register_load_state_dict_pre_hook(_FlushHook(self, "load")),
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:  # zeroing in place would change the gradients the pending update reads
            self.flush()
        super().zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_pending", None) is not None:
            self.flush()
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.flush()  # a deferred step not yet run goes first (two steps without a forward between)
        updates = self._record_updates()
        if self.defer_step and not self._attached:
            # no model runs the update before its next forward: deferring would train on stale weights
            warnings.warn(
                "hf_fp8.optim.AdamW(defer_step=True) without attach(model): the update runs in step(), "
                "as with defer_step=False. Call optimizer.attach(model) to defer it to the model's next forward.",
                UserWarning,
                stacklevel=3,  # the caller of step(), through torch.no_grad's wrapper
            )
        if self.defer_step and self._attached:
            self._pending = [(update, update[1]._version) for update in updates]
        else:
            for update in updates:
                _apply_update(*update)
        return loss

    def _record_updates(self) -> list[tuple]:
        """Per parameter with a gradient, :func:`_apply_update`'s arguments: (p, grad, exp_avg,
        exp_avg_sq, lr, beta1, beta2, eps, weight decay, bias corrections, stochastic rounding, seed), after this step's
        bookkeeping (moments created, step counts advanced, rounding seeds drawn, in order)."""
        updates = []
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            sr = group["stochastic_rounding"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("hf_fp8.optim.AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
                state["step"] = int(state["step"]) + 1
                step = state["step"]
                bc1 = 1.0 - beta1**step
                bc2 = 1.0 - beta2**step
                round_sr = sr and p.dtype in _LOW_PRECISION
                seed = self._next_seed() if round_sr else 0
                updates.append(
                    (p, p.grad, state["exp_avg"], state["exp_avg_sq"], lr, beta1, beta2, eps, wd, bc1, bc2,
                     round_sr, seed)
                )  # fmt: skip
        return updates


class _FlushHook:
    """A hook :meth:`AdamW.attach` registers: runs the optimizer's deferred update, if any.

    It holds the optimizer weakly and pickles without it: ``torch.save(model)`` and
    ``copy.deepcopy(model)`` then work, and the copy's hook is inert (a copy has no optimizer)."""

    def __init__(self, optimizer: AdamW, event: str) -> None:
        self._optimizer = weakref.ref(optimizer)
        self.event = event
        self._hf_fp8_flush = event == "forward"  # hf_fp8.CudaGraphStep runs it before each replay

    def __getstate__(self) -> dict:
        return {"event": self.event}

    def __setstate__(self, state: dict) -> None:
        self._optimizer = lambda: None
        self.event = state["event"]
        self._hf_fp8_flush = self.event == "forward"

    def __call__(self, *args, **kwargs) -> None:
        optimizer = self._optimizer()
        if optimizer is None or optimizer._pending is None:
            return None
        if self.event == "forward" and torch.compiler.is_compiling():  # kernel launches from Python state
            raise RuntimeError(
                "hf_fp8.optim.AdamW(defer_step=True) with a compiled model: call optimizer.flush() before "
                "the compiled forward, or use defer_step=False"
            )
        # before a load, the pending update belongs to the weights being replaced: it lands first
        optimizer.flush()
        return None


def _apply_update(p, g, m, v, lr, beta1, beta2, eps, wd, bc1, bc2, round_sr, seed) -> None:
    """One parameter's AdamW update: the Triton kernel on CUDA, torch ops elsewhere.

    A DTensor (an FSDP2 shard) is updated through its local tensors: AdamW is elementwise, and the
    moments were created like the parameter, so each rank updates (and rounds) its own shard."""
    if type(p.data) is not torch.Tensor and hasattr(p.data, "to_local"):
        p, g, m, v = (t.data.to_local() if hasattr(t.data, "to_local") else t for t in (p, g, m, v))
        if not p.is_contiguous():
            raise ValueError("hf_fp8.optim.AdamW: a sharded parameter's local shard is not contiguous")
    plain = type(p.data) is torch.Tensor
    if plain and use_triton(p) and not (round_sr and p.dtype == torch.float16):
        from hf_fp8.kernels.adamw import adamw_step

        adamw_step(
            p,
            g,
            m,
            v,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=wd,
            bias_correction1=bc1,
            bias_correction2=bc2,
            stochastic_rounding=round_sr,
            seed=seed,
        )
    else:
        _adamw_step_torch(p, g, m, v, lr, beta1, beta2, eps, wd, bc1, bc2, round_sr, seed)


def _adamw_step_torch(p, g, m, v, lr, beta1, beta2, eps, wd, bc1, bc2, round_sr, seed):
    """The kernel's arithmetic in torch ops (CPU path and reference): FP32 math, each BF16 state
    rounded once (``.float()`` of an FP32 moment is the moment itself, updated in place)."""
    g32 = g.float()
    p32 = p.float()
    p32.mul_(1.0 - lr * wd)
    m32 = m.float().mul_(beta1).add_(g32 * (1.0 - beta1))
    v32 = v.float().mul_(beta2).add_(g32 * g32 * (1.0 - beta2))
    denom = (v32 / bc2).sqrt_().add_(eps)
    p32.sub_(lr * (m32 / bc1) / denom)
    sr_bf16 = round_sr and p.dtype == torch.bfloat16
    if sr_bf16:  # the kernel's own random bits (kernels.adamw_reference.random_bits; no triton import): the same result, bit for bit
        from hf_fp8.kernels.adamw_reference import random_bits

        r_pm, r_v = (r.view(p.shape) for r in random_bits(p.numel(), seed, p.device))
    if p.dtype == torch.float32:
        p.copy_(p32)
    elif sr_bf16:
        p.copy_(_round_bf16_with(p32, r_pm))
    elif round_sr:  # FP16: no kernel; torch's generator
        p.copy_(stochastic_round(p32, p.dtype, torch.Generator(device=p.device).manual_seed(seed)))
    else:
        p.copy_(p32.to(p.dtype))
    if sr_bf16 and m.dtype == torch.bfloat16:  # BF16 moments: rounded like the weight (see state_dtype)
        m.copy_(_round_bf16_with(m32, r_pm >> 16))
        v.copy_(_round_bf16_with(v32, r_v))
    else:
        m.copy_(m32)
        v.copy_(v32)


def _round_bf16_with(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """FP32 ``x`` to BF16, stochastically, with the low 16 bits of ``r`` as the random bits (the
    AdamW kernel's ``_stochastic_bf16``); non-finite values round to nearest."""
    bits = x.view(torch.int32) + (r & 0xFFFF).to(torch.int32)
    out = (bits & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x) & torch.isfinite(out), out, x).to(torch.bfloat16)
