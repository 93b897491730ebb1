"""The gradient noise scale from the two moments the VR optimizers already have
(docs/algorithm.md section 7; McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training").

With k groups of b samples each, and summed over the elements of a layer (or the model)
from the unclipped moments:

    S          = k / (k - 1) * sum (s - gbar^2)     unbiased variance of a group gradient
    trace_cov  = b * S                               tr(Sigma) of one sample's gradient
    grad_sq    = sum gbar^2 - S / k                  unbiased |G|^2
    b_simple   = trace_cov / grad_sq                 the critical-batch estimate, in samples

``b_simple_ema`` smooths trace_cov and grad_sq separately with an exponential moving
average and divides afterwards (the ratio of two averages, McCandlish's advice; their
bias corrections cancel in the ratio). grad_sq can be <= 0 on a noisy step: it is reported,
and b_simple is None then. Without b (samples per group unknown) trace_cov and the
b_simple values are None; ``group_var`` (S) is always given.

The per-element partial sums come from the VR optimizers' r_raw pass
(:func:`vrgd_ds.gsnr.raw_gsnr_terms` with the flag "noise") or, for the measure-only meter,
from :func:`vrgd_ds.gsnr.grad_square_partials` and its moment source's sums of squares; the
caller reduces them per layer across partitions (one collective, with the GSNR telemetry's).
"""

from __future__ import annotations

DEFAULT_EMA_DECAY = 0.95


def check_ema_decay(decay) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"the noise scale's ema_decay must be a number in [0, 1), got {decay!r}")
    return float(decay)


def noise_scale(var_sum: float, gsq_sum: float, k: int, b: int | None) -> dict:
    """trace_cov, grad_sq, b_simple and group_var from sum (s - gbar^2), sum gbar^2, k, b."""
    group_var = k / (k - 1) * var_sum
    grad_sq = gsq_sum - group_var / k
    trace_cov = None if b is None else b * group_var
    b_simple = trace_cov / grad_sq if trace_cov is not None and grad_sq > 0.0 else None
    return {"trace_cov": trace_cov, "grad_sq": grad_sq, "b_simple": b_simple, "group_var": group_var}


class NoiseScaleTracker:
    """Per-layer and whole-model noise scale with the EMAs, updated once per measurement.

    ``update`` takes per layer (var_sum, gsq_sum) in the gradient's scale and divides out
    ``clip_scale``^2 (the factor clipping multiplied the mean gradient by, applied to the
    squares' scale too), so the numbers are those of the unclipped moments."""

    def __init__(self, ema_decay: float = DEFAULT_EMA_DECAY):
        self.ema_decay = check_ema_decay(ema_decay)
        self.ema: dict = {}  # key (layer index or "model") -> [trace_cov ema, grad_sq ema]
        self._step, self._before = None, {}  # the EMAs before the step being measured

    def _smoothed(self, key, rec: dict) -> float | None:
        if rec["trace_cov"] is None:
            return None
        d = self.ema_decay
        prev = self.ema.get(key)
        cur = [rec["trace_cov"], rec["grad_sq"]] if prev is None else [
            d * prev[0] + (1 - d) * rec["trace_cov"], d * prev[1] + (1 - d) * rec["grad_sq"]]
        self.ema[key] = cur
        return cur[0] / cur[1] if cur[1] > 0.0 else None

    def update(self, per_layer: dict, k: int, b: int | None, clip_scale: float = 1.0,
               step: int | None = None) -> tuple[dict, dict]:
        """(whole-model record, {layer: record}); each record has trace_cov, grad_sq,
        b_simple, b_simple_ema, group_var. Calling it again for the same ``step`` (with more
        layers: DeepSpeed steps one param group at a time) redoes that step's EMA update."""
        if step is None or step != self._step:
            self._step, self._before = step, {key: list(v) for key, v in self.ema.items()}
        else:
            self.ema = {key: list(v) for key, v in self._before.items()}
        unclip = 1.0 / clip_scale**2 if clip_scale > 0.0 else 1.0
        layers, total_var, total_gsq = {}, 0.0, 0.0
        for layer, (var_sum, gsq_sum) in per_layer.items():
            var_sum, gsq_sum = var_sum * unclip, gsq_sum * unclip
            total_var, total_gsq = total_var + var_sum, total_gsq + gsq_sum
            rec = noise_scale(var_sum, gsq_sum, k, b)
            rec["b_simple_ema"] = self._smoothed(layer, rec)
            layers[layer] = rec
        model = noise_scale(total_var, total_gsq, k, b)
        model["b_simple_ema"] = self._smoothed("model", model)
        return model, layers

    def state_dict(self) -> dict:
        return {"ema_decay": self.ema_decay, "ema": {str(k): list(v) for k, v in self.ema.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ema_decay = check_ema_decay(state["ema_decay"])
        self.ema = {(k if k == "model" else int(k)): list(v) for k, v in state["ema"].items()}
