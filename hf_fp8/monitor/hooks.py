"""``Fp8Monitor``: FP8 health statistics of linear-layer inputs every ``interval`` steps, for any loop.

On a sampled step the monitor registers one forward hook per monitored layer; each hook
computes :func:`hf_fp8.monitor.stats.input_stats` of the layer's input on the device and keeps
the small result tensor. At the end of the step the hooks are removed and all results come to
the host in one copy. On the other steps no hook is registered at all, so the model runs
exactly as without a monitor.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_fp8.config import Recipe
from hf_fp8.linear import Fp8Linear
from hf_fp8.monitor.records import LOG_NAME, append_record
from hf_fp8.monitor.stats import input_stats
from hf_fp8.scaling import DelayedScalingState

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_KURTOSIS_THRESHOLD",
    "DEFAULT_SATURATION_THRESHOLD",
    "Fp8Monitor",
    "Fp8MonitorWarning",
]

# A sampled step reads each monitored input a few times in FP32 (about 36 bytes of memory
# traffic per input element: on 8 Llama-3-8B layers with 8192 tokens the MLP inputs make
# ~50 GB, some 20 ms on an H100, a few percent of that step by this estimate). Divided by 100
# that is a few hundredths of a percent of training time, while a run of a few thousand steps
# still gets tens of points, enough to see kurtosis climb long before the loss moves.
# (measured by benchmarks/bench_monitor.py, since retired: benchmarks/results/history/monitor_h100.json)
DEFAULT_INTERVAL = 100
# 3 for Gaussian features. One feature c times larger than the other features' RMS gives about
# K (3K + c^4) / (K + c^2)^2 (K = hidden size): ~35 for c = 20 and ~135 for c = 30 at K = 4096.
# 100 flags a persistent outlier feature ~30x the rest, well past healthy activations and below
# the several hundreds the FOG paper reports in FP8 runs before they diverge.
DEFAULT_KURTOSIS_THRESHOLD = 100.0
# Dynamic recipes never saturate; a delayed scale that clips 1 value in 10^4 is clipping the
# outliers themselves, the values that carry the most signal, every step.
DEFAULT_SATURATION_THRESHOLD = 1e-4

_METRICS = ("kurtosis", "amax", "saturated", "underflow", "scale")


class Fp8MonitorWarning(UserWarning):
    """A monitored layer's input crossed a health threshold (kurtosis or FP8 saturation)."""


def _in_backward() -> bool:
    """A forward call during a backward pass is activation checkpointing recomputing the forward
    (reentrant or not): the same input, seen a second time."""
    from hf_fp8.delayed import in_backward

    return in_backward()


def _select(model: nn.Module, modules: str | Callable[[str, nn.Module], bool]) -> dict[str, nn.Module]:
    if modules == "fp8":
        keep = lambda name, m: isinstance(m, Fp8Linear)  # noqa: E731
    elif modules == "linear":
        keep = lambda name, m: isinstance(m, nn.Linear)  # noqa: E731
    elif callable(modules):
        keep = modules
    else:
        raise ValueError(
            f"Fp8Monitor: modules={modules!r}; expected 'fp8' (every Fp8Linear), 'linear' (every nn.Linear, "
            "Fp8Linear included) or a function (name, module) -> bool"
        )
    return {name or type(m).__name__: m for name, m in model.named_modules() if keep(name, m)}


