"""Training in process (hybrid / CLIP mode, tiny SD1.5-layout U-Net with 16 sites, 64-wide CLIP,
TAESD, tiny Llama): overfitting, only adapter parameters change, resume = uninterrupted, cache =
on the fly, NaN handling, bad data, gradient checkpointing, and the export through the nodes."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from llmdiff_core.adapter_file import load_adapter, read_adapter_config
from llmdiff_core.llm import load_llm
from llmdiff_core.training import loop, prefetch, runner
from llmdiff_core.training.encoders import FrozenEncoders
from llmdiff_core.training.options import TrainOptions
from llmdiff_core.training.patching import enable_gradient_checkpointing, patch_for_training
from cuda_graph_audit import CudaGraphAudit
from train_support import make_images, make_shaped_images, shared_assets, tiny_clip, tiny_vae, write_folder
from tiny_unets import tiny_sd15

RES = 64  # 8x8 latents: the SD1.5 layout's three downsamplings still have something to halve


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~10x faster than two fighting
    other processes for the cores (and no slower alone)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return shared_assets(str(tmp_path_factory.getbasetemp() / "train_assets"))


@pytest.fixture(scope="module")
def frozen(assets):
    """Frozen models shared by the tests of this module (training never changes them: checked)."""
    return {"clip": tiny_clip(), "vae": tiny_vae(), "llm": load_llm(str(assets["llm"]), dtype=torch.float32)}


def components(frozen) -> runner.Components:
    return runner.Components(tiny_sd15(), frozen["clip"], frozen["vae"], frozen["llm"], "tiny_sd15", "tiny-llama")


def options(data: Path, out: Path, **kw) -> TrainOptions:
    base = dict(base_model="", llm="tiny-llama", data=str(data), output_dir=str(out), resolution=RES, batch_size=2,
                max_steps=4, lr=2e-3, warmup_steps=0, num_workers=0, mixed_precision="no", progress=False,
                tensorboard=False, log_every=1, checkpoint_every=0, max_tokens=32, seed=0, caption_dropout=0.0)
    base.update(kw)
    return TrainOptions(**base)


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def interrupted_then_resumed(opts: TrainOptions, frozen, monkeypatch, stop_at: int) -> None:
    """Runs opts stopped as by a SIGTERM during step `stop_at` (a checkpoint, no export), then --resume latest."""
    original = loop.Trainer.train_step

    def stop_during(self: loop.Trainer) -> float:
        loss = original(self)
        if self.state.step + 1 == stop_at:
            self.stop.requested = "SIGTERM"
        return loss
    monkeypatch.setattr(loop.Trainer, "train_step", stop_during)
    assert runner.run_with(opts, components(frozen)) == 0
    out = Path(opts.output_dir)
    assert (out / "checkpoints" / f"step-{stop_at:08d}").is_dir()
    assert not (out / opts.export_name).exists()
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    assert runner.run_with(replace(opts, resume="latest"), components(frozen)) == 0


def eval_loss(adapter, frozen, data: Path, n_draws: int = 6) -> float:
    """Loss of an adapter on every image with fixed timesteps/noise (no Langevin noise)."""
    comps = components(frozen)
    patched = patch_for_training(comps.model_patcher, adapter)
    module = loop.TrainModule(adapter, patched, adapter.config.llm, "eps", 0.0, adapter.config.context_dim,
                              langevin_noise=False)
    from llmdiff_core.training import data as D, objective, sources

    items = list(D.iterate(sources.open_source(str(data)), D.StreamSpec(seed=0, shuffle=False, resolution=RES, epochs=1),
                           D.Position()))
    enc = FrozenEncoders(comps.vae, comps.llm, comps.clip, 32, need_clip=True, need_pooled=False)
    cond = enc.encode([i.key for i in items], torch.stack([i.pixels for i in items]), [i.caption for i in items],
                      [(0, 0, 0, 0)] * len(items))
    model = patched.model
    total = 0.0
    with torch.no_grad():
        for d in range(n_draws):
            draw = objective.draw([1000 * d + i for i in range(len(items))], tuple(cond.latents.shape[1:]), 1000, 0.0)
            total += float(module(model.process_latent_in(cond.latents), draw.noise, draw.timesteps,
                                  cond.features.hidden, cond.features.scores, cond.features.mask, cond.clip, None,
                                  draw.encoder_seeds).mean())
    return total / n_draws


@pytest.mark.slow
def test_overfit_drives_loss_down_and_only_the_adapter_changes(tmp_path: Path, frozen) -> None:
    data = write_folder(tmp_path / "data", make_images(4))
    comps = components(frozen)
    frozen_before = {name: state(m) for name, m in (("unet", comps.model_patcher.model), ("llm", frozen["llm"].model),
                                                    ("clip", frozen["clip"].cond_stage_model),
                                                    ("vae", frozen["vae"].first_stage_model))}
    opts = options(data, tmp_path / "out", batch_size=4, max_steps=60, lr=1e-2, warmup_steps=5)
    fresh = runner.build_adapter(opts, comps, torch.device("cpu"))
    before = eval_loss(fresh, frozen, data)
    assert runner.run_with(opts, comps) == 0
    trained = load_adapter(tmp_path / "out" / opts.export_name)
    after = eval_loss(trained, frozen, data)
    assert after < 0.7 * before, (before, after)
    # the frozen models are bit-for-bit unchanged
    for name, m in (("unet", comps.model_patcher.model), ("llm", frozen["llm"].model),
                    ("clip", frozen["clip"].cond_stage_model), ("vae", frozen["vae"].first_stage_model)):
        for k, v in state(m).items():
            assert torch.equal(v, frozen_before[name][k]), (name, k)
    # ... and every kind of adapter parameter moved, the gates included
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, fresh.state_dict()[k].cpu())}
    for key in ("a_new", "b_new", "a_orig", "encoder.gate", "encoder.rho", "encoder.norm.weight",
                "sites.0.to_k.weight", "sites.15.to_q.weight"):
        assert key in changed, key
    assert float(trained.gate_weights()[1].detach().abs().min()) > 0  # w_new left zero for every layer


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_adapter(tmp_path: Path, frozen, monkeypatch) -> None:
    data = write_folder(tmp_path / "data", make_images(5))
    common = dict(max_steps=6, warmup_steps=2, ema_decay=0.9, caption_dropout=0.5, batch_size=2, grad_accum=2)
    whole = options(data, tmp_path / "whole", **common)
    assert runner.run_with(whole, components(frozen)) == 0

    part = options(data, tmp_path / "part", **common)
    interrupted_then_resumed(part, frozen, monkeypatch, stop_at=3)

    a = load_adapter(tmp_path / "whole" / whole.export_name).state_dict()
    b = load_adapter(tmp_path / "part" / part.export_name).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert losses(tmp_path / "part") == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)


@pytest.mark.slow
def test_start_over_and_mismatched_resume_are_refused_by_name(tmp_path: Path, frozen, monkeypatch) -> None:
    """A checkpoint continues its own run: another encoding, original path or c0 would not fit its parameters or
    would change what they mean (c0), and another base model or LLM would not fit them; a run without --resume
    would overwrite the checkpoints. The script says so before any model loads (the models: before the first
    step), and the checkpoints stay."""
    from tiny_unets import tiny_sdxl

    from llmdiff_core.errors import LLMDiffError

    data = write_folder(tmp_path / "data", make_images(4))
    opts = options(data, tmp_path / "out", max_steps=2, checkpoint_every=1)
    assert runner.run_with(opts, components(frozen)) == 0
    kept = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    for change, named in ((dict(original_path="llm"), "--original-path clip .this run: llm."),
                          (dict(encoding="last"), "--encoding score .this run: last."),
                          (dict(c0="zeros"), "--c0 embeddings .this run: zeros.")):
        other = replace(opts, resume="latest", max_steps=3, **change)
        with pytest.raises(LLMDiffError, match=f"was trained with {named}: resume with its settings"):
            runner.run_with(other, components(frozen))
    monkeypatch.setattr(runner, "load_components", lambda *a: pytest.fail("loaded the models"))
    monkeypatch.setattr(runner, "make_accelerator", lambda opts: None)
    with pytest.raises(LLMDiffError, match="--c0 embeddings"):
        runner.run(replace(opts, resume="latest", c0="zeros"))
    monkeypatch.undo()
    sdxl = runner.Components(tiny_sdxl(), frozen["clip"], frozen["vae"], frozen["llm"], "tiny_sdxl", "tiny-llama")
    with pytest.raises(LLMDiffError, match="does not fit this run's models. .*SD1.5.*SDXL"):
        runner.run_with(replace(opts, resume="latest", max_steps=3), sdxl)
    assert sorted((tmp_path / "out" / "checkpoints").glob("step-*")) == kept
    # Forgetting --resume would overwrite and prune the earlier run's checkpoints: refused, before loading
    monkeypatch.setattr(runner, "load_components", lambda *a: pytest.fail("loaded the models"))
    monkeypatch.setattr(runner, "make_accelerator", lambda opts: None)
    with pytest.raises(LLMDiffError, match="holds the checkpoints of an earlier run .the newest: step-00000002.: "
                                           "--resume latest continues it"):
        runner.run(replace(opts, max_steps=3))
    monkeypatch.undo()
    assert sorted((tmp_path / "out" / "checkpoints").glob("step-*")) == kept
    assert runner.run_with(replace(opts, resume="latest", max_steps=3), components(frozen)) == 0  # its own: goes on


@pytest.mark.slow
def test_cache_backed_run_matches_on_the_fly(tmp_path: Path, frozen, monkeypatch) -> None:
    """The same losses; the cached batches are expanded on the device only up to their attended span's end
    (the short captions here reach 33 of the 64-token bucket), the on-the-fly ones are cut there."""
    data = write_folder(tmp_path / "data", make_images(6))
    common = dict(max_steps=3, caption_dropout=0.3, batch_size=2, max_tokens=64)
    fly = options(data, tmp_path / "fly", **common)
    assert runner.run_with(fly, components(frozen)) == 0
    cache = tmp_path / "cache"
    cached = options(data, tmp_path / "cached", cache_dir=str(cache), cache_dtype="fp32", cache_shard_size=4,
                     cache_batch_size=3, **common)
    assert runner.run_with(replace(cached, cache_only=True), components(frozen)) == 0
    shards = sorted(p.name for p in cache.glob("rank0-*.safetensors"))
    assert shards == ["rank0-00000.safetensors", "rank0-00001.safetensors"]  # 6 samples, 4 per shard
    # training from the cache needs no LLM at all
    comps = components(frozen)
    comps.llm = None
    widths: list[int] = []
    expand = loop.expand_features

    def recording_expand(*args: Any) -> Any:
        out = expand(*args)
        widths.append(out.num_tokens)
        return out
    monkeypatch.setattr(loop, "expand_features", recording_expand)
    assert runner.run_with(cached, comps) == 0
    assert len(widths) == 3 and all(w < 64 for w in widths), widths
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "fly"), rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_aspect_buckets_train_batches_of_one_size_resume_exactly_and_cache_the_same(tmp_path: Path, frozen,
                                                                                    monkeypatch, caplog) -> None:
    """--aspect-buckets: each micro-batch is one bucket's size (64x64, 80x48 or 48x80 here), samples waiting for
    their bucket's batch are in the checkpoint, so stop + resume = the uninterrupted run; a cache-backed run trains
    the same as the on-the-fly one, and the log says how many images each bucket holds."""
    from llmdiff_core.training import checkpointing

    sizes = [(40, 40), (80, 44), (40, 80), (56, 40), (44, 40), (40, 72), (72, 40), (48, 48), (90, 50)]  # (w, h)
    data = write_folder(tmp_path / "data", make_shaped_images(sizes))
    common = dict(max_steps=6, warmup_steps=2, caption_dropout=0.5, batch_size=2, grad_accum=2, ema_decay=0.9,
                  aspect_buckets=True, bucket_step=16)
    shapes: list[tuple[int, ...]] = []
    forward = loop.TrainModule.forward

    def spy(self: loop.TrainModule, latents: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.append(tuple(latents.shape))
        return forward(self, latents, *args, **kwargs)
    monkeypatch.setattr(loop.TrainModule, "forward", spy)
    whole = options(data, tmp_path / "whole", **common)
    assert runner.run_with(whole, components(frozen)) == 0
    assert len(shapes) == 12 and {s[-2:] for s in shapes} == {(8, 8), (6, 10), (10, 6)}, shapes
    assert read_adapter_config(tmp_path / "whole" / whole.export_name).training["aspect_buckets"] == \
        "64x64, 80x48, 48x80"

    part = options(data, tmp_path / "part", **common)
    interrupted_then_resumed(part, frozen, monkeypatch, stop_at=3)
    saved = checkpointing.load_state(tmp_path / "part" / "checkpoints" / "step-00000003")
    assert saved["processes"][0]["position"]["waiting"]  # (the resume had samples to read again)
    a = load_adapter(tmp_path / "whole" / whole.export_name).state_dict()
    b = load_adapter(tmp_path / "part" / part.export_name).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert losses(tmp_path / "part") == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)

    cached = options(data, tmp_path / "cached", cache_dir=str(tmp_path / "cache"), cache_dtype="fp32",
                     cache_batch_size=4, **common)
    caplog.set_level(logging.INFO, logger="llmdiff.train")
    assert runner.run_with(cached, components(frozen)) == 0
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "whole"), rel=1e-4, abs=1e-6)
    assert "images per bucket (width x height): 64x64: 3, 80x48: 4, 48x80: 2" in caplog.text


@pytest.mark.slow
def test_a_compiled_bucketed_run_compiles_a_static_graph_per_size_and_trains_the_same(tmp_path: Path, frozen,
                                                                                      monkeypatch) -> None:
    """With --aspect-buckets, --compile-unet compiles one static graph per bucket (torch would make the sizes
    dynamic at the second one) within a recompile limit raised for the run, and restored after it."""
    import comfy_api.torch_helpers as helpers
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    data = write_folder(tmp_path / "data", make_shaped_images([(40, 40), (80, 44), (40, 80), (44, 40), (40, 72),
                                                               (72, 40)]))
    common = dict(max_steps=3, batch_size=2, aspect_buckets=True, bucket_step=16)
    assert runner.run_with(options(data, tmp_path / "eager", **common), components(frozen)) == 0
    asked: list[Any] = []
    original = helpers.set_torch_compile_wrapper

    def spy(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("dynamic"))
        return original(*args, **kwargs)
    monkeypatch.setattr(helpers, "set_torch_compile_wrapper", spy)
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    limit = getattr(dynamo_config, name)
    seen: list[int] = []
    forward = loop.TrainModule.forward

    def during(self: loop.TrainModule, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(getattr(dynamo_config, name))
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(loop.TrainModule, "forward", during)
    torch._dynamo.reset()
    counters.clear()
    try:
        assert runner.run_with(options(data, tmp_path / "compiled", compile_unet="aot_eager", **common),
                               components(frozen)) == 0
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert asked == [False] and set(seen) == {limit + 2} and getattr(dynamo_config, name) == limit  # 3 sizes
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_a_feature_cache_made_with_other_settings_is_refused_by_name(tmp_path: Path, frozen, monkeypatch) -> None:
    """Features made for another resolution, LLM bucket, encoding, mode or precision would train a wrong adapter
    without a sign: the run stops before its first step and names what differs."""
    from llmdiff_core.errors import LLMDiffError

    data = write_folder(tmp_path / "data", make_images(2))
    made = options(data, tmp_path / "made", cache_dir=str(tmp_path / "cache"), cache_only=True, cache_dtype="fp32",
                   max_steps=1)
    assert runner.run_with(made, components(frozen)) == 0
    for change, named in ((dict(resolution=RES // 2), "resolution"), (dict(max_tokens=48), "max_tokens"),
                          (dict(encoding="last"), "layers, scores"), (dict(original_path="llm"), "original_path"),
                          (dict(cache_dtype="fp16"), "dtype"), (dict(caption_column="text"), "caption_column"),
                          (dict(clip_stop_at_layer=-2), "clip_stop_at_layer"),
                          (dict(aspect_buckets=True, bucket_step=16), "aspect_buckets")):
        other = replace(made, output_dir=str(tmp_path / "other"), cache_only=False, **change)
        with pytest.raises(LLMDiffError, match=f"made with other settings \\({named} differ\\): use a new --cache-dir"):
            runner.run_with(other, components(frozen))
        assert not (tmp_path / "other" / "metrics.jsonl").exists()
    assert runner.run_with(replace(made, output_dir=str(tmp_path / "same"), cache_only=False), components(frozen)) == 0
    assert len(losses(tmp_path / "same")) == 1

    # A cache of the earlier format (captions given to the LLM with their weighting syntax) is refused, by the
    # script before any model loads
    meta = tmp_path / "cache" / "cache.json"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), version=1)))
    old_format = replace(made, output_dir=str(tmp_path / "old"), cache_only=False)
    with pytest.raises(LLMDiffError, match="cache format 1; this one reads 2.*build it again in a new --cache-dir"):
        runner.run_with(old_format, components(frozen))
    monkeypatch.setattr(runner, "load_components", lambda *a: pytest.fail("loaded the models"))
    monkeypatch.setattr(runner, "make_accelerator", lambda opts: None)
    with pytest.raises(LLMDiffError, match="cache format 1"):
        runner.run(old_format)
    assert not (tmp_path / "old" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_dataset_changed_since_its_cache_was_built_is_said(tmp_path: Path, frozen, caplog) -> None:
    """A finished cache is what training reads: images added to the dataset afterwards, removed ones and edited
    manifest captions are not trained on as they are now, which the run says (with counts and an example)."""
    from train_support import write_jsonl

    samples = make_images(4) + [("broken", b"not an image", "skipped by the build")]
    manifest = write_jsonl(tmp_path / "data", samples)
    made = options(manifest, tmp_path / "made", cache_dir=str(tmp_path / "cache"), cache_only=True,
                   image_root=str(tmp_path / "data" / "images"), max_steps=1)
    assert runner.run_with(made, components(frozen)) == 0
    caplog.set_level(logging.WARNING, logger="llmdiff.train")
    assert runner.run_with(replace(made, cache_only=False, output_dir=str(tmp_path / "same")), components(frozen)) == 0
    assert "changed since the feature cache" not in caplog.text
    write_jsonl(tmp_path / "data", [samples[0], (samples[1][0], samples[1][1], "an edited caption")] + samples[3:]
                + make_images(6, seed=1)[4:])  # img_002 gone; img_004, img_005 new; "broken" still there
    assert runner.run_with(replace(made, cache_only=False, output_dir=str(tmp_path / "changed")),
                           components(frozen)) == 0
    assert "the dataset changed since the feature cache" in caplog.text
    # (the cache does not say which entries its build skipped: the count of new ones is a lower bound then)
    assert "(at least 2 entries added, 1 removed (e.g. img_002), 1 captions edited (e.g. img_001))" in caplog.text


@pytest.mark.slow
def test_cache_prefetch_trains_the_same_and_resumes_exactly(tmp_path: Path, frozen, monkeypatch) -> None:
    """Batches from the cache are prepared in a background thread (default): the same run as without it,
    and a stop + resume (the batch prepared ahead is dropped and read again) = the uninterrupted run."""
    data = write_folder(tmp_path / "data", make_images(5))  # odd count: epochs end mid-batch
    common = dict(max_steps=6, warmup_steps=2, caption_dropout=0.5, batch_size=2, grad_accum=2, ema_decay=0.9,
                  cache_dir=str(tmp_path / "cache"), cache_dtype="fp32", cache_shard_size=2)
    assert runner.run_with(options(data, tmp_path / "prepass", cache_only=True, **common), components(frozen)) == 0
    takes = {"n": 0}
    original_take = prefetch.Prefetcher.take

    def counted_take(self: prefetch.Prefetcher) -> object:
        takes["n"] += 1
        return original_take(self)
    monkeypatch.setattr(prefetch.Prefetcher, "take", counted_take)

    serial = options(data, tmp_path / "serial", prefetch=False, **common)
    assert runner.run_with(serial, components(frozen)) == 0
    assert takes["n"] == 0
    whole = options(data, tmp_path / "whole", **common)
    assert runner.run_with(whole, components(frozen)) == 0
    assert takes["n"] == 12  # 6 steps x 2 micro-batches, every one through the prefetcher
    a = load_adapter(tmp_path / "serial" / serial.export_name).state_dict()
    b = load_adapter(tmp_path / "whole" / whole.export_name).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert losses(tmp_path / "whole") == losses(tmp_path / "serial")

    part = options(data, tmp_path / "part", **common)
    interrupted_then_resumed(part, frozen, monkeypatch, stop_at=3)
    c = load_adapter(tmp_path / "part" / part.export_name).state_dict()
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert losses(tmp_path / "part") == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)


@pytest.mark.parametrize("projections, fp8", [(True, False), (False, False), (True, True)],
                         ids=["compiled_projections", "eager_projections", "float8_unet"])
def test_compiled_training_step_can_run_as_cuda_graphs(tmp_path: Path, frozen, projections: bool, fp8: bool) -> None:
    """train.py --compile-unet inductor --compile-mode reduce-overhead runs the training step's forward and backward
    as CUDA graphs only if no graph holds an op CUDA graphs refuse, takes an input that is not a tensor or a
    size, or writes to an input (inductor would skip CUDA graphs for the whole U-Net, with a logged warning).
    The whole-bucket graphs (the default) are audited with torch's own checks; GPU speed: bench/device_run.sh next.
    With --compile-projections (the default) every site's K/V projection is a graph of its own, forward and
    backward; --no-compile-projections leaves the U-Net's alone. --unet-fp8's float8 GEMMs and weights (buffers:
    static inputs) keep it capturable."""
    audit = CudaGraphAudit()
    name = f"llmdiff_cuda_graph_audit_{id(audit)}"  # (a registered name is taken for the process)
    torch._dynamo.register_backend(audit.backend, name=name)
    data = write_folder(tmp_path / "data", make_images(4))
    run = options(data, tmp_path / "out", max_steps=2, compile_unet=name, compile_projections=projections,
                  unet_fp8=fp8)
    assert run.compile_whole_bucket
    torch._dynamo.reset()
    try:
        assert runner.run_with(run, components(frozen)) == 0
    finally:
        torch._dynamo.reset()
    graphs = 2 if projections else 1  # forward and backward each: the K/V projections', then the U-Net's
    assert audit.graphs == [{"incompatible op": None, "non-tensor inputs": [], "mutated inputs": []}] * graphs, \
        audit.graphs
    assert audit.backward_graphs == [{"incompatible op": None, "non-tensor inputs": []}] * graphs, audit.backward_graphs
    gemms = audit.computing[-1]["aten._scaled_mm"]  # the U-Net's forward graph
    if fp8:  # float8 GEMMs traced, and their float8 weights static inputs (a replay does not copy them)
        assert gemms > 0, audit.computing[-1]
        assert not any("float8" in dtype for graph in audit.copied_dtypes for dtype in graph), audit.copied_dtypes
    else:
        assert gemms == 0


@pytest.mark.slow
@pytest.mark.parametrize("fast", [{"channels_last": True}, {"compile_unet": "aot_eager"},
                                  {"compile_unet": "aot_eager", "compile_whole_bucket": True},
                                  {"compile_unet": "aot_eager", "gradient_checkpointing": True}],
                         ids=["channels_last", "compiled", "compiled_whole_bucket", "compiled_checkpointed"])
def test_channels_last_and_compiled_unet_train_the_same(tmp_path: Path, frozen, fast: dict, monkeypatch,
                                                        caplog) -> None:
    """--channels-last and --compile-unet change how the frozen U-Net runs, not what is trained. The compiled
    run uses AOTAutograd (forward + backward graphs, no inductor: seconds on a CPU) and must not break the
    graph; the shared U-Net is left as it came."""
    from torch._dynamo.utils import counters

    data = write_folder(tmp_path / "data", make_images(4))
    common = dict(max_steps=3, caption_dropout=0.5, batch_size=2)
    eager = options(data, tmp_path / "eager", **common)
    assert runner.run_with(eager, components(frozen)) == 0
    seen_formats: list[bool] = []
    forward = loop.TrainModule.forward

    def spy(self: loop.TrainModule, *args: Any, **kwargs: Any) -> torch.Tensor:
        conv = next(m for m in self.patched.model.diffusion_model.modules() if isinstance(m, torch.nn.Conv2d))
        seen_formats.append(conv.weight.is_contiguous(memory_format=torch.channels_last))
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(loop.TrainModule, "forward", spy)
    torch._dynamo.reset()
    counters.clear()
    caplog.set_level(logging.INFO, logger="llmdiff.train")
    try:
        comps = components(frozen)
        run = options(data, tmp_path / "fast", **common, **fast)
        assert runner.run_with(run, comps) == 0
        if "compile_unet" in fast:
            assert counters["stats"]["unique_graphs"] >= 1  # it did compile
            assert "compile cache" in caplog.text  # the silent first steps are explained
        if fast.get("gradient_checkpointing"):  # correct, but split: the run says so
            assert "--compile-unet with --gradient-checkpointing" in caplog.text
        elif "compile_unet" in fast:
            assert not counters["graph_break"], dict(counters["graph_break"])
        assert seen_formats and all(seen_formats) == bool(fast.get("channels_last"))
    finally:
        torch._dynamo.reset()
    assert losses(tmp_path / "fast") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4, abs=1e-6)
    a = load_adapter(tmp_path / "eager" / eager.export_name).state_dict()
    b = load_adapter(tmp_path / "fast" / run.export_name).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    conv = next(m for m in comps.model_patcher.model.diffusion_model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()  # channels-last undone after the run


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_unet_fp8_trains_through_float8_gemms_and_leaves_the_unet_as_it_came(tmp_path: Path, frozen, compiled: bool,
                                                                          monkeypatch) -> None:
    """--unet-fp8: the frozen U-Net's linear layers cast their activations to e4m3 in the forward and their
    output gradients to e5m2 in the backward; the run trains about as the unconverted one does (float8's
    rounding, not another objective), compiled without graph breaks, and the U-Net is left as it came."""
    from torch._dynamo.utils import counters

    from llmdiff_core.training import float8_linears as f8

    data = write_folder(tmp_path / "data", make_images(4))
    common = dict(max_steps=3, batch_size=2, **({"compile_unet": "aot_eager"} if compiled else {}))
    assert runner.run_with(options(data, tmp_path / "plain", **common), components(frozen)) == 0
    casts: list[torch.dtype] = []
    to_float8 = f8.to_float8

    def counted(t: torch.Tensor, dtype: torch.dtype) -> Any:
        casts.append(dtype)
        return to_float8(t, dtype)
    if not compiled:  # (a side effect breaks a compiled graph; there the CUDA-graph audit sees the float8 GEMMs)
        monkeypatch.setattr(f8, "to_float8", counted)
    comps = components(frozen)
    linears = [m for m in comps.model_patcher.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    torch._dynamo.reset()
    counters.clear()
    try:
        assert runner.run_with(options(data, tmp_path / "fp8", unet_fp8=True, **common), comps) == 0
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    if not compiled:
        assert casts.count(torch.float8_e4m3fn) > len(linears)  # the weights once, then activations in the forward
        assert casts.count(torch.float8_e5m2) > 0  # output gradients in the backward
    plain, fp8 = losses(tmp_path / "plain"), losses(tmp_path / "fp8")
    assert fp8 != plain and fp8 == pytest.approx(plain, rel=0.02), (fp8, plain)
    a = load_adapter(tmp_path / "plain" / "llmdiff_adapter.safetensors").state_dict()
    b = load_adapter(tmp_path / "fp8" / "llmdiff_adapter.safetensors").state_dict()
    assert all(b[k].isfinite().all() for k in b) and any(not torch.equal(a[k], b[k]) for k in a)
    assert not any("forward" in vars(m) for m in linears)
    assert not any(n.startswith("llmdiff_fp8") for n, _ in comps.model_patcher.model.named_buffers())


@pytest.mark.slow
def test_validation_of_a_compiled_run_samples_eager_and_compiles_nothing_more(tmp_path: Path, frozen) -> None:
    """Validation images sample through the patched model with its U-Net eager: under --compile-unet a few
    images in inference mode at the sampler's batch would otherwise compile U-Net graphs of their own
    (minutes for SDXL, and their memory) for seconds of eager sampling. The run traces the graphs its
    training traces, no more, and the images are the eager run's."""
    from torch._dynamo.utils import counters

    data = write_folder(tmp_path / "data", make_images(4))
    common = dict(max_steps=2, compile_whole_bucket=True, validation_steps=2, validation_size=RES)
    graphs, grids = {}, {}
    for name, extra in {"eager": {}, "compiled": {"compile_unet": "aot_eager"},
                        "compiled_plain": {"compile_unet": "aot_eager", "validation_prompts": []}}.items():
        run = options(data, tmp_path / name, **{"validation_prompts": ["a green circle"], **common, **extra})
        torch._dynamo.reset()
        counters.clear()
        try:
            assert runner.run_with(run, components(frozen)) == 0
            graphs[name] = counters["stats"]["unique_graphs"]
        finally:
            torch._dynamo.reset()
        grids[name] = sorted((tmp_path / name / "validation").glob("*.png"))
    assert graphs["compiled"] == graphs["compiled_plain"] >= 1, graphs  # validation compiled nothing
    assert graphs["eager"] == 0 and grids["compiled_plain"] == [], (graphs, grids)
    assert [p.name for p in grids["compiled"]] == [p.name for p in grids["eager"]] != []
    for a, b in zip(grids["compiled"], grids["eager"]):
        diff = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16))
        assert diff.max() <= 2, (a.name, int(diff.max()))  # the same adapter (losses agree to 1e-4), sampled eager


