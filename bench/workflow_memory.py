"""Peak GPU memory of an SDXL + 8B-LLM workflow: LLM encode -> (LLM offloaded) -> sample with the adapter.

    python bench/workflow_memory.py                   # GPU only: SDXL 1024 px, Llama-3-8B shape, bf16 LLM
    python bench/workflow_memory.py --cpu-dry-run     # runs the same code path at tiny shapes (no numbers)

The models start on the offload device (CPU) like freshly loaded checkpoints, and go to the GPU
through ComfyUI's model management, as in a graph: the LLM via the pack's ManagedLLM.encode (what the
Text Encode node runs), the SDXL U-Net + adapter via comfy.sample.sample on apply_adapter's clone (what
KSampler runs). Scenarios (each starts with nothing loaded):
  comfy   - ComfyUI's own policy: it only evicts the LLM if the U-Net does not fit next to it;
  24gib   - the same, on a card that ComfyUI believes has 24 GiB (reserve_vram = total - 24 GiB);
  offload - the LLM explicitly unloaded right after encoding (what "offloaded after encoding" means);
  offload-rerun - offload, measuring a second run with a new prompt while the first run's models are loaded;
  NAME@Ngib - scenario NAME on a card that ComfyUI believes has N GiB (e.g. offload-rerun@20gib: does
            ComfyUI make room for the LLM on a 20 GiB card?).
Target (issue 5): <= 20 GiB peak (torch.cuda.max_memory_allocated). The VAE decode is not included.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_GIB = 20.0
KINDS = ("comfy", "offload", "offload-rerun")


def parse_scenario(name: str) -> tuple[str, float | None]:
    """'offload-rerun@20gib' -> ('offload-rerun', 20.0); '24gib' is 'comfy@24gib'; 'offload' -> ('offload', None)."""
    kind, _, card = ("comfy@24gib" if name == "24gib" else name).partition("@")
    if kind not in KINDS or (card and not card.endswith("gib")):
        raise SystemExit(f"unknown scenario {name!r}: one of {', '.join(KINDS)}, 24gib, or NAME@<N>gib")
    return kind, float(card.removesuffix("gib")) if card else None


def parse() -> Any:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="no GPU: run the code path at tiny shapes")
    p.add_argument("--scenarios", default="comfy,24gib,offload,offload-rerun,offload-rerun@20gib")
    p.add_argument("--steps", type=int, default=4, help="sampler steps (memory peaks in the first)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--adapter-dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="the adapter's projections as Adapter Loader (LLMDiff) loads them (auto: fp16 on most "
                        "GPUs); fp32 = the training export as it is")
    opts = p.parse_args()
    common.defaults(opts, repeats=1, warmup=0)
    if opts.cpu_dry_run:
        opts.small, opts.device = True, "cpu"
    return opts


def main() -> None:
    opts = parse()
    if not opts.cpu_dry_run:
        import torch

        if not torch.cuda.is_available() or opts.device == "cpu":
            print("### SDXL + 8B-LLM workflow peak GPU memory\n\nneeds a CUDA GPU: skipped (run it on a lent GPU; "
                  "--cpu-dry-run exercises the code path without measuring).")
            return
    device = common.setup_comfy(opts)
    import torch

    import builders
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sample
    from llmdiff_core.comfy_llm import ManagedLLM, _HFHolder
    from llmdiff_core.comfy_patch import apply_adapter

    cuda = device.type == "cuda"
    offload = mm.unet_offload_device()
    small = opts.small
    shape = builders.unet_shape("sdxl", small)
    llm_shape = "tiny" if small else "8b"
    llm_dtype = torch.bfloat16 if cuda else torch.float32

    # Models built on the compute device (fast random init), then parked on the offload device.
    mp = builders.build_unet("sdxl", small, torch.float16 if cuda else torch.float32, device, offload_device=offload)
    mp.model.to(offload)
    mp.model.device = offload
    loaded = builders.build_llm(llm_shape, llm_dtype, device)
    loaded.model.to(offload)
    spec = loaded.spec
    adapter = builders.build_adapter(mp, spec, "clip", opts.adapter_dtype, max_tokens=opts.tokens)
    llm = ManagedLLM(loaded, comfy.model_patcher.ModelPatcher(_HFHolder(loaded.model, llm_dtype), load_device=device,
                                                             offload_device=offload), "random-8b")
    patched = apply_adapter(mp, adapter, strength=1.0)
    if cuda:
        torch.cuda.empty_cache()

    def size_gib(module: Any) -> float:
        return sum(p.numel() * p.element_size() for p in module.parameters()) / common.GIB

    total = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    report = common.Report("SDXL + 8B-LLM workflow peak GPU memory", common.env_header(
        device, opts.root, unet=f"SDXL {shape.pixels} px {size_gib(mp.model.diffusion_model):.2f} GiB",
        llm=f"{llm_shape} {size_gib(loaded.model):.2f} GiB",
        adapter=f"{opts.adapter_dtype} {size_gib(adapter):.2f} GiB",
        steps=opts.steps))
    rows = []
    default_reserve = mm.EXTRA_RESERVED_VRAM
    for scenario in [s for s in opts.scenarios.split(",") if s]:
        mm.unload_all_models()
        mm.soft_empty_cache()
        mm.EXTRA_RESERVED_VRAM = default_reserve
        kind, card_gib = parse_scenario(scenario)
        if card_gib is not None and cuda:  # ComfyUI plans with total - reserve: the card it believes it has
            mm.EXTRA_RESERVED_VRAM = max(default_reserve, int(total - card_gib * common.GIB))
        llm.keep_loaded = not kind.startswith("offload")  # LLM Loader's after_encoding: offload or keep
        from llmdiff_core.conditioning import attach_features

        def workflow(prompt_tokens: int) -> tuple[Any, Any]:
            with common.PeakMemory(device) as enc:
                pos_f = llm.encode([builders.prompt_of(prompt_tokens)], opts.tokens, "error")
                neg_f = llm.encode([""], opts.tokens, "error")
            pos = attach_features(builders.clip_conditioning(shape, 1, 1), pos_f)
            neg = attach_features(builders.clip_conditioning(shape, 1, 2), neg_f)
            noise = torch.randn(1, 4, shape.latent, shape.latent, generator=torch.Generator().manual_seed(0))
            with common.PeakMemory(device) as samp:
                with torch.inference_mode():
                    comfy.sample.sample(patched, noise, opts.steps, 5.0, "euler", "normal", pos, neg,
                                        torch.zeros_like(noise), disable_pbar=True, seed=0)
            return enc, samp

        if kind.endswith("-rerun"):  # a second queue run with a new prompt: the U-Net is still loaded
            workflow(40)
        with common.PeakMemory(device) as whole:
            enc, samp = workflow(60)
        resident = any(getattr(lm.model, "model", None) is llm.patcher.model for lm in mm.current_loaded_models)
        rows.append([scenario, common.gib(enc.peak_gib), common.gib(samp.peak_gib), common.gib(whole.peak_gib),
                     "yes" if resident else "no", TARGET_GIB,
                     "n/a" if whole.peak_gib is None else ("met" if whole.peak_gib <= TARGET_GIB else "missed")])
    mm.EXTRA_RESERVED_VRAM = default_reserve
    report.table("peak torch.cuda.max_memory_allocated (GiB)", ["scenario", "encode peak", "sampling peak",
                                                                  "workflow peak", "LLM resident while sampling",
                                                                  "target GiB", "met"], rows)
    report.notes += [
        "offload: the LLM Loader's default (after_encoding offload: unloaded right after each encode); comfy: "
        "after_encoding keep, nothing evicts the LLM on a card with room for both; 24gib: keep, with ComfyUI told "
        "the card has 24 GiB (it evicts what sampling needs the room for); offload-rerun: offload, measuring a second "
        "run with a new prompt, so the LLM loads while the U-Net and adapter of the first run are still resident "
        "(ComfyUI keeps them while the card has room); @Ngib: ComfyUI told the card has N GiB.",
        "sampling: 1 latent with CFG (2 U-Net rows), euler; features reach the GPU once per run (per-run cache).",
    ]
    if opts.cpu_dry_run:
        report.notes.append("--cpu-dry-run: tiny shapes on CPU; memory columns are n/a by design.")
    report.emit(opts)


if __name__ == "__main__":
    main()
