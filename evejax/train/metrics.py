"""What a person watching a run sees: a progress bar, log lines, TensorBoard, MFU.

Only process 0 reports. A log line looks like

  [llm_tiny] step 40/60 | loss 2.113 ce 2.113 | lr 1.2e-04 | grad_norm 0.85 |
  9.1e+04 tok/s | 0.011 s/step | MFU 14.2% | eta 0:00:01

with `skipped 3 (missing_image 2, too_long 1)` after grad_norm once the data
has skipped records. Skip counts (`skip_counts`: the data iterator's
`stats()` counters `skipped` and `skipped_<kind>`, summed over hosts) also go
to TensorBoard (train/skipped, train/skipped_<kind>), into the metrics the
checkpoint keeps, and into the summary line at the end of the stage.

MFU follows MaxText: the model FLOPs of one step (`ModelSpec.flops_per_step`,
the formula `evejax plan` uses; rematerialisation not counted) divided by
the step time and by the peak FLOP/s of all devices. Peaks per JAX device
come from `PEAK_FLOPS` (dense bf16), from `config.train.peak_flops_per_device`,
or, on CPU, from a short matmul measured at start-up.
TensorBoard event files are written with tensorboardX, without TensorFlow.
"""
from __future__ import annotations

import datetime
import math
import sys
import time
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per JAX device, by `device_kind` (lower-case prefix).
# TPU v2/v3 show each of a chip's two TensorCores as one device; v4/v5p
# (megacore) and v5e/v6e show one device per chip.
PEAK_FLOPS = {
    "tpu v2": 22.5e12,
    "tpu v3": 61.5e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "nvidia a100": 312e12,
    "nvidia h100": 989e12,
}


def measure_cpu_flops(size: int = 512, repeats: int = 10) -> float:
    """FLOP/s of one float32 matmul on the default CPU device."""
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        y = matmul(x)
    y.block_until_ready()
    return 2.0 * size ** 3 * repeats / (time.perf_counter() - start)


def peak_flops_per_device(configured: float = 0.0) -> float:
    """`configured` if set, else the table entry for this device kind.

    On CPU the fake devices share the host's cores, so the measured host rate
    is divided among them. Unknown accelerators give 0 (MFU not shown).
    """
    if configured:
        return float(configured)
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measure_cpu_flops() / jax.local_device_count()
    kind = device.device_kind.lower()
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return 0.0


def first_nonfinite(history: Sequence[tuple[int, Mapping[str, float]]]) -> Optional[tuple[int, dict]]:
    """The first (step, metrics) whose loss terms or gradient norm are NaN/inf."""
    for step, metrics in history:
        if not all(math.isfinite(float(v)) for v in metrics.values()):
            return step, dict(metrics)
    return None


def skip_counts(data_iter) -> dict[str, float]:
    """{"skipped": n, "skipped_<kind>": n, ...} of the data since the run began, summed over
    hosts; {} for data that keeps no counters (no `stats()`)."""
    if not hasattr(data_iter, "stats"):
        return {}
    counts = {k: float(v) for k, v in sorted(data_iter.stats().items()) if k.startswith("skipped")}
    if jax.process_count() > 1:   # every host has the same keys (one counter per bad-record kind)
        from jax.experimental import multihost_utils

        summed = multihost_utils.process_allgather(np.asarray(list(counts.values()))).sum(axis=0)
        counts = dict(zip(counts, summed.tolist()))
    return counts


def skips_text(counts: Mapping[str, float]) -> str:
    """"skipped 3 (missing_image 2, too_long 1)"; "" when nothing was skipped."""
    if not counts.get("skipped"):
        return ""
    kinds = ", ".join(f"{k[len('skipped_'):]} {int(v)}" for k, v in counts.items()
                      if k.startswith("skipped_") and v)
    return f"skipped {int(counts['skipped'])} ({kinds})"


def _summary_writer(logdir: str):
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch whenever it is installed (the `torch` extra),
    which costs seconds per start and is not needed for scalars.
    """
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"


class Reporter:
    """Progress bar, log lines and TensorBoard scalars of one stage.

    `log(step, metrics, lr)` is called with metrics already fetched to the
    host; throughput is measured between consecutive calls.
    """

    def __init__(self, name: str, total_steps: int, start_step: int, *, logdir: str,
                 flops_per_step: float, tokens_per_step: int, num_devices: int,
                 peak_flops_per_device: float, loss_terms: Sequence[str], progress_bar: bool = True):
        self.enabled = jax.process_index() == 0
        self.name, self.total = name, total_steps
        self.flops, self.tokens = flops_per_step, tokens_per_step
        self.peak = peak_flops_per_device * num_devices
        self.loss_terms = list(loss_terms)
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.bar = self.writer = None
        if not self.enabled:
            return
        from tqdm import tqdm

        self.writer = _summary_writer(logdir)
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def write(self, text: str) -> None:
        """A line of text above the bar (process 0 only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def restart_clock(self, step: int) -> None:
        """Measure throughput from here (after compilation, after a restore)."""
        self.last_step, self.last_time = step, time.perf_counter()

    def log(self, step: int, metrics: Mapping[str, float], lr: float,
            skipped: Optional[Mapping[str, float]] = None) -> dict:
        """`skipped`: `skip_counts` of the data. Returns the values logged."""
        skipped = skipped or {}
        now = time.perf_counter()
        steps = max(step - self.last_step, 1)
        step_time = (now - self.last_time) / steps
        self.last_step, self.last_time = step, now
        values = dict(metrics, **skipped, lr=lr, step_time=step_time, tokens_per_s=self.tokens / step_time)
        if self.peak:
            values["mfu"] = self.flops / step_time / self.peak
        if not self.enabled:
            return values
        eta = datetime.timedelta(seconds=round(step_time * (self.total - step)))
        terms = " ".join(f"{k} {_fmt(float(metrics[k]))}" for k in self.loss_terms if k in metrics)
        parts = [f"[{self.name}] step {step}/{self.total}", f"loss {_fmt(float(metrics['loss']))} {terms}",
                 f"lr {lr:.2e}", f"grad_norm {_fmt(float(metrics['grad_norm']))}",
                 skips_text(skipped), f"{values['tokens_per_s']:.3g} tok/s", f"{step_time:.3g} s/step"]
        if "mfu" in values:
            parts.append(f"MFU {100 * values['mfu']:.1f}%")
        parts.append(f"eta {eta}")
        self.write(" | ".join(p for p in parts if p))
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", float(value), step)
        self.writer.flush()
        return values

    def summarize_skips(self, skipped: Mapping[str, float]) -> None:
        """The stage's closing line on bad records (for data that counts them)."""
        if skipped:
            self.write(f"[{self.name}] data: {skips_text(skipped) or 'no records skipped'}")

    def advance(self, step: int) -> None:
        """The bar shows `step` finished steps."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