class Fp8Monitor:
    """Records, every ``interval`` steps, the FP8 health of each monitored layer's input.

    Per layer (the input of its forward GEMM): activation kurtosis (the FOG paper's definition,
    the mean over tokens of ``mean(x⁴)/mean(x²)²`` along the hidden dimension), amax, the fraction
    of values the E4M3 cast saturates and the fraction it flushes to zero under the scale the layer
    uses, and that scale (see :mod:`hf_fp8.monitor.stats`). Layers that are not :class:`Fp8Linear`
    (``modules="linear"`` on a BF16 model) are measured as the tensorwise recipe would cast them.

    Everything between :meth:`step_begin` and :meth:`step_end` of a sampled step is recorded
    (every gradient-accumulation micro-batch), except activation checkpointing's recomputation
    of the forward, which would count the same input twice. Statistics stay on the device until
    :meth:`step_end`, which copies them to the host once, returns the metrics, appends them to
    ``log_dir/fp8_monitor.jsonl`` and warns (:class:`Fp8MonitorWarning`, once per layer and kind)
    when a threshold is crossed. Steps that are not sampled register no hook and cost nothing.

    Args:
        model (`nn.Module`):
            The model, converted by :func:`hf_fp8.convert` or not; layers are looked up once, here.
        interval (`int`, *optional*, defaults to 100):
            Sample the steps whose number is a multiple of ``interval``.
        modules (`str` or `Callable[[str, nn.Module], bool]`, *optional*, defaults to `"fp8"`):
            ``"fp8"``: every :class:`Fp8Linear`; ``"linear"``: every ``nn.Linear``; or a filter
            ``(name, module) -> bool`` over ``model.named_modules()``.
        kurtosis_threshold (`float`, *optional*, defaults to 100.0):
            Warn when a layer's input kurtosis exceeds it. Gaussian features give 3; one feature
            ~30x the RMS of the others gives ~100 at hidden size 4096; the FOG paper sees
            kurtosis in the hundreds before FP8 runs diverge.
        saturation_threshold (`float`, *optional*, defaults to 1e-4):
            Warn when the fraction of saturated input values exceeds it (only the delayed
            recipe can saturate: its scale comes from past amaxes).
        log_dir (`str` or `os.PathLike`, *optional*):
            Write one JSON line per sampled step to ``log_dir/fp8_monitor.jsonl`` (read by
            ``python -m hf_fp8.monitor.plot``).
        append (`bool`, *optional*, defaults to `False`):
            Append to an existing log (a resumed run) instead of starting it afresh.
        log_per_layer (`bool`, *optional*, defaults to `True`):
            Return per-layer metrics from :meth:`step_end`, not only the ``fp8/max_*`` aggregates
            (the JSON log always has every layer).
        warn (`bool`, *optional*, defaults to `True`):
            Emit :class:`Fp8MonitorWarning` (threshold crossings are recorded in ``alerts`` either way).

    Example:
        ```python
        >>> import torch, hf_fp8
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
        >>> _ = hf_fp8.convert(model, hf_fp8.Fp8Config(auto_filter=False))
        >>> mon = hf_fp8.monitor.Fp8Monitor(model, interval=10)
        >>> for step in range(1, 21):
        ...     with mon.step(step):
        ...         loss = model(torch.randn(8, 32)).square().mean()
        ...         loss.backward()
        ...     if mon.last_metrics is not None and step == 20:
        ...         print(sorted(k for k in mon.last_metrics if k.startswith("fp8/0/")))
        ['fp8/0/amax', 'fp8/0/kurtosis', 'fp8/0/saturated', 'fp8/0/scale', 'fp8/0/underflow']
        >>> mon.remove()

        ```
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        interval: int = DEFAULT_INTERVAL,
        modules: str | Callable[[str, nn.Module], bool] = "fp8",
        kurtosis_threshold: float = DEFAULT_KURTOSIS_THRESHOLD,
        saturation_threshold: float = DEFAULT_SATURATION_THRESHOLD,
        log_dir: str | Path | None = None,
        append: bool = False,
        log_per_layer: bool = True,
        warn: bool = True,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"Fp8Monitor: interval={interval!r}; expected an int >= 1 (sample every interval steps)")
        for name, value in (("kurtosis_threshold", kurtosis_threshold), ("saturation_threshold", saturation_threshold)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"Fp8Monitor: {name}={value!r}; expected a number >= 0")
        self.interval = interval
        self.kurtosis_threshold = float(kurtosis_threshold)
        self.saturation_threshold = float(saturation_threshold)
        self.log_per_layer = log_per_layer
        self.warn = warn
        self._modules = _select(model, modules)
        if not self._modules:
            hint = (
                " (the model has no Fp8Linear: convert it with hf_fp8.convert, or pass modules='linear')"
                if modules == "fp8"
                else ""
            )
            raise ValueError(f"Fp8Monitor: no module of the model matches modules={modules!r}{hint}")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._records: dict[str, list[torch.Tensor]] = {}
        self._numel: dict[str, int] = {}
        self._step: int | None = None
        self._warned: set[tuple[str, str]] = set()
        self.alerts: list[dict[str, Any]] = []
        self.last_metrics: dict[str, float] | None = None
        self.log_file: Path | None = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.log_file = Path(log_dir) / LOG_NAME
            if not append:
                self.log_file.write_text("")

    @property
    def layers(self) -> list[str]:
        """Names of the monitored layers."""
        return list(self._modules)

    def is_sampled(self, step: int) -> bool:
        return step % self.interval == 0

    # ---- the step protocol -------------------------------------------------------------
    def step_begin(self, step: int) -> None:
        """Start ``step``: on a sampled step, register the hooks."""
        if self._step is not None:
            raise RuntimeError(
                f"Fp8Monitor.step_begin({step}): step {self._step} was begun and never ended; call step_end() first"
            )
        if not self.is_sampled(step):
            return
        self._step = step
        self._records = {name: [] for name in self._modules}
        self._numel = dict.fromkeys(self._modules, 0)
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(functools.partial(self._record, name)))

    def step_end(self, step: int | None = None) -> dict[str, float] | None:
        """End the step: on a sampled step, remove the hooks, and return, log and check its metrics.

        Returns ``None`` on steps that are not sampled; otherwise ``{"fp8/<layer>/kurtosis": ...,
        "fp8/<layer>/amax", "/saturated", "/underflow", "/scale", "fp8/max_kurtosis",
        "fp8/max_saturated", "fp8/max_underflow"}`` (per-layer keys only with ``log_per_layer``).
        """
        if self._step is None:
            self.last_metrics = None
            return None
        if step is not None and step != self._step:
            raise ValueError(f"Fp8Monitor.step_end({step}): the step begun was {self._step}")
        step, self._step = self._step, None
        self._remove_hooks()
        per_layer = self._collect()
        if not per_layer:
            if ("<model>", "no_forward") not in self._warned:
                self._alert(
                    step,
                    "<model>",
                    "no_forward",
                    math.nan,
                    f"hf_fp8 monitor, step {step}: no monitored layer ran a forward between step_begin and step_end, "
                    "so nothing was recorded. Under torch.compile, hooks added after compilation are not called "
                    "(the monitor does not support compiled models); otherwise call step_begin before the forward.",
                )
            self.last_metrics = None
            return None
        metrics: dict[str, float] = {}
        for name, stats in per_layer.items():
            for key in _METRICS:
                metrics[f"fp8/{name}/{key}"] = stats[key]
        aggregates = {
            f"fp8/max_{key}": _nanmax(stats[key] for stats in per_layer.values())
            for key in ("kurtosis", "saturated", "underflow")
        }
        if self.log_file is not None:
            append_record(
                self.log_file,
                {
                    "step": step,
                    "time": time.time(),
                    "kurtosis_threshold": self.kurtosis_threshold,
                    "saturation_threshold": self.saturation_threshold,
                    "metrics": {**metrics, **aggregates},
                },
            )
        self._check(step, per_layer)
        self.last_metrics = {**metrics, **aggregates} if self.log_per_layer else aggregates
        return self.last_metrics

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """``with monitor.step(n): ...`` is ``step_begin(n)`` and ``step_end(n)``; the metrics
        are in ``monitor.last_metrics`` (``None`` on steps that are not sampled)."""
        self.step_begin(step)
        try:
            yield
        finally:
            self.step_end(step)

    def remove(self) -> None:
        """Remove every hook; the monitor records nothing more."""
        self._remove_hooks()
        self._step = None
        self._records = {}

    # ---- internals ---------------------------------------------------------------------
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        # A forward hook, not a pre-hook: the delayed recipe updates its scale inside forward,
        # just before the cast, so only afterwards does fp8_scale hold the scale the cast used.
        if not args or _in_backward():
            return
        x = args[0]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0 or x.dim() == 0:
            return
        recipe, scale = Recipe.TENSORWISE, None
        if isinstance(module, Fp8Linear):
            recipe = module.fp8_config.recipe
            if recipe is Recipe.DELAYED:
                # the state the cast used: a group's first layer's when this layer ran as one of
                # an input-sharing group (hf_fp8.linear._one_by_one), else its own; a slot with no
                # history yet casts tensorwise (a forward without grad does not seed it)
                state = getattr(module, "_fp8_input_from", None) or module._fp8_delayed
                if isinstance(state, DelayedScalingState) and state.seeded[0]:
                    scale = state.scale[0]
                else:
                    recipe = Recipe.TENSORWISE
        with torch.no_grad():
            self._records[name].append(input_stats(x, recipe=recipe, scale=scale))
        self._numel[name] += x.numel()

    def _collect(self) -> dict[str, dict[str, float]]:
        """All recorded statistics to the host in one copy, reduced per layer."""
        names = [name for name, recs in self._records.items() if recs]
        if not names:
            return {}
        counts = [len(self._records[name]) for name in names]
        flat = [rec for name in names for rec in self._records[name]]
        device = flat[0].device
        rows = torch.stack([rec.to(device) for rec in flat]).tolist()  # the one host sync
        self._records = {}
        out: dict[str, dict[str, float]] = {}
        i = 0
        for name, count in zip(names, counts):
            layer_rows = rows[i : i + count]
            i += count
            kurt_sum = sum(r[0] for r in layer_rows)
            tokens = sum(r[1] for r in layer_rows)
            numel = self._numel[name]
            out[name] = {
                "kurtosis": kurt_sum / tokens if tokens else math.nan,
                "amax": _nanmax(r[2] for r in layer_rows),
                "saturated": sum(r[3] for r in layer_rows) / numel,
                "underflow": sum(r[4] for r in layer_rows) / numel,
                "scale": layer_rows[-1][5],
            }
        return out

    def _check(self, step: int, per_layer: dict[str, dict[str, float]]) -> None:
        for name, stats in per_layer.items():
            kurt, sat = stats["kurtosis"], stats["saturated"]
            if kurt > self.kurtosis_threshold and (name, "kurtosis") not in self._warned:
                self._alert(
                    step,
                    name,
                    "kurtosis",
                    kurt,
                    f"hf_fp8 monitor, step {step}: the input of {name} has activation kurtosis {kurt:.1f}, above "
                    f"kurtosis_threshold={self.kurtosis_threshold:g} (3 for Gaussian activations): an outlier feature "
                    "is growing, which precedes FP8 loss divergence. Consider recipe='rowwise' (per-token scales keep "
                    "an outlier token from squeezing the others), a lower learning rate, or keeping this layer in "
                    "BF16 (Fp8Config(exclude=...)).",
                )
            if sat > self.saturation_threshold and (name, "saturated") not in self._warned:
                self._alert(
                    step,
                    name,
                    "saturated",
                    sat,
                    f"hf_fp8 monitor, step {step}: {sat:.3g} of the values at the input of {name} saturate FP8 E4M3 "
                    f"(|x * scale| > 448), above saturation_threshold={self.saturation_threshold:g}: its amax grows "
                    "faster than the delayed recipe's amax history follows. Consider a dynamic recipe "
                    "('tensorwise' or 'rowwise'), Fp8Config(margin=1) for headroom, or a lower learning rate.",
                )

    def _alert(self, step: int, name: str, kind: str, value: float, message: str) -> None:
        self._warned.add((name, kind))
        self.alerts.append({"step": step, "layer": name, "kind": kind, "value": value})
        if self.warn:
            warnings.warn(message, Fp8MonitorWarning, stacklevel=4)  # the caller of step_end


def _nanmax(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan
