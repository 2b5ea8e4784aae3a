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
"""

from __future__ import annotations

import warnings
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
            parameters); each moment is updated in FP32 and rounded to nearest once per step.
            Not with ``full_bf16``, whose contract is FP32 optimizer states.

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
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
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
        sd = super().state_dict()
        sd["hf_fp8_rng_state"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
                # the kernel takes plain CUDA tensors; a DTensor (FSDP2) shard takes the torch path
                plain = type(p.data) is torch.Tensor
                if plain and use_triton(p) and not (round_sr and p.dtype == torch.float16):
                    from hf_fp8.kernels.adamw import adamw_step

                    adamw_step(
                        p,
                        p.grad,
                        state["exp_avg"],
                        state["exp_avg_sq"],
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
                    _adamw_step_torch(
                        p,
                        p.grad,
                        state["exp_avg"],
                        state["exp_avg_sq"],
                        lr,
                        beta1,
                        beta2,
                        eps,
                        wd,
                        bc1,
                        bc2,
                        round_sr,
                        seed,
                    )
        return loss


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
    m.copy_(m32)
    v.copy_(v32)
    if p.dtype == torch.float32:
        p.copy_(p32)
    elif round_sr:
        gen = torch.Generator(device=p.device).manual_seed(seed)
        p.copy_(stochastic_round(p32, p.dtype, gen))
    else:
        p.copy_(p32.to(p.dtype))