@pytest.mark.slow
def test_validation_samples_the_ema_weights_and_training_goes_on_from_its_own(tmp_path: Path, frozen,
                                                                             monkeypatch) -> None:
    """With --ema-decay the images show the weights that will be exported; the steps after them continue from the
    trained weights, so a run with validation exports what the same run without it exports."""
    data = write_folder(tmp_path / "data", make_images(4))
    common = dict(max_steps=4, ema_decay=0.9, validation_steps=2, validation_size=f"{RES}x{RES - 16}")
    trainers: list[loop.Trainer] = []
    sampled_with: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    validate, render = loop.Trainer.validate, loop.previews.render

    def validate_seen(self: loop.Trainer, tracker: Any) -> None:
        trainers.append(self)
        validate(self, tracker)

    def render_seen(*args: Any, **kwargs: Any) -> Any:
        t = trainers[-1]
        sampled_with.append((state(t.adapter), {k: v.clone() for k, v in t.ema.shadow.items()}))
        return render(*args, **kwargs)
    monkeypatch.setattr(loop.Trainer, "validate", validate_seen)
    monkeypatch.setattr(loop.previews, "render", render_seen)
    shown = options(data, tmp_path / "shown", validation_prompts=["a green circle"], validate_every=2, **common)
    assert runner.run_with(shown, components(frozen)) == 0
    plain = options(data, tmp_path / "plain", **common)
    assert runner.run_with(plain, components(frozen)) == 0

    assert len(sampled_with) == 2  # after step 2 and at the end
    grid = np.asarray(Image.open(tmp_path / "shown" / "validation" / "step-00000004.png"))
    assert grid.shape == (RES - 16, 2 * RES, 3)  # base | adapter, each at --validation-size WxH
    for weights, shadow in sampled_with:
        assert weights.keys() >= shadow.keys()
        for k, v in shadow.items():
            assert torch.equal(weights[k], v.to(weights[k])), k
    a = load_adapter(tmp_path / "shown" / shown.export_name).state_dict()
    b = load_adapter(tmp_path / "plain" / plain.export_name).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "shown") == losses(tmp_path / "plain")


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True], ids=["on the fly", "feature cache"])
def test_long_captions_are_truncated_with_one_warning_and_a_count(tmp_path: Path, frozen, caplog,
                                                                  cached: bool) -> None:
    """A warning per cut caption would flood a large dataset's log: one at the first, then how many."""
    data = write_folder(tmp_path / "data", make_images(4))
    long = {"img_001": "a red square " * 30, "img_003": "two yellow stripes " * 30}
    for key, caption in long.items():
        (data / f"{key}.txt").write_text(caption)
    extra = dict(cache_dir=str(tmp_path / "cache")) if cached else {}
    run = options(data, tmp_path / "out", max_steps=4, batch_size=2, max_tokens=32, **extra)
    with caplog.at_level(logging.WARNING):
        assert runner.run_with(run, components(frozen)) == 0
    said = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    where = "feature cache" if cached else "training"
    counted = 2 if cached else 4  # (the cache encodes each caption once; on the fly, 4 steps of 2 = two epochs)
    assert said == [f"captions longer than --max-tokens 32 are truncated (the first: {long['img_001'][:60]!r}); how "
                    "many is said when the feature cache or the run is done. Raise --max-tokens to keep them whole",
                    f"{where}: {counted} captions were longer than --max-tokens 32 and were truncated (raise "
                    "--max-tokens to keep them whole)"], said


