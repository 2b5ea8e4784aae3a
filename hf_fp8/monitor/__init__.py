"""FP8 health monitor: activation kurtosis, amax, FP8 saturation and underflow, and scales, per layer.

Long FP8 runs diverge when activation outliers grow; the activations' kurtosis shows it long
before the loss or the gradient norm does (the FOG paper). This package measures it cheaply,
every ``interval`` steps:

- :class:`Fp8Monitor`: the hook API, for any training loop (``step_begin`` / ``step_end``);
- :class:`Fp8MonitorCallback`: the same in a HF ``Trainer``, with the metrics in the Trainer's
  logs (``report_to``); ``hf_fp8.Trainer`` adds it for ``--fp8_monitor_interval N``;
- ``python -m hf_fp8.monitor.plot <logdir>``: a PNG of the curves from ``fp8_monitor.jsonl``.

Importing this package imports neither transformers nor matplotlib.
"""

from __future__ import annotations

from hf_fp8.monitor.hooks import (
    DEFAULT_INTERVAL,
    DEFAULT_KURTOSIS_THRESHOLD,
    DEFAULT_SATURATION_THRESHOLD,
    Fp8Monitor,
    Fp8MonitorWarning,
)
from hf_fp8.monitor.records import LOG_NAME, read_records
from hf_fp8.monitor.stats import activation_kurtosis, input_stats

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_KURTOSIS_THRESHOLD",
    "DEFAULT_SATURATION_THRESHOLD",
    "LOG_NAME",
    "Fp8Monitor",
    "Fp8MonitorCallback",
    "Fp8MonitorWarning",
    "activation_kurtosis",
    "input_stats",
    "read_records",
]


def __getattr__(name: str):
    if name == "Fp8MonitorCallback":  # imports transformers: loaded on first use
        from hf_fp8.monitor.callback import Fp8MonitorCallback

        return Fp8MonitorCallback
    raise AttributeError(f"module 'hf_fp8.monitor' has no attribute {name!r}")
