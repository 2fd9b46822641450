"""The adapter's FLOPs per sampling step at the real SD1.5 / SDXL shapes, counted by running the product code.

No formula here: the patched U-Net (llmdiff_core.comfy_patch.apply_adapter on a random-weight
ComfyUI U-Net) runs its forward on the meta device (shapes only, no weights, any machine) under
FlopCounterMode, exactly as a sampler step calls it: the APPLY_MODEL wrapper, the per-run
entry (c, K/V trimmed to the attended span, gates folded into V, tau_q cast once), the attn2
patches, and in hybrid mode the fusion at ComfyUI's attention core (CoreFusion). Whatever the
sampling path executes is what is counted, so the table follows the code when it changes.

Per run, as a sampler: begin_run, U-Net call 1 (builds the entry: the once-per-run work), U-Net
call 2 (the cached entry: the per-step work), end_run. Extra per step = call 2 minus the unpatched
U-Net's call. Two host reads cannot happen on meta tensors and are answered from the host values
the bench chose (the same values a real run reads there): which tokens the mask attends
(RunMask.prepare runs on the real mask on the CPU, its result moved to meta) and the gate values
(adapter.gate_weights returns CPU floats). Calls of the after-to_out fallback (fuse_after_out, a
second output projection) and of the core fusion are counted per step, so a table shows which
path ran.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

import builders
import common

ISSUE_FLOOR = {"sd15": 0.028, "sdxl": 0.048}  # issue 5, counted with the U-Net attention core left out
ISSUE_TARGET = {"sd15": 0.04, "sdxl": 0.06}


@dataclass
class StepFlops:
    family: str
    mode: str
    prompt: str  # e.g. "128 + 128", "60 + empty"
    span: int  # attended token span after trimming (keys per attention call)
    sites: int
    rows: int
    unet: float  # unpatched U-Net FLOPs per call (all rows)
    unet_attn: float  # of which its attention core (SDPA / bmm)
    extra: float  # patched step 2 - unpatched, all rows
    extra_attn: float  # of which attention (SDPA / bmm)
    once: float  # step 1 - step 2 (the per-run entry), all rows
    core_fusions: int  # per step: sites fused at the attention core (no second output projection; fused_site's too)
    out_fusions: int  # per step: sites fused after to_out (a second output projection each)
    unet_bytes: float = float("nan")  # memory traffic of the unpatched call, op by op (traffic.ByteCounter)
    extra_bytes: float = float("nan")  # patched step 2 - unpatched
    unet_kernel_s: float = float("nan")  # per-kernel roofline of the unpatched call (traffic.kernel_bound: H100)
    extra_kernel_s: float = float("nan")  # patched step 2 - unpatched


def feature_mask(lengths: list[int], tokens: int) -> torch.Tensor:
    """[B, tokens] bool as llmdiff_core.encoding.encode masks: tokens 1..n after the BOS, the BOS alone
    for an empty prompt (builders.make_features' layout)."""
    mask = torch.zeros(len(lengths), tokens, dtype=torch.bool)
    for row, n in enumerate(lengths):
        if n == 0:
            mask[row, 0] = True
        else:
            mask[row, 1:1 + n] = True
    return mask


def _is_attention(op: str) -> bool:
    return "bmm" in op or "attention" in op


def _counted(fn: Any, traffic_out: list[Any] | None = None) -> tuple[float, float]:
    """(total FLOPs, attention FLOPs) of fn(); with traffic_out, its traffic.ByteCounter is appended there.
    Attention runs as the fused efficient kernel (traffic.fused_sdpa: the same forward FLOPs as the meta
    device's bmm decomposition, and the bytes a GPU kernel moves)."""
    import traffic

    with torch.no_grad(), traffic.fused_sdpa(), common.flop_counter() as fc, traffic.ByteCounter() as bc:
        fn()
    if traffic_out is not None:
        traffic_out.append(bc)
    by_op = {str(k): float(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return float(fc.get_total_flops()), sum(v for k, v in by_op.items() if _is_attention(k))


@contextlib.contextmanager
def _host_values(adapter: Any, mask: torch.Tensor, gates: tuple[float, float],
                 calls: dict[str, int]) -> Iterator[None]:
    """Answers the two host reads of a meta run from host values, and counts the fusion calls (a one-kernel
    site's, fused_site, as "fused_site")."""
    import llmdiff_core.site_patches as patches  # the one module that calls the fusions
    from llmdiff_core.attention import SPAN_BUCKET, RunMask

    original = RunMask.__dict__["prepare"]
    n = len(adapter.sites)

    def prepare(cls: type, m: torch.Tensor, dtype: torch.dtype, device: torch.device, bucket: int = SPAN_BUCKET,
                host_mask: torch.Tensor | None = None, **kwargs: Any) -> RunMask:
        if m.device.type == "meta" and host_mask is None:  # a meta mask has no values: decide on the host one
            if m.shape != mask.shape:
                raise RuntimeError(f"meta mask {tuple(m.shape)} is not the host mask {tuple(mask.shape)}")
            host_mask = mask
        return original.__func__(cls, m, dtype, device, bucket, host_mask=host_mask, **kwargs)

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    saved = {name: getattr(patches, name) for name in ("fuse_at_core", "fuse_after_out")}
    RunMask.prepare = classmethod(prepare)
    adapter.gate_weights = lambda: (torch.full((n,), gates[0]), torch.full((n,), gates[1]))
    for name, fn in saved.items():
        setattr(patches, name, counting(name, fn))
    try:
        with common.counting_site_kernel(calls):
            yield
    finally:
        RunMask.prepare = original
        del adapter.gate_weights
        for name, fn in saved.items():
            setattr(patches, name, fn)


class _UNetCall:
    """The executor ApplyModelWrapper gets: the U-Net forward itself (no _apply_model around it)."""

    def __init__(self, base_model: Any) -> None:
        self.class_obj = base_model

    def __call__(self, x: Any, t: Any, c_concat: Any, context: Any, control: Any, transformer_options: dict,
                 **kwargs: Any) -> Any:
        return self.class_obj.diffusion_model(x, t, context, kwargs.get("y"), transformer_options=transformer_options)


@dataclass
class _MetaModel:
    """The real-shape U-Net on the meta device and one U-Net call's inputs (rows of x, t, CLIP context, y)."""

    mp: Any
    sites: list[Any]
    x: torch.Tensor
    ts: torch.Tensor
    clip: torch.Tensor
    y: torch.Tensor | None

    @classmethod
    def build(cls, family: str, dtype: torch.dtype, rows: int) -> _MetaModel:
        from llmdiff_core.unet_sites import find_sites

        meta = torch.device("meta")
        shape = builders.unet_shape(family, False)
        mp = builders.build_unet(family, False, dtype, meta)
        sites, _ = find_sites(mp.model.diffusion_model)
        return cls(mp, sites, torch.empty(rows, 4, shape.latent, shape.latent, device=meta, dtype=dtype),
                   torch.full((rows,), 500.0, device=meta),
                   torch.empty(rows, 77, shape.context_dim, device=meta, dtype=dtype),
                   torch.empty(rows, shape.adm, device=meta, dtype=dtype) if shape.adm else None)

    def patched(self, spec: Any, mode: str, bucket: int, dtype: torch.dtype,
                extra_options: dict[str, Any] | None = None) -> tuple[Any, Any, dict[str, Any], Any]:
        """(adapter on meta, apply_adapter's clone, the transformer_options a sampler hands the U-Net
        (patches + the patcher's wrappers), the clone's ApplyModelWrapper). mode: clip or llm, or clip+<site kernel>
        (apply_adapter's site_kernel)."""
        from llmdiff_core.adapter import LLMDiffAdapter
        from llmdiff_core.comfy_patch import apply_adapter
        from llmdiff_core.model_wrappers import ApplyModelWrapper
        from llmdiff_core.config import AdapterConfig
        from llmdiff_core.unet_sites import base_family

        import comfy.patcher_extension as pe

        path, _, kernel = mode.partition("+")
        with torch.device("meta"):
            adapter = LLMDiffAdapter(AdapterConfig(base=base_family(self.mp.model), sites=self.sites, llm=spec,
                                                   original_path=path, max_tokens=bucket)).to(dtype)
        patched = apply_adapter(self.mp, adapter, strength=1.0, site_kernel=kernel or None)
        # what comfy.sampler_helpers.prepare_model_patcher hands the U-Net: the patches plus the patcher's wrappers
        options = dict(patched.model_options["transformer_options"])
        options["wrappers"] = pe.merge_nested_dicts(options.get("wrappers", {}), patched.wrappers)
        options.update(extra_options or {})
        (wrapper,) = [w for w in pe.get_all_wrappers(pe.WrappersMP.APPLY_MODEL, options)
                      if isinstance(w, ApplyModelWrapper)]
        return adapter, patched, options, wrapper

    def call(self, wrapper: Any, options: dict[str, Any], batch: Any) -> torch.Tensor:
        """One U-Net call through the wrapper. BaseModel._apply_model's own work (sigma scaling, casts) needs
        model_sampling's real buffers: the wrapper calls the U-Net directly, as _apply_model would."""
        return wrapper(_UNetCall(self.mp.model), self.x, self.ts, None, self.clip, None, dict(options), y=self.y,
                       llmdiff=batch)


def _meta_features(spec: Any, mask: torch.Tensor) -> Any:
    """The `llmdiff` keyword of one call: features of the real LLM shape on meta, with the host mask."""
    from llmdiff_core.conditioning import CONDLLMDiff
    from llmdiff_core.features import LLMFeatures

    rows, bucket = mask.shape
    L, D = spec.num_layers, spec.hidden_size
    meta = torch.device("meta")
    features = LLMFeatures(spec, torch.empty(rows, L + 1, bucket, D, device=meta),
                           torch.empty(rows, L, bucket, D, device=meta), mask)
    return CONDLLMDiff(features).concat([])


def real_shape_steps(family: str, modes: list[str], spec: Any, cases: list[tuple[str, list[int]]],
                     bucket: int, gates: tuple[float, float] = (0.9, 0.5)) -> list[StepFlops]:
    """StepFlops for every mode x case (case = (label, attended tokens per row, 0 = empty prompt)).
    Rows = len(lengths) (2: cond + uncond of one CFG step)."""
    dt = torch.float16
    rows = len(cases[0][1])
    m = _MetaModel.build(family, dt, rows)
    unet = m.mp.model.diffusion_model
    base_traffic: list[Any] = []
    base, base_attn = _counted(lambda: unet(m.x, m.ts, m.clip, m.y, transformer_options={}), base_traffic)
    base_bytes, (base_s, _) = base_traffic[0].total, base_traffic[0].kernel_bound()

    out: list[StepFlops] = []
    for mode in modes:
        adapter, patched, options, wrapper = m.patched(spec, mode, bucket, dt)
        adapter.eval()
        runtime = wrapper.runtime
        for label, lengths in cases:
            if len(lengths) != rows:
                raise ValueError(f"case {label}: {len(lengths)} rows, expected {rows}")
            mask = feature_mask(lengths, bucket)
            batch = _meta_features(spec, mask)
            calls: dict[str, int] = {}
            with _host_values(adapter, mask, gates, calls):
                runtime.runs.forget()  # (the first call builds the run's entry: what `once` counts)
                runtime.begin_run(patched.get_model_object("model_sampling"))
                try:
                    first, _ = _counted(lambda: m.call(wrapper, options, batch))
                    calls.clear()
                    second_traffic: list[Any] = []
                    second, second_attn = _counted(lambda: m.call(wrapper, options, batch), second_traffic)
                    entry = runtime.runs.this_run[0]
                    span = entry.mask.stop - entry.mask.start
                finally:
                    runtime.end_run()
            step = second_traffic[0]
            out.append(StepFlops(family, mode, label, span, len(m.sites), rows, base, base_attn,
                                 second - base, second_attn - base_attn, first - second,
                                 calls.get("fuse_at_core", 0) + calls.get("fused_site", 0),
                                 calls.get("fuse_after_out", 0), base_bytes,
                                 step.total - base_bytes, base_s,
                                 step.kernel_bound()[0] - base_s))
    return out


# --- training ------------------------------------------------------------------------------------

@dataclass
class TrainFlops:
    family: str
    mode: str
    rows: int
    forward: float  # one training forward, all rows: c, every site's K/V, the patched U-Net
    backward: float  # its backward: activation gradients through the frozen U-Net + the adapter's gradients
    traffic: tuple[Any, ...] = ()  # traffic.ByteCounter of the forward and of the backward (eager: one kernel
    # per op, no fusion; attention as the fused efficient kernels)


def real_shape_training(family: str, modes: list[str], spec: Any, bucket: int, caption_tokens: int,
                        rows: int = 2) -> list[TrainFlops]:
    """FLOPs of one training step's forward and backward at the real shapes, counted on the product code
    path on the meta device: apply_adapter's wrapper with a TrainingCall (gates as tensors, nothing
    cached), the frozen U-Net in bf16 (requires_grad off, as training/runner.py sets it), the adapter
    trainable. The loss is a mean square of the U-Net output (the objective's own cost is negligible).
    Attention runs as the memory-efficient SDPA kernels (traffic.fused_sdpa: the same FLOPs as the meta
    device's decomposition), and the bytes each op moves are counted alongside (traffic.ByteCounter)."""
    import traffic

    from llmdiff_core.adapter_runtime import TrainingCall
    from llmdiff_core.model_wrappers import TRAINING_KEY

    dt = torch.bfloat16
    m = _MetaModel.build(family, dt, rows)
    m.mp.model.requires_grad_(False)
    mask = feature_mask([caption_tokens] * rows, bucket)
    out: list[TrainFlops] = []
    for mode in modes:
        adapter, _, options, wrapper = m.patched(spec, mode, bucket, dt, {TRAINING_KEY: TrainingCall(None)})
        adapter.train()
        with _host_values(adapter, mask, (1.0, 0.5), {}), traffic.fused_sdpa():
            with common.flop_counter() as forward, traffic.ByteCounter() as forward_bytes:
                loss = m.call(wrapper, options, _meta_features(spec, mask)).float().square().mean()
            with common.flop_counter() as backward, traffic.ByteCounter() as backward_bytes:
                loss.backward()
        out.append(TrainFlops(family, mode, rows, float(forward.get_total_flops()), float(backward.get_total_flops()),
                              (forward_bytes, backward_bytes)))
    return out