@pytest.mark.slow
def test_sdpa_backends_pick_the_attention_kernels_and_are_restored(tmp_path: Path, frozen) -> None:
    """--sdpa-backends math: every attention call of the run (U-Net, adapter, LLM) runs torch's math kernel,
    where torch itself picks its CPU flash kernel; the training is the same, and torch's own setting is
    back after the run."""
    from torch.nn.attention import _cur_sdpa_kernel_backends
    from torch.profiler import ProfilerActivity, profile

    data = write_folder(tmp_path / "data", make_images(4))
    before = _cur_sdpa_kernel_backends(with_priority=True)
    kernels: dict[str, tuple[int, int]] = {}
    for name in ("", "math"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run = options(data, tmp_path / (name or "default"), max_steps=2, sdpa_backends=name)
            assert runner.run_with(run, components(frozen)) == 0
        ops = [e.name for e in prof.events()]
        kernels[name] = (ops.count("aten::_scaled_dot_product_flash_attention_for_cpu"),
                         ops.count("aten::_scaled_dot_product_attention_math"))
        assert _cur_sdpa_kernel_backends(with_priority=True) == before
    flash_default, _ = kernels[""]
    flash_math, math_math = kernels["math"]
    assert flash_default > 0 and flash_math == 0 and math_math >= flash_default, kernels
    assert losses(tmp_path / "math") == pytest.approx(losses(tmp_path / "default"), rel=1e-4, abs=1e-6)


def test_a_failing_run_leaves_the_unet_and_torch_as_they_came(tmp_path: Path, frozen) -> None:
    """The run's settings (channels-last U-Net, the process-wide SDPA kernel choice) are undone when the run
    fails after making them, here on a data folder that does not exist: an in-process caller (bench,
    tests) must not go on with a U-Net in another memory format or attention restricted to math."""
    from torch.nn.attention import _cur_sdpa_kernel_backends

    from llmdiff_core.errors import LLMDiffError

    before = _cur_sdpa_kernel_backends(with_priority=True)
    comps = components(frozen)
    run = options(tmp_path / "no such folder", tmp_path / "out", channels_last=True, sdpa_backends="math")
    with pytest.raises((LLMDiffError, OSError, ValueError), match="no such folder"):
        runner.run_with(run, comps)
    assert _cur_sdpa_kernel_backends(with_priority=True) == before
    conv = next(m for m in comps.model_patcher.model.diffusion_model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()


@pytest.mark.slow
@pytest.mark.parametrize("cached, whole", [(True, False), (False, False), (True, True)],
                         ids=["from the cache", "on the fly", "from the cache, compiled over the whole bucket"])
def test_training_steps_decide_the_attended_span_on_the_host_mask(tmp_path: Path, frozen, monkeypatch,
                                                                   cached: bool, whole: bool) -> None:
    """Every training step hands the entry its batch's key mask on the host (TrainingCall.host_mask), where
    RunMask decides the span: on a GPU, reading the device mask would be a host sync in every step. With
    --compile-whole-bucket (the default with --compile-unet) every step attends over the whole token bucket
    (TrainingCall.whole_bucket: one key length, one graph), while a cached batch is still expanded (and
    encoded) only up to its span's end."""
    from llmdiff_core.adapter_runtime import AdapterRuntime

    data = write_folder(tmp_path / "data", make_images(4))
    extra: dict[str, Any] = {"cache_dir": str(tmp_path / "cache")} if cached else {}
    if whole:
        extra.update(compile_unet="aot_eager", compile_whole_bucket=True)
    seen: list[tuple[int, ...] | None] = []
    spans: list[tuple[int, int, int]] = []
    build = AdapterRuntime._build_entry

    def spy(self: Any, batch: Any, device: torch.device, dtype: torch.dtype, training: Any) -> Any:
        host = None if training is None else training.host_mask
        seen.append(None if host is None or host.device.type != "cpu" else tuple(host.shape))
        entry = build(self, batch, device, dtype, training)
        width = batch.materialize().mask.shape[1]
        assert host is None or host.shape[1] <= width
        spans.append((entry.mask.start, entry.mask.stop, width))
        return entry
    monkeypatch.setattr(AdapterRuntime, "_build_entry", spy)
    torch._dynamo.reset()
    try:
        assert runner.run_with(options(data, tmp_path / "out", max_steps=2, caption_dropout=0.5, max_tokens=96,
                                       **extra), components(frozen)) == 0
    finally:
        torch._dynamo.reset()
    assert len(seen) == 2 and all(shape is not None and shape[0] == 2 for shape in seen), seen
    if whole:  # the whole 96-token bucket, every step, from a batch as wide as its captions' span
        assert all(span[:2] == (0, 96) and span[2] <= 33 for span in spans), spans
    else:  # the captions' span (a few words: one 32-token span bucket)
        assert all(stop <= 33 for _, stop, _ in spans), spans


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetcher_keeps_order_builds_side_by_side_and_raises_where_the_batch_is_taken(depth: int) -> None:
    """Batches are selected one at a time in order and built side by side in `depth` threads (a later batch's
    build may finish first): they are taken in order, and a failed selection is raised where its batch is taken."""
    import threading
    import time

    produced = iter(range(1, 9))
    lock = threading.Lock()
    selecting = {"now": 0, "most": 0}
    together = threading.Barrier(depth, timeout=20)  # the first `depth` builds wait here for each other

    def select() -> int:
        with lock:
            selecting["now"] += 1
            selecting["most"] = max(selecting["most"], selecting["now"])
        time.sleep(0.002)
        value = next(produced, None)
        with lock:
            selecting["now"] -= 1
        if value is None:
            raise RuntimeError("stream broken")
        return value

    def build(value: int) -> int:
        if value <= depth:
            together.wait()  # (BrokenBarrierError unless `depth` builds run at once)
        time.sleep(0.03 if value % 2 else 0.0)  # odd batches build slower: the next one finishes first
        return value * 10
    p = prefetch.Prefetcher(select, build, depth)
    in_order = p._prepare

    def late_starts(ticket: int) -> int:  # later batches' threads reach the stream first: each must wait its turn
        time.sleep(0.02 * (-ticket % depth))
        return in_order(ticket)
    p._prepare = late_starts  # type: ignore[method-assign]
    try:
        assert [p.take() for _ in range(8)] == [10 * v for v in range(1, 9)]
        with pytest.raises(RuntimeError, match="stream broken"):
            p.take()
    finally:
        p.close()
    assert selecting["most"] == 1, selecting


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, frozen) -> None:
    data = write_folder(tmp_path / "data", make_images(4))
    opts = options(data, tmp_path / "out", max_steps=6, checkpoint_every=2, debug_nan_at_step=3)
    assert runner.run_with(opts, components(frozen)) == loop.TrainingStopped.exit_code
    ckpts = sorted(p.name for p in (tmp_path / "out" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000002"]
    assert not (tmp_path / "out" / opts.export_name).exists()
    good = load_adapter(tmp_path / "out" / "checkpoints" / "step-00000002" / "adapter.safetensors")
    assert all(torch.isfinite(v).all() for v in good.state_dict().values())


@pytest.mark.slow
def test_corrupt_images_and_missing_captions_are_skipped_and_counted(tmp_path: Path, frozen) -> None:
    data = write_folder(tmp_path / "data", make_images(8))
    (data / "img_002.png").write_bytes(b"\x89PNG broken")
    (data / "img_005.txt").unlink()
    opts = options(data, tmp_path / "out", max_steps=3, batch_size=4)  # 12 samples: one pass and more
    assert runner.run_with(opts, components(frozen)) == 0
    cfg = read_adapter_config(tmp_path / "out" / opts.export_name)
    assert cfg.training["skipped_entries"] >= 2
    assert cfg.training["steps"] == 3


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients(frozen) -> None:
    comps = components(frozen)
    opts = options(Path("."), Path("."))
    adapter = runner.build_adapter(opts, comps, torch.device("cpu"))
    with torch.no_grad():
        adapter.a_new.fill_(0.5)  # the new path contributes, so every site gets gradients
    patched = patch_for_training(comps.model_patcher, adapter)
    module = loop.TrainModule(adapter, patched, adapter.config.llm, "eps", 0.0, adapter.config.context_dim,
                              langevin_noise=True)
    enc = FrozenEncoders(comps.vae, comps.llm, comps.clip, 32, need_clip=True, need_pooled=False)
    cond = enc.encode(["a", "b"], torch.rand(2, RES, RES, 3), ["a red cube", "a blue ball"], [(0, 0, 0, 0)] * 2)

    def grads() -> dict[str, torch.Tensor]:
        adapter.zero_grad()
        from llmdiff_core.training import objective

        draw = objective.draw([1, 2], tuple(cond.latents.shape[1:]), 1000, 0.0)
        module(patched.model.process_latent_in(cond.latents), draw.noise, draw.timesteps, cond.features.hidden,
               cond.features.scores, cond.features.mask, cond.clip, None, draw.encoder_seeds).mean().backward()
        return {k: p.grad.clone() for k, p in adapter.named_parameters() if p.grad is not None}

    plain = grads()
    undo = enable_gradient_checkpointing(patched.model.diffusion_model)
    try:
        ckpt = grads()
    finally:
        undo()
    assert set(plain) == set(ckpt) and "sites.15.to_k.weight" in plain
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize("unet_dtype,mode", [(torch.bfloat16, "clip"), (torch.bfloat16, "llm"), (torch.float32, "clip")])
def test_under_autocast_a_unet_in_the_autocast_dtype_runs_as_when_sampling(frozen, unet_dtype, mode) -> None:
    """bf16 training: the adapter's encoding, c and the sites' K/V run under autocast; a U-Net stored in
    bf16 runs outside it (CUDA autocast would put every norm in fp32, casting around each: §5d of
    docs/benchmarks.md), one kept in fp32 stays under it (the user asked for bf16 compute)."""
    comps = runner.Components(tiny_sd15(unet_dtype), frozen["clip"], frozen["vae"], frozen["llm"], "tiny_sd15",
                              "tiny-llama")
    adapter = runner.build_adapter(options(Path("."), Path("."), original_path=mode), comps, torch.device("cpu"))
    with torch.no_grad():
        adapter.a_new.fill_(0.5)  # the new path contributes: the sites get gradients
    patched = patch_for_training(comps.model_patcher, adapter)
    module = loop.TrainModule(adapter, patched, adapter.config.llm, "eps", 0.0, adapter.config.context_dim,
                              langevin_noise=False)
    enc = FrozenEncoders(comps.vae, comps.llm, comps.clip, 32, need_clip=True, need_pooled=False)
    cond = enc.encode(["a", "b"], torch.rand(2, RES, RES, 3), ["a red cube", "a blue ball"], [(0, 0, 0, 0)] * 2)
    seen: dict[str, set[bool]] = {"unet": set(), "site K/V": set()}
    unet = patched.model.diffusion_model
    inside = [False]  # paper mode projects the original K/V of phi(c) with attn2's own to_k/to_v, outside
    hooks = [unet.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),  # the U-Net's call
             unet.register_forward_hook(lambda *_: inside.__setitem__(0, False))]

    def record(*_: Any) -> None:
        if inside[0]:
            seen["unet"].add(torch.is_autocast_enabled("cpu"))
    hooks += [m.register_forward_pre_hook(record) for m in unet.modules()]
    hooks += [s.to_k.register_forward_pre_hook(lambda *_: seen["site K/V"].add(torch.is_autocast_enabled("cpu")))
              for s in adapter.sites]
    from llmdiff_core.training import objective

    draw = objective.draw([1, 2], tuple(cond.latents.shape[1:]), 1000, 0.0)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(patched.model.process_latent_in(cond.latents), draw.noise, draw.timesteps,
                          cond.features.hidden, cond.features.scores, cond.features.mask, cond.clip, None,
                          draw.encoder_seeds).mean()
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert seen["site K/V"] == {True}
    assert seen["unet"] == {unet_dtype != torch.bfloat16}
    grads = {k: p.grad.clone() for k, p in adapter.named_parameters() if p.grad is not None}
    assert "sites.15.to_q.weight" in grads and "sites.15.to_k.weight" in grads
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())

    if unet_dtype == torch.bfloat16 and mode == "clip":  # a checkpointed block recomputes in the same precision
        adapter.zero_grad()
        undo = enable_gradient_checkpointing(unet)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                module(patched.model.process_latent_in(cond.latents), draw.noise, draw.timesteps, cond.features.hidden,
                       cond.features.scores, cond.features.mask, cond.clip, None, draw.encoder_seeds).mean().backward()
        finally:
            undo()
        for k, g in grads.items():
            torch.testing.assert_close(dict(adapter.named_parameters())[k].grad, g, rtol=0, atol=0, msg=k)


def test_backward_computes_no_weight_gradients_for_the_frozen_unet(tmp_path: Path, frozen, monkeypatch) -> None:
    """Training throughput rests on the U-Net staying frozen: autograd then skips every weight-gradient GEMM
    and convolution, and the backward costs about one forward (activation gradients only) instead of two.
    FLOPs of a real training step (runner.run_with) against its forward; the control unfreezes the U-Net."""
    from torch.utils.flop_counter import FlopCounterMode

    from accelerate import Accelerator

    flops: dict[str, list[int]] = {"forward": [], "backward": []}

    def counted(name: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            with FlopCounterMode(display=False) as counter:
                out = fn(*args, **kwargs)
            flops[name].append(counter.get_total_flops())
            return out
        return run
    monkeypatch.setattr(loop.TrainModule, "forward", counted("forward", loop.TrainModule.forward))
    monkeypatch.setattr(Accelerator, "backward", counted("backward", Accelerator.backward))
    data = write_folder(tmp_path / "data", make_images(2))
    comps = components(frozen)
    assert runner.run_with(options(data, tmp_path / "out", max_steps=1), comps) == 0
    (forward,), (backward,) = flops["forward"], flops["backward"]
    frozen_ratio = backward / forward

    unet = comps.model_patcher.model.diffusion_model  # control: the same step with the U-Net trainable
    flops["forward"].clear()
    flops["backward"].clear()
    model = comps.model_patcher.model
    monkeypatch.setattr(model, "requires_grad_", lambda *a, **k: model)  # keep run_with from freezing it
    for p in unet.parameters():
        p.requires_grad = True
    try:
        assert runner.run_with(options(data, tmp_path / "control", max_steps=1), comps) == 0
    finally:
        for p in unet.parameters():
            p.requires_grad = False
            p.grad = None
    (forward,), (backward,) = flops["forward"], flops["backward"]
    unfrozen_ratio = backward / forward
    assert frozen_ratio < 1.3, frozen_ratio  # activation gradients (plus attention's own backward) only
    assert unfrozen_ratio > frozen_ratio + 0.6, (frozen_ratio, unfrozen_ratio)  # weight gradients: ~1 forward more


@pytest.mark.slow
def test_exported_adapter_loads_through_the_node_and_changes_the_output(tmp_path: Path, frozen, assets,
                                                                       node_classes) -> None:
    import comfy.sample
    import folder_paths

    from llmdiff_core.comfy_llm import load_managed_llm

    data = write_folder(tmp_path / "data", make_images(4))
    opts = options(data, tmp_path / "out", max_steps=8, lr=1e-2, export_name="trained_llmdiff.safetensors")
    assert runner.run_with(opts, components(frozen)) == 0
    folder_paths.add_model_folder_path("llmdiff", str(tmp_path / "out"))

    adapter = node_classes["LLMDiffAdapterLoader"].execute(adapter_name=opts.export_name).result[0]
    assert adapter.config.training["steps"] == 8 and adapter.config.training["trainer"].startswith("ComfyUI-LLMDiff")
    patched = node_classes["LLMDiffApply"].execute(model=tiny_sd15(), adapter=adapter, strength=1.0,
                                                   start_percent=0.0, end_percent=1.0).result[0]
    llm = load_managed_llm(str(assets["llm"]), "tiny-llama", dtype="fp32", device="cpu")
    encode = node_classes["LLMDiffTextEncode"]

    def cond(text: str) -> list:
        return encode.execute(llm=llm, text=text, max_tokens=32, overflow="error", prompt_per_line=False,
                              clip=frozen["clip"]).result[0]
    pos, neg = cond("a red square on blue"), cond("")
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)

    def sample(model) -> torch.Tensor:
        return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", pos, neg, latent, denoise=1.0,
                                   disable_pbar=True, seed=0)
    with_adapter, base = sample(patched), sample(tiny_sd15())
    assert torch.isfinite(with_adapter).all()
    assert (with_adapter - base).abs().max() > 1e-3


