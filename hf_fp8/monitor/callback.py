"""``Fp8MonitorCallback``: the FP8 health monitor in a HuggingFace Trainer, its metrics in the Trainer's own logs.

How the metrics reach ``report_to`` (TensorBoard, W&B, ...): on a sampled step, ``on_step_end``
collects the metrics and sets ``control.should_log`` so the Trainer logs that very step;
``on_log`` then adds them to the ``logs`` dict (and to the step's ``state.log_history`` entry,
which the Trainer copied just before). The Trainer hands that dict to its callbacks in list
order and registers the ``report_to`` integrations *before* the callbacks a user passes, so
this callback must be first in the list to reach them: :class:`hf_fp8.Trainer` puts it there
(``--fp8_monitor_interval``), and :meth:`Fp8MonitorCallback.attach` does it for any Trainer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from hf_fp8.linear import Fp8Linear
from hf_fp8.monitor.hooks import (
    DEFAULT_INTERVAL,
    DEFAULT_KURTOSIS_THRESHOLD,
    DEFAULT_SATURATION_THRESHOLD,
    Fp8Monitor,
)
from hf_fp8.monitor.records import LOG_NAME, drop_records_after

__all__ = ["Fp8MonitorCallback"]


def _reporting_integrations(args: Any) -> list[str]:
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return [r for r in report_to if r not in (None, "none")]


class Fp8MonitorCallback(transformers.TrainerCallback):
    """Runs :class:`hf_fp8.monitor.Fp8Monitor` in a ``transformers.Trainer`` and logs its metrics with the Trainer's.

    Every ``interval`` optimizer steps (``state.global_step`` after the step is a multiple of
    ``interval``; all gradient-accumulation micro-batches of that step are measured) it records
    each monitored layer's input kurtosis, amax, saturated and flushed-to-zero fractions and
    FP8 scale, logs them as ``fp8/<layer>/<metric>`` plus ``fp8/max_kurtosis``,
    ``fp8/max_saturated`` and ``fp8/max_underflow``, appends them to
    ``<output_dir>/fp8_monitor.jsonl`` (for ``python -m hf_fp8.monitor.plot``) and warns when
    a threshold is crossed. Sampled steps are always logged (the Trainer's loss for that step
    comes with them).

    Args:
        interval (`int`, *optional*, defaults to 100):
            Sample every ``interval`` optimizer steps.
        modules (`str` or `Callable[[str, nn.Module], bool]`, *optional*):
            What to monitor (see :class:`Fp8Monitor`); by default every :class:`hf_fp8.Fp8Linear`, or
            every ``nn.Linear`` if the model has none (a BF16 baseline run).
        kurtosis_threshold (`float`, *optional*, defaults to 100.0):
            See :class:`Fp8Monitor`.
        saturation_threshold (`float`, *optional*, defaults to 1e-4):
            See :class:`Fp8Monitor`.
        log_dir (`str`, *optional*):
            Where to write ``fp8_monitor.jsonl``; defaults to the Trainer's ``output_dir``. Only the
            main process writes it and warns.
        log_per_layer (`bool`, *optional*, defaults to `True`):
            Log per-layer metrics, not only the ``fp8/max_*`` aggregates (the JSON log has all).

    <Tip>

    The ``report_to`` integrations see the metrics only if this callback runs before them:
    ``hf_fp8.Trainer`` with ``--fp8_monitor_interval`` does that for you; with another Trainer,
    call ``Fp8MonitorCallback(...).attach(trainer)`` instead of passing it in ``callbacks=``.

    </Tip>

    Example:
        ```python
        trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[hf_fp8.Fp8Callback()])
        hf_fp8.monitor.Fp8MonitorCallback(interval=100).attach(trainer)
        trainer.train()
        # or: hf_fp8.TrainingArguments(..., fp8="tensorwise", fp8_monitor_interval=100) with hf_fp8.Trainer
        ```
    """

    def __init__(
        self,
        interval: int = DEFAULT_INTERVAL,
        *,
        modules: str | Callable[[str, nn.Module], bool] | None = None,
        kurtosis_threshold: float = DEFAULT_KURTOSIS_THRESHOLD,
        saturation_threshold: float = DEFAULT_SATURATION_THRESHOLD,
        log_dir: str | None = None,
        log_per_layer: bool = True,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"Fp8MonitorCallback: interval={interval!r}; expected an int >= 1")
        self.interval = interval
        self.modules = modules
        self.kurtosis_threshold = kurtosis_threshold
        self.saturation_threshold = saturation_threshold
        self.log_dir = log_dir
        self.log_per_layer = log_per_layer
        self.monitor: Fp8Monitor | None = None
        self.first = False  # set by attach(): this callback runs before the report_to integrations
        self._pending: tuple[int, dict[str, float]] | None = None

    def attach(self, trainer: transformers.Trainer) -> Fp8MonitorCallback:
        """Register this callback first in ``trainer``'s list, ahead of its ``report_to`` integrations."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self.first = True
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return control
        if self.monitor is not None:
            self.monitor.remove()
        modules = self.modules
        if modules is None:
            modules = "fp8" if any(isinstance(m, Fp8Linear) for m in model.modules()) else "linear"
        main = state.is_world_process_zero
        log_dir = (self.log_dir or args.output_dir) if main else None
        if log_dir is not None and state.global_step > 0:
            # resumed: the steps after the checkpoint will run again; their old records go
            drop_records_after(Path(log_dir) / LOG_NAME, state.global_step)
        self.monitor = Fp8Monitor(
            model,
            interval=self.interval,
            modules=modules,
            kurtosis_threshold=self.kurtosis_threshold,
            saturation_threshold=self.saturation_threshold,
            log_dir=log_dir,
            append=state.global_step > 0,  # a resumed run continues its log
            log_per_layer=self.log_per_layer,
            warn=main,
        )
        self._pending = None
        reporters = _reporting_integrations(args)
        if reporters and not self.first and main:
            warnings.warn(
                f"Fp8MonitorCallback runs after the report_to integrations {reporters}, so they will not receive "
                "the fp8/ metrics (trainer.state.log_history and fp8_monitor.jsonl still do). Use hf_fp8.Trainer "
                "with --fp8_monitor_interval, or register the callback with Fp8MonitorCallback(...).attach(trainer).",
                stacklevel=2,
            )
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.step_begin(state.global_step + 1)  # the step about to run, as it will be logged
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return control
        metrics = self.monitor.step_end(state.global_step)
        if metrics:
            self._pending = (state.global_step, metrics)
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None or logs is None:
            return control
        step, metrics = self._pending
        if step != state.global_step:  # this log is not the sampled step's (the Trainer skipped that one)
            return control
        self._pending = None
        logs.update(metrics)
        # Trainer.log appended a copy of logs to log_history before calling on_log
        if state.log_history and state.log_history[-1].get("step") == step:
            state.log_history[-1].update(metrics)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.remove()
        return control
