"""The ``Args:`` sections of the optimizers' docstrings, written from their signatures.

Each argument is described once here (:data:`ARGS`); :func:`args_section` lists the
arguments of a signature in order with the type and meaning from this table and the
default from the signature itself, so a docstring cannot disagree with the defaults.
torch.optim composes its docstrings from shared pieces in the same way.
"""

from __future__ import annotations

import inspect
import textwrap

WIDTH = 92  # columns of an Args entry
ARGS: dict[str, tuple[str, str]] = {
    "params": ("iterable", "iterable of parameters to optimize or dicts defining parameter groups; "
                           "a group may set ``exclude_from_adaptation=True`` (bias, LayerNorm: no weight "
                           "decay, and no LARS trust ratio)"),
    "lr": ("float", "learning rate"),
    "betas": ("Tuple[float, float]", "coefficients of the running averages of the gradient and of its "
                                     "square, each in [0, 1)"),
    "eps": ("float", "term added to the denominator for numerical stability"),
    "weight_decay": ("float", "weight decay coefficient, applied as in the update above"),
    "momentum": ("float", "momentum factor, in [0, 1)"),
    "dampening": ("float", "dampening for momentum"),
    "nesterov": ("bool", "Nesterov momentum (needs momentum > 0 and dampening = 0)"),
    "amsgrad": ("bool", "the AMSGrad variant (the maximum of the second moments so far)"),
    "bias_correction": ("bool", "divide m and v by (1 - beta1^t) and (1 - beta2^t)"),
    "eta": ("float", "LARS trust coefficient, > 0"),
    "gamma": ("float", "lower clamp of the layer-normalised GSNR r, in (0, 1]; 1 makes the optimizer "
                       "exactly its base optimizer (no moments read, no GSNR state)"),
    "beta3": ("float", "GSNR momentum, in [0, 1); 0 scales by this step's r"),
    "moments": ("MomentSource", "where the mean of the squared group gradients comes from "
                                "(:class:`vrgd_ds.moments.MicroStepMoments`, "
                                ":class:`vrgd_ds.moments.DDPMoments`); the DeepSpeed and Megatron "
                                "integrations attach their own; ``attach_moments`` sets it later"),
    "on_nonfinite": ("str", "``\"raise\"``: a non-finite gradient or squared gradient raises "
                            "``FloatingPointError`` before any state changes; ``\"skip\"``: the step "
                            "is skipped, all state untouched, and counted in ``skipped_steps``"),
    "gsnr_interval": ("int", "compute the GSNR every N applied steps and reuse the last one between "
                             "(no squared gradients are read or reduced on those steps)"),
    "sq_comm_dtype": ("str", "``\"fp32\"`` or ``\"bf16\"``: the dtype in which the squared gradients "
                             "are reduced across ranks (bf16 halves their bytes, at a loss of precision)"),
    "telemetry_interval": ("int", "record the telemetry (``telemetry``: per-layer mean raw GSNR, "
                                  "clamped fraction, gradient noise scale) every N steps; 0: off"),
    "sq_chunk_numel": ("int", "elements squared and reduced at a time: bounds the squares' "
                              "temporary memory while a gradient bucket is reduced"),
    "foreach": ("bool", "torch-based updates (SGD, Adam, AdamW) only: ``None`` takes torch's fused "
                        "kernels where available, ``True`` its multi-tensor, ``False`` its per-tensor "
                        "implementation; the flat kernels have one implementation"),
    "compile": ("bool", "compile the flat kernels with ``torch.compile``: ``None`` for buffers large "
                        "enough, falling back to eager with one warning where compilation fails; "
                        "``True`` always (errors raise); ``False`` never"),
    "group_defaults": ("dict", "further param-group defaults (the VR subclasses pass gamma and beta3)"),
}


def args_section(signature: inspect.Signature) -> str:
    """``Args:`` and one entry per argument of ``signature`` (``self`` left out), torch.optim style:
    ``name (type, optional): meaning (default: value)``."""
    lines = ["Args:"]
    for name, p in signature.parameters.items():
        if name == "self":
            continue
        kind, text = ARGS[name]
        entry = (f"{name} ({kind}): {text}" if p.default is p.empty
                 else f"{name} ({kind}, optional): {text} (default: {p.default!r})")
        lines.append(textwrap.fill(entry, WIDTH, initial_indent="    ", subsequent_indent="        ",
                                   break_on_hyphens=False))
    return "\n".join(lines)


def with_args(cls: type, note: str | None = None) -> type:
    """Class decorator: append ``note`` (a paragraph, if given) and the ``Args:`` section of
    ``cls.__init__`` to the class docstring."""
    parts = [inspect.cleandoc(cls.__doc__ or ""), note, args_section(inspect.signature(cls.__init__))]
    cls.__doc__ = "\n\n".join(p for p in parts if p)
    return cls