def test_training_captions_reach_the_llm_and_clip_as_the_node_gives_them(frozen, assets, node_classes) -> None:
    """A caption typed into Text Encode (LLMDiff) later gives what training saw: ComfyUI's weighting syntax
    reaches CLIP, weighted, in both, and the LLM reads the plain words in both (also validation prompts)."""
    from llmdiff_core.comfy_llm import load_managed_llm
    from llmdiff_core.conditioning import COND_KEY
    from llmdiff_core.encoding import encode as llm_encode

    texts = ["a (red:1.3) square on ((blue)) embedding:style \\(tm\\)", "a plain caption"]
    enc = FrozenEncoders(None, frozen["llm"], frozen["clip"], 32, need_clip=True, need_pooled=False)
    trained, (trained_clip, _) = enc.captions(texts), enc.clip_texts(texts)
    llm = load_managed_llm(str(assets["llm"]), "tiny-llama", dtype="fp32", device="cpu")
    ((node_clip, extras),) = node_classes["LLMDiffTextEncode"].execute(
        llm=llm, text="\n".join(texts), max_tokens=32, overflow="error", prompt_per_line=True,
        clip=frozen["clip"]).result[0]
    node = extras["model_conds"][COND_KEY].cond
    for name in ("hidden", "scores"):
        torch.testing.assert_close(getattr(trained, name), getattr(node, name).float().cpu(), rtol=0, atol=1e-6)
    assert torch.equal(trained.mask, node.mask.cpu())
    torch.testing.assert_close(trained_clip, node_clip.float().cpu(), rtol=0, atol=1e-6)
    words = llm_encode(frozen["llm"], ["a red square on blue (tm)", texts[1]], max_tokens=32)  # what the LLM read
    torch.testing.assert_close(trained.hidden, words.hidden, rtol=0, atol=0)
    assert not torch.allclose(trained_clip[:1], enc.clip_texts(["a red square on blue (tm)"])[0])  # CLIP: weighted


def test_clip_stop_at_layer_encodes_as_the_clip_set_last_layer_node(tmp_path: Path, frozen) -> None:
    """--clip-stop-at-layer -2 ('clip skip 2'): training's CLIP conditioning is what a graph with CLIP Set Last
    Layer -2 gives; the run records it in the export, and leaves the caller's CLIP as it was."""
    import nodes as comfy_nodes

    texts = ["a red cube", "a (blue:1.2) ball"]
    skipped_clip = comfy_nodes.CLIPSetLastLayer().set_last_layer(frozen["clip"], -2)[0]
    node = torch.cat([skipped_clip.encode_from_tokens(skipped_clip.tokenize(t)) for t in texts]).float()
    trained = FrozenEncoders(None, None, runner.last_layer_set(frozen["clip"], -2), 32, need_clip=True,
                             need_pooled=False).clip_texts(texts)[0]
    torch.testing.assert_close(trained, node, rtol=0, atol=0)
    default = FrozenEncoders(None, None, frozen["clip"], 32, need_clip=True, need_pooled=False).clip_texts(texts)[0]
    assert not torch.allclose(default, trained)  # the CLIP given is unchanged, and the layer matters
    assert runner.last_layer_set(frozen["clip"], 0) is frozen["clip"]

    data = write_folder(tmp_path / "data", make_images(2))
    run = options(data, tmp_path / "run", clip_stop_at_layer=-2, max_steps=1)
    assert runner.run_with(run, components(frozen)) == 0
    assert read_adapter_config(tmp_path / "run" / run.export_name).training["clip_stop_at_layer"] == -2
    unchanged = FrozenEncoders(None, None, frozen["clip"], 32, need_clip=True, need_pooled=False).clip_texts(texts)[0]
    torch.testing.assert_close(unchanged, default, rtol=0, atol=0)
    # fine-tuning that adapter keeps its CLIP layer, unless the flag asks for another
    tuned = options(data, tmp_path / "tuned", init_adapter=str(tmp_path / "run" / run.export_name))
    assert runner.adopt_init_adapter(tuned).clip_stop_at_layer == -2
    assert runner.adopt_init_adapter(replace(tuned, clip_stop_at_layer=-1)).clip_stop_at_layer == -1


@pytest.mark.slow
def test_sdxl_paper_mode_trains_with_size_conditioning(tmp_path: Path, frozen) -> None:
    from tiny_unets import tiny_sdxl

    data = write_folder(tmp_path / "data", make_images(2))
    comps = runner.Components(tiny_sdxl(), None, frozen["vae"], frozen["llm"], "tiny_sdxl", "tiny-llama")
    opts = options(data, tmp_path / "out", original_path="llm", max_steps=2, batch_size=2, resolution=32)
    assert runner.run_with(opts, comps) == 0
    trained = load_adapter(tmp_path / "out" / opts.export_name)
    assert trained.config.base == "sdxl" and len(trained.config.sites) == 70 and trained.phi_pool is not None
    fresh = runner.build_adapter(opts, comps, torch.device("cpu"))
    assert not torch.equal(trained.phi_pool.weight, fresh.phi_pool.weight.cpu())  # the pooled path learned


@pytest.mark.slow
def test_sdxl_trains_on_aspect_buckets_with_each_batch_s_size_as_its_target(tmp_path: Path, frozen,
                                                                           monkeypatch) -> None:
    from tiny_unets import tiny_sdxl

    data = write_folder(tmp_path / "data", make_shaped_images([(80, 44), (90, 50), (40, 40), (44, 40)]))
    comps = runner.Components(tiny_sdxl(), None, frozen["vae"], frozen["llm"], "tiny_sdxl", "tiny-llama")
    seen: list[tuple[tuple[int, ...], torch.Tensor]] = []
    forward = loop.TrainModule.forward

    def spy(self: loop.TrainModule, latents: torch.Tensor, *args: Any, y: torch.Tensor, **kwargs: Any) -> Any:
        seen.append((tuple(latents.shape[-2:]), y))
        return forward(self, latents, *args, y=y, **kwargs)
    monkeypatch.setattr(loop.TrainModule, "forward", spy)
    opts = options(data, tmp_path / "out", original_path="llm", max_steps=2, batch_size=2, resolution=64,
                   aspect_buckets=True, bucket_step=16, shuffle=False)
    assert runner.run_with(opts, comps) == 0
    assert [shape for shape, _ in seen] == [(6, 10), (8, 8)]
    # y = [pooled | size embeddings of (original h, w, crop top, left, target h, w)], 256 each: the targets
    target = comps.model_patcher.model.embedder(torch.tensor([48.0, 80.0])).flatten()
    assert torch.equal(seen[0][1][0, -512:], target.to(seen[0][1].dtype))


@pytest.mark.slow
def test_init_adapter_starts_from_the_file_and_keeps_what_it_fixed(tmp_path: Path, frozen, caplog,
                                                                    monkeypatch) -> None:
    from llmdiff_core.adapter_file import save_adapter
    from llmdiff_core.errors import AdapterMismatchError, LLMDiffError
    from tiny_unets import make_adapter, make_adapter_config, tiny_sdxl

    data = write_folder(tmp_path / "data", make_images(2))
    first = options(data, tmp_path / "first", original_path="llm", encoding="layer:-1", max_steps=2)
    assert runner.run_with(first, components(frozen)) == 0
    file = tmp_path / "first" / first.export_name
    start = load_adapter(file).state_dict()

    # At lr 0 the run exports the file it started from, bit for bit. The file's paper mode and encoding win over
    # the flags: quietly over a default (hybrid), with a warning over a flag given (mean).
    still = options(data, tmp_path / "still", init_adapter=str(file), encoding="mean", lr=0.0, max_steps=1,
                    max_tokens=48)
    with caplog.at_level(logging.INFO, logger="llmdiff.train"):
        assert runner.run_with(still, components(frozen)) == 0
    said = {r.getMessage(): r.levelno for r in caplog.records if "--init-adapter" in r.getMessage()}
    assert said == {f"--init-adapter {first.export_name} was trained with --encoding layer:-1: this run keeps "
                    "that (not mean)": logging.WARNING,
                    f"--init-adapter {first.export_name} was trained with --original-path llm: this run keeps "
                    "that (not clip)": logging.INFO}, said
    kept = load_adapter(tmp_path / "still" / still.export_name)
    assert (kept.config.original_path, kept.config.encoding, kept.phi is not None) == ("llm", "layer:-1", True)
    assert kept.config.max_tokens == 48 and kept.config.training["init_adapter"] == first.export_name
    assert kept.state_dict().keys() == start.keys()
    for k, v in kept.state_dict().items():
        assert torch.equal(v, start[k]), k

    # ... and it trains from there: the parameters that take part move
    moved = options(data, tmp_path / "moved", init_adapter=str(file), lr=1e-2, max_steps=2)
    assert runner.run_with(moved, components(frozen)) == 0
    after = load_adapter(tmp_path / "moved" / moved.export_name).state_dict()
    for k in ("a_new", "b_new", "phi.weight", "sites.0.to_k.weight", "sites.15.to_v.weight"):
        assert not torch.equal(after[k], start[k]), k

    # An adapter for another base model, or no file at all, stops the run before it trains
    sdxl_adapter = make_adapter(make_adapter_config(tiny_sdxl(), kept.config.llm))
    sdxl_file = save_adapter(sdxl_adapter, tmp_path / "x.safetensors")
    wrong = options(data, tmp_path / "wrong", init_adapter=str(sdxl_file))
    with pytest.raises(AdapterMismatchError, match="SDXL"):
        runner.run_with(wrong, components(frozen))
    assert not (tmp_path / "wrong" / wrong.export_name).exists()
    with pytest.raises(LLMDiffError, match="not found"):
        runner.adopt_init_adapter(replace(wrong, init_adapter=str(tmp_path / "gone.safetensors")))

    # The script decides from the file, before loading anything, whether it needs the checkpoint's CLIP
    loaded_with = []

    def load(opts: TrainOptions, accelerator: Any) -> None:
        loaded_with.append(opts.original_path)
        raise RuntimeError("stop after loading")
    monkeypatch.setattr(runner, "make_accelerator", lambda opts: None)
    monkeypatch.setattr(runner, "load_components", load)
    with pytest.raises(RuntimeError, match="stop after loading"):
        runner.run(replace(still, output_dir=str(tmp_path / "again")))
    assert loaded_with == ["llm"]
