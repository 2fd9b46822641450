"""The benchmark scripts (bench/, issue 5) still run: each --small variant once, with the fewest repeats.

Not a performance test: it keeps the scripts from rotting while the code they drive changes. Each
runs as a user runs it (a subprocess of this interpreter, LLMDIFF_COMFYUI_ROOT from test.sh), must
print its Markdown table, and must write finite ratios to its JSON.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def bench_module(name: str) -> Any:
    """A module of bench/ (a folder of scripts that import each other by name, not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def run_bench(script: str, *args: str, json_out: Path | None = None, timeout: int = 180) -> str:
    cmd = [sys.executable, str(BENCH / script), *args]
    if json_out is not None:
        cmd += ["--json", str(json_out)]
    env = dict(os.environ, PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def section(data: dict[str, Any], startswith: str) -> list[dict[str, Any]]:
    """The rows of the JSON section whose name starts with `startswith`, as dicts."""
    for s in data["sections"]:
        if s["name"].startswith(startswith):
            return [dict(zip(s["headers"], row)) for row in s["rows"]]
    raise AssertionError(f"no section '{startswith}' in {[s['name'] for s in data['sections']]}")


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_sampling_overhead_small(tmp_path: Path) -> None:
    out = tmp_path / "sampling.json"
    text = run_bench("sampling_overhead.py", "--small", "--models", "sd15", "--modes", "clip,llm", "--steps", "3",
                     "--repeats", "2", "--warmup", "0", "--attend", "bmm", json_out=out)
    assert "| model" in text and "per-step time" in text and "FLOP floor at the real shapes" in text
    data = json.loads(out.read_text())
    rows = {r["adapter"]: r for r in section(data, "per-step time")}
    assert set(rows) == {"hybrid (clip)", "paper (llm)", "hybrid (clip), attend=bmm", "paper (llm), attend=bmm"}
    raw = data["raw"]["sd15"]  # every repeat's values (seconds), for statistics the tables do not give
    assert set(raw) == {"unpatched", "clip", "llm", "clip+bmm", "llm+bmm"}
    assert all(len(metrics["step"]) == 2 for metrics in raw.values())
    variant_of = {"hybrid (clip)": "clip", "paper (llm)": "llm", "hybrid (clip), attend=bmm": "clip+bmm",
                  "paper (llm), attend=bmm": "llm+bmm"}
    for name, r in rows.items():
        mine = raw[variant_of[name]]
        # each repeat's own ratio (the pairs are the same repeat's runs), and their median
        ratios = [a / u for a, u in zip(mine["step"], raw["unpatched"]["step"])]
        assert r["paired overhead %"] == pytest.approx(100 * (statistics.median(ratios) - 1))
        assert r["its interval %"] == f"{100 * (min(ratios) - 1):.2f} .. {100 * (max(ratios) - 1):.2f}"
        assert all(e > 0 for e in mine["entry"])  # every run builds its entry (the default: as a new prompt)
        assert finite(r["unpatched ms/step"]) and r["unpatched ms/step"] > 0
        assert finite(r["adapter ms/step"]) and r["adapter ms/step"] > 0
        assert finite(r["overhead %"]) and (finite(r["FLOP overhead %"]) or "attend=" in name)
        assert finite(r["whole-run overhead %"])
        assert finite(r["of which the entry ms"]) and r["of which the entry ms"] > 0  # (each run builds its own)
    assert 1e3 * statistics.median(raw["clip"]["step"]) == pytest.approx(rows["hybrid (clip)"]["adapter ms/step"])
    hybrid = rows["hybrid (clip)"]
    assert hybrid["FLOP overhead %"] > 0 and finite(hybrid["measured / FLOP"])
    # The real-shape table counts the patched U-Net's own forward; at the 128 attended tokens the
    # hybrid path is exactly the floor (2.8 % of the SD1.5 U-Net without its attention core),
    # fused at the attention core with no second output projection.
    floor = {(r["adapter"], r["prompt (pos + neg tokens)"]): r for r in section(data, "FLOP floor")}
    sd15 = floor[("hybrid (clip)", "128 + 128")]
    assert sd15["sites"] == 16 and sd15["px"] == 512 and sd15["attended span"] == 128
    assert 0.6 < sd15["U-Net w/o attention core"] < 0.75  # TFLOP per sample (issue: 0.677)
    assert 2.5 < sd15["extra % of U-Net w/o attention"] < 3.1
    assert sd15["fused at core/step"] == 16
    short = floor[("hybrid (clip)", "60 + empty")]
    # tokens 0 (the empty negative's BOS) to 60 attended: 61 keys, rounded up to the 32-token bucket
    assert short["attended span"] == 64 and short["extra GFLOP/sample/step"] < sd15["extra GFLOP/sample/step"]
    assert all(r["2nd to_out projections/step"] == 0 for r in floor.values())
    assert all(finite(r["extra % of U-Net"]) and r["extra % of U-Net"] > 0 for r in floor.values())


def test_the_floor_counts_the_one_kernel_site_as_the_bytes_it_moves(tmp_path: Path) -> None:
    """--floor-only --site-kernel torch,fused: on the meta device the one-kernel site (fused_site.py) computes the
    same FLOPs as the three kernels (its FLOP formula) and moves fewer than half their bytes (its op reads n and
    A_orig and writes A once, instead of ~7 full-resolution tensors per site)."""
    out = tmp_path / "floor.json"
    run_bench("sampling_overhead.py", "--floor-only", "--models", "sd15", "--modes", "clip", "--site-kernel",
              "torch,fused", json_out=out)
    data = json.loads(out.read_text())
    floor = {(r["adapter"], r["prompt (pos + neg tokens)"]): r for r in section(data, "FLOP floor")}
    roof = {(r["adapter"], r["prompt (pos + neg tokens)"]): r for r in section(data, "eager roofline")}
    for prompt in ("128 + 128", "60 + empty"):
        three, one = (floor[(name, prompt)] for name in ("hybrid (clip)", "hybrid (clip), site kernel fused"))
        assert one["extra GFLOP/sample/step"] == pytest.approx(three["extra GFLOP/sample/step"], rel=1e-6)
        assert one["fused at core/step"] == three["fused at core/step"] == 16
        assert one["once-per-run GFLOP/sample"] == pytest.approx(three["once-per-run GFLOP/sample"], rel=1e-6)
        three, one = (roof[(name, prompt)] for name in ("hybrid (clip)", "hybrid (clip), site kernel fused"))
        assert 0.3 < one["extra GB"] / three["extra GB"] < 0.55
        assert one["extra % (roofline)"] < 0.55 * three["extra % (roofline)"]


def test_site_calls_small(tmp_path: Path) -> None:
    """bench/site_calls.py on the CPU: the three-kernel site at every SD1.5 site shape, exact against float64."""
    out = tmp_path / "sites.json"
    run_bench("site_calls.py", "--small", "--models", "sd15", "--repeats", "1", "--calls", "1", "--keys", "64,96",
              json_out=out)
    data = json.loads(out.read_text())
    rows = section(data, "µs per site call")
    assert [(r["keys"], r["channels"], r["variant"]) for r in rows] == [
        (keys, channels, "three") for keys in (64, 96) for channels in (320, 640, 1280, 1280)]
    assert all(finite(r["µs/call"]) and r["µs/call"] > 0 and float(r["rel. error vs float64"]) < 1e-5 for r in rows)
    full = [2 * r["tokens"] * r["channels"] * 4 for r in rows]  # one [2, N, C] float32 tensor, bytes
    bandwidth = bench_module("common").H100_BYTES
    assert [r["bytes at 3.35 TB/s µs"] for r in rows] == pytest.approx([7 * b / bandwidth * 1e6 for b in full])
    steps = section(data, "per U-Net call")
    assert [s["keys"] for s in steps] == [64, 96] and all(s["sites"] == 16 and finite(s["ms/step"]) for s in steps)
    assert all(s["GB moved"] == pytest.approx(7 * sum(b * r["sites"] for b, r in zip(full, rows[:4])) / 1e9)
               for s in steps)  # (the bytes do not depend on the span)
    # the second table: a site's to_q and tau_q as two GEMMs or one, alone and with their consumers, every layout
    # giving apart's outputs (float32 on the CPU: the same sums, so equal to rounding)
    queries = section(data, "a site's to_q and tau_q")
    assert [(r["channels"], r["timed"], r["layout"]) for r in queries] == [
        (channels, timed, layout) for channels in (320, 640, 1280, 1280) for timed in ("projections", "core")
        for layout in ("apart", "cat", "bmm")]
    assert all(finite(r["µs/call"]) and float(r["rel. error vs apart"]) < 1e-5 for r in queries)
    per_call = section(data, "query layouts per U-Net call")
    assert [(r["timed"], r["layout"]) for r in per_call] == [
        (timed, layout) for timed in ("projections", "core") for layout in ("apart", "cat", "bmm")]
    assert all(r["ms vs apart"] == 0 for r in per_call if r["layout"] == "apart")


def test_score_encoding_small(tmp_path: Path) -> None:
    out = tmp_path / "encoding.json"
    text = run_bench("score_encoding.py", "--small", "--repeats", "1", "--warmup", "0", json_out=out)
    assert "| LLM" in text
    (row,) = section(json.loads(out.read_text()), "median ms per call")
    assert finite(row["plain forward ms"]) and finite(row["score encode ms"])
    assert finite(row["score / plain"]) and row["score / plain"] > 0


def test_attend_calls_small(tmp_path: Path) -> None:
    out = tmp_path / "attend.json"
    text = run_bench("attend_calls.py", "--small", "--models", "sd15", "--variants", "product,bmm,keychannel,unmasked",
                     "--calls", "1", "--repeats", "1", "--warmup", "0", json_out=out)
    assert "| variant" in text
    rows = section(json.loads(out.read_text()), "µs per call")
    assert {r["variant"] for r in rows} == {"product", "bmm", "keychannel", "unmasked"} and len(rows) == 4 * 4  # 4 shapes
    for r in rows:
        assert finite(r["µs/call"]) and r["µs/call"] > 0
        error = float(r["rel. error vs product"])
        assert error < 1e-5 if r["variant"] != "unmasked" else error > 0.1  # the same math; the bound lets keys in
    steps = {r["variant"]: r for r in section(json.loads(out.read_text()), "per U-Net call")}
    assert steps["product"]["sites"] == 16 and steps["product"]["ms vs product"] == 0


def test_cache_reads_small(tmp_path: Path) -> None:
    out = tmp_path / "reads.json"
    text = run_bench("cache_reads.py", "--small", "--batch", "6", "--layers", "4", "--width", "64",
                     "--read-threads", "1,3", "--repeats", "1", "--warmup", "0", json_out=out)
    assert "| read threads" in text
    one, three = section(json.loads(out.read_text()), "median ms per batch")
    assert one["read threads"] == 1 and three["read threads"] == 3 and one["speed-up vs 1"] == 1
    assert one["MiB read"] == three["MiB read"] > 0 and finite(three["ms"]) and three["ms"] > 0
    depths = section(json.loads(out.read_text()), "ms per batch through the prefetcher")
    assert [r["batches side by side"] for r in depths] == [1, 2, 3] and depths[0]["speed-up vs 1"] == 1
    assert all(finite(r["ms per batch"]) and r["ms per batch"] > 0 for r in depths)


def test_encoder_span_small(tmp_path: Path) -> None:
    out = tmp_path / "span.json"
    text = run_bench("encoder_span.py", "--small", "--batch", "4", "--layers", "3", "--width", "64", "--tokens", "20",
                     "--max-tokens", "80", "--repeats", "1", "--warmup", "0", json_out=out)
    assert "| variant" in text
    bucket, span = section(json.loads(out.read_text()), "expand + encode + backward")
    assert bucket["tokens encoded"] == 80 and span["tokens encoded"] == 33  # 19 attended tokens: one 32-token bucket
    assert 0 < span["MiB saved for backward"] < bucket["MiB saved for backward"] and finite(span["ms"])


def test_run_features_small(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    text = run_bench("run_features.py", "--small", "--layers", "3", "--width", "64", "--prompt-tokens", "20,120",
                     "--repeats", "1", "--warmup", "0", json_out=out)
    assert "| variant" in text
    rows = section(json.loads(out.read_text()), "per run")
    assert [(r["prompt tokens"], r["span end"]) for r in rows] == [(20, 33)] * 3 + [(120, 128)] * 3
    assert [r["variant"] for r in rows[:3]] == ["join, then cut", "cut, join, move", "cut, move, join"]
    assert rows[0]["MiB moved"] == rows[2]["MiB moved"] < rows[3]["MiB moved"] and all(finite(r["ms"]) for r in rows)


def test_training_throughput_small(tmp_path: Path) -> None:
    out = tmp_path / "training.json"
    text = run_bench("training_throughput.py", "--small", "--models", "sd15", "--steps", "1", "--warmup", "1",
                     "--samples", "4", "--keep", str(tmp_path / "work"), "--profile", "1", json_out=out)
    assert "| model" in text
    host = section(json.loads(out.read_text()), "sd15: profile of 1 steps, top ops by self host time")
    assert host and host[0]["host ms/step"] > 0 and any(r["op"].startswith("aten::") for r in host)
    (row,) = section(json.loads(out.read_text()), "per optimizer step")
    assert finite(row["img/s"]) and row["img/s"] > 0
    assert finite(row["MiB to device/step"]) and row["MiB to device/step"] > 0
    assert finite(row["data wait ms"]) and finite(row["host prep ms"])  # the hooks saw the prefetch path
    (prep,) = [n for n in json.loads(out.read_text())["notes"] if n.startswith("sd15: host prep per batch")]
    assert "2 batches prepared side by side" in prep and "issuing the copies" in prep, prep  # (the default depth)
    (floor,) = section(json.loads(out.read_text()), "training FLOPs per image at the real shapes")
    assert floor["model"] == "sd15" and 0.7 < floor["forward TFLOP"] < 1.0  # SD1.5 512 px: ~0.8 + the adapter
    assert 1.0 < floor["backward / forward"] < 1.3  # activation gradients only: the U-Net stays frozen
    assert finite(row["last loss"])
    assert (tmp_path / "work" / "run-sd15" / "metrics.jsonl").exists()  # the real training loop ran


def test_training_profile_counts_the_ops_left_outside_the_compiled_graphs(tmp_path: Path) -> None:
    """Under a compiled U-Net the training profile lists the ops launched outside its graphs, what CUDA graphs
    would leave to the host: none of the U-Net's own (its convolutions run inside the graph)."""
    out = tmp_path / "training.json"
    run_bench("training_throughput.py", "--small", "--models", "sd15", "--steps", "1", "--warmup", "1",
              "--samples", "4", "--keep", str(tmp_path / "work"), "--profile", "1", "--no-floor",
              "--compile", "aot_eager", json_out=out)
    data = json.loads(out.read_text())
    outside = {r["op"]: r["calls/step"] for r in section(data, "sd15: profile of 1 steps, ops launched outside")}
    everything = {r["op"] for r in section(data, "sd15: profile of 1 steps, top ops by self host time")}
    assert outside and not [op for op in outside if "convolution" in op]
    assert [op for op in everything if "convolution" in op]  # (the control: the step does run convolutions)


def test_workflow_memory_cpu(tmp_path: Path) -> None:
    assert "needs a CUDA GPU" in run_bench("workflow_memory.py", "--device", "cpu")
    out = tmp_path / "workflow.json"
    text = run_bench("workflow_memory.py", "--cpu-dry-run", "--scenarios", "offload,comfy@24gib", "--steps", "1",
                     json_out=out)
    assert "| scenario" in text
    offload, keep = section(json.loads(out.read_text()), "peak")
    assert offload["scenario"] == "offload" and offload["LLM resident while sampling"] == "no"
    assert keep["scenario"] == "comfy@24gib" and keep["LLM resident while sampling"] == "yes"  # runs (the card
    # size only applies on CUDA; the parsing itself: test_workflow_scenario_names)


def test_workflow_scenario_names() -> None:
    parse_scenario = bench_module("workflow_memory").parse_scenario
    assert parse_scenario("offload-rerun@20gib") == ("offload-rerun", 20.0)
    assert parse_scenario("24gib") == ("comfy", 24.0) and parse_scenario("offload") == ("offload", None)
    with pytest.raises(SystemExit, match="unknown scenario"):
        parse_scenario("offload@20")


def test_gpu_checks_run_on_cpu(tmp_path: Path) -> None:
    """bench/gpu_checks.py is meant for a GPU session; on the CPU it runs the same code (device == reference)."""
    out = tmp_path / "checks.json"
    run_bench("gpu_checks.py", "--device", "cpu", json_out=out)
    rows = section(json.loads(out.read_text()), "checks")
    assert [r["#"] for r in rows] == list(range(1, 15))
    assert all(r["result"] == "pass" for r in rows), rows


def test_a_crashed_check_says_where_in_this_repository_s_code_not_in_the_copied_comfyui(capsys) -> None:
    """gpu_checks.crashed names the innermost frame and the innermost of ours; the pinned ComfyUI copied into
    .bench/ lies inside the repository but is not ours (session 28's review)."""
    checks = bench_module("gpu_checks")
    repo = checks.REPO

    def frame_in(path: Path, body: str, env: dict) -> None:
        exec(compile(body, str(path), "exec"), env)

    def raise_there() -> None:
        env: dict = {}
        frame_in(repo / ".bench" / "ComfyUI" / "comfy" / "ops.py", "def comfy_op():\n    raise ValueError('bad')\n", env)
        frame_in(repo / "llmdiff_core" / "ours.py", "def our_call(f):\n    f()\n", env)
        env["our_call"](env["comfy_op"])

    try:
        raise_there()
    except ValueError as e:
        detail = checks.crashed(e)
    assert detail == "ValueError: bad (at ops.py:2 (comfy_op), from ours.py:2 (our_call))", detail
    assert "Traceback" in capsys.readouterr().err  # the whole traceback goes to the log


def test_peak_memory_contexts_nest(monkeypatch) -> None:
    """bench/common.PeakMemory around other PeakMemory contexts still sees their peaks (torch has one peak
    counter per device, which every context resets). A fake CUDA counter stands in for the GPU."""
    import types

    import torch

    common = bench_module("common")

    state = {"allocated": 0, "peak": 0}

    def allocate(n: int) -> None:
        state["allocated"] += n
        state["peak"] = max(state["peak"], state["allocated"])

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: state.update(peak=state["allocated"]))
    gpu = types.SimpleNamespace(type="cuda")
    gib = common.GIB
    with common.PeakMemory(gpu) as whole:
        with common.PeakMemory(gpu) as encode:
            allocate(16 * gib)  # the LLM
            allocate(-16 * gib)  # offloaded
        with common.PeakMemory(gpu) as sample:
            allocate(7 * gib)
            allocate(-7 * gib)
    assert (encode.peak_gib, sample.peak_gib, whole.peak_gib) == (16, 7, 16)


def test_profile_sampling_small() -> None:
    text = run_bench("profile_sampling.py", "--small", "--steps", "2")
    assert "llmdiff_core functions per step" in text and "aten ops per step" in text
    assert "new path: tau_q + masked attention" in text and "fusion at the attention core" in text


@pytest.mark.parametrize("script", ["sampling_overhead.py", "score_encoding.py", "training_throughput.py",
                                    "workflow_memory.py", "profile_sampling.py", "gpu_checks.py", "encoder_span.py",
                                    "run_features.py"])
def test_help(script: str) -> None:
    assert "--comfyui-root" in run_bench(script, "--help", timeout=60)


def test_device_gaps_charge_idle_time_to_the_phase_that_launched_late() -> None:
    """bench/device_gaps.py on a made-up step (times in ms): which phase each idle gap is charged to, whether
    it waited for the host, and busy + idle = the step."""
    dg = bench_module("device_gaps")

    ms = 1_000_000
    windows = [dg.Window(dg.STEP_PHASE, 0, 100 * ms), dg.Window("forward", 0, 50 * ms),
               dg.Window("backward", 50 * ms, 90 * ms)]
    acts = [dg.DeviceActivity(5 * ms, 20 * ms, 2 * ms),  # the step begins idle until forward launches
            dg.DeviceActivity(30 * ms, 40 * ms, 25 * ms),  # launched after the device ran dry: host-bound
            dg.DeviceActivity(45 * ms, 60 * ms, 35 * ms),  # launched in time, started late: another wait
            dg.DeviceActivity(58 * ms, 70 * ms, 55 * ms),  # overlaps the previous one: no gap
            dg.DeviceActivity(80 * ms, 85 * ms, 75 * ms),  # backward launched late
            dg.DeviceActivity(86 * ms, 88 * ms, None),  # the profiler did not link it
            dg.DeviceActivity(150 * ms, 160 * ms, 120 * ms)]  # after the step: not counted
    rows, totals = dg.attribute(windows, acts)
    by = {r.phase: r for r in rows}
    assert by["forward"].idle_host_bound_ms == pytest.approx(15) and by["forward"].idle_other_ms == pytest.approx(5)
    assert by["backward"].idle_host_bound_ms == pytest.approx(10) and by["backward"].idle_other_ms == 0
    assert by[dg.UNLINKED].idle_other_ms == pytest.approx(1)
    assert by[dg.END_OF_STEP].idle_host_bound_ms == pytest.approx(12)
    assert by["forward"].launched_busy_ms == pytest.approx(15 + 10 + 15)
    assert by["forward"].host_ms == 50 and by["backward"].host_ms == 40 and by[dg.OTHER].host_ms == 10
    assert totals["busy_ms"] == pytest.approx(15 + 10 + 15 + 10 + 5 + 2)
    assert totals["busy_ms"] + totals["idle_ms"] == pytest.approx(totals["wall_ms"]) == 100
    assert rows[0].phase == "forward"  # the most idle time first


def test_device_gaps_follow_a_step_into_the_next_steps_host_window() -> None:
    """The trainer queues step 2 while the device still runs step 1: step 1 is analysed up to step 2's start,
    the last step up to the end of the device work it launched."""
    dg = bench_module("device_gaps")

    ms = 1_000_000
    windows = [dg.Window(dg.STEP_PHASE, 0, 40 * ms), dg.Window(dg.STEP_PHASE, 60 * ms, 70 * ms),
               dg.Window("forward", 0, 30 * ms), dg.Window("forward", 60 * ms, 65 * ms)]
    acts = [dg.DeviceActivity(1 * ms, 55 * ms, ms // 2),  # step 1's work runs past its host window
            dg.DeviceActivity(62 * ms, 90 * ms, 61 * ms)]  # step 2's, past the profiled windows
    rows, totals = dg.attribute(windows, acts)
    by = {r.phase: r for r in rows}
    assert totals["wall_ms"] == pytest.approx(90)  # 0..60, then 60..90
    assert totals["busy_ms"] == pytest.approx(54 + 28)
    assert by["forward"].idle_host_bound_ms == pytest.approx(1 + 2)  # 0..1 and 60..62 (launched at 0.5, 61)
    assert by[dg.END_OF_STEP].idle_host_bound_ms == pytest.approx(5)  # 55..60: the host between the steps
    assert by[dg.OTHER].host_ms == pytest.approx(90 - 35)


def test_device_gaps_leave_the_device_copies_of_annotations_out() -> None:
    """A record_function range (each phase, the step itself) shows up on the device timeline too, as a
    gpu_user_annotation spanning the kernels launched in it and the gaps between them. Counted as device
    work it made every step look busy (sessions 7 and 10: 'device idle 3 of 346 ms' on a step whose kernels
    took 213 ms). Made-up kineto events (ms): two kernels of 10 in a 100 ms step, idle 80."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    dg = bench_module("device_gaps")
    ms = 1_000_000

    def event(name: str, device: Any, start: int, end: int, corr: int = 0, kind: str = "cpu_op") -> Any:
        return SimpleNamespace(name=lambda: name, device_type=lambda: device, start_ns=lambda: start * ms,
                               end_ns=lambda: end * ms, correlation_id=lambda: corr, linked_correlation_id=lambda: 0,
                               is_user_annotation=lambda: "annotation" in kind)
    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [event(dg.PHASE_PREFIX + dg.STEP_PHASE, cpu, 0, 100, kind="user_annotation"),
              event(dg.PHASE_PREFIX + "forward", cpu, 0, 50, kind="user_annotation"),
              event("cudaLaunchKernel", cpu, 10, 11, corr=1, kind="cuda_runtime"),
              event("cudaLaunchKernel", cpu, 60, 61, corr=2, kind="cuda_runtime"),
              event("gemm", gpu, 20, 30, corr=1, kind="kernel"),
              event("gemm", gpu, 70, 80, corr=2, kind="kernel"),
              event(dg.PHASE_PREFIX + dg.STEP_PHASE, gpu, 20, 80, kind="gpu_user_annotation"),
              event(dg.PHASE_PREFIX + "forward", gpu, 20, 30, kind="gpu_user_annotation")]
    prof = SimpleNamespace(profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events)))
    windows, acts, linked = dg.from_profiler(prof)
    assert [(a.start // ms, a.end // ms, a.launch // ms) for a in acts] == [(20, 30, 10), (70, 80, 60)]
    assert linked == {"by runtime call": 2, "by host op": 0, "not linked": 0, "annotations left out": 2}
    rows, totals = dg.attribute(windows, acts)
    assert (totals["wall_ms"], totals["busy_ms"], totals["idle_ms"]) == pytest.approx((100, 20, 80))


def test_byte_counter_counts_what_each_op_reads_and_writes() -> None:
    """bench/traffic.py on meta tensors: an op moves its inputs and outputs once, an in-place op reads and
    writes its tensor, views and allocations move nothing, a broadcast dimension is read once; attention
    under fused_sdpa is the efficient kernel (inputs, output, logsumexp), not the full score matrix."""
    traffic = bench_module("traffic")
    import torch
    import torch.nn.functional as F

    a = torch.empty(1000, device="meta")  # 4000 bytes
    with traffic.ByteCounter() as bc:
        b = a * 2  # read a, write b
    assert bc.total == 8000 and set(bc.by_op) == {"mul"}
    with traffic.ByteCounter() as bc:
        a.add_(1.0)  # read and write a
        a.view(10, 100).t()  # views: nothing
        torch.empty(5000, device="meta")
    assert bc.total == 8000
    with traffic.ByteCounter() as bc:
        b.expand(10, 1000) + torch.empty(10, 1000, device="meta")  # 4000 + 40000 read, 40000 written
    assert bc.total == 84000
    with traffic.ByteCounter() as bc:  # the per-kernel roofline: each call as slow as its math or its memory
        a * 2  # 0 FLOPs, 8000 bytes: memory-bound
        torch.empty(64, 32, device="meta") @ torch.empty(32, 16, device="meta")  # 65536 FLOPs, 14336 bytes
    assert bc.kernel_bound(1e6, 1e6) == pytest.approx((8000e-6 + 65536e-6, 8000e-6))
    q = torch.empty(2, 4, 64, 8, device="meta", dtype=torch.float16, requires_grad=True)
    k, v = (torch.empty(2, 4, 16, 8, device="meta", dtype=torch.float16, requires_grad=True) for _ in range(2))
    bias = torch.zeros(2, 1, 1, 16, device="meta", dtype=torch.float16)
    with traffic.fused_sdpa(), traffic.ByteCounter() as bc:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert out.shape == q.shape and out.requires_grad
    assert set(bc.by_op) == {"_scaled_dot_product_efficient_attention"}
    # q 8192 + k, v 2048 each + the bias broadcast over heads and queries 64 + out 8192 + logsumexp (fp32) 2048
    # + the two philox scalars 16; the [2, 4, 64, 16] score matrix (16384 bytes) is never written
    assert bc.total == 8192 + 2 * 2048 + 64 + 8192 + 2048 + 16
    with traffic.fused_sdpa(), traffic.ByteCounter() as bc:
        out.sum().backward()
    assert "_scaled_dot_product_efficient_attention_backward" in bc.by_op and "bmm" not in bc.by_op
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored


def test_compile_clock_reports_the_phases_of_compiles_since_it_started() -> None:
    """The compiled benches' note on where a compile's time went: torch's own timers, counted from when the
    clock started (a clock started after the compile sees nothing of it)."""
    import torch

    common = bench_module("common")
    torch._dynamo.reset()
    before = common.CompileClock()
    compiled = torch.compile(lambda x: (x.sin() * 2).sum(), backend="aot_eager")
    x = torch.randn(8, requires_grad=True)
    compiled(x).backward()
    after = common.CompileClock()
    compiled(x).backward()  # the same shapes: no compile
    phases = before.phases()
    torch._dynamo.reset()
    assert phases.startswith("dynamo, forward compile included "), phases  # (the tiny graph's other phases < 0.05 s)
    assert after.phases() == "", after.phases()


def test_interleaved_alternates_the_order_and_reports_each_round(capsys: pytest.CaptureFixture[str]) -> None:
    """The A/B loop behind the benches: warm-up rounds untimed, then A B / B A ..., after_warmup between them,
    and with progress a stderr line per round (what a device run cut off by its time limit still leaves)."""
    common = bench_module("common")
    calls: list[str] = []

    def variant(name: str) -> Any:
        def measure() -> dict[str, float]:
            calls.append(name)
            return {"step": float(len(calls))}
        return measure
    out = common.interleaved({"a": variant("a"), "b": variant("b")}, repeats=3, warmup=2, progress=True,
                             after_warmup=lambda: calls.append("|"))
    assert calls == ["a", "b", "a", "b", "|", "a", "b", "b", "a", "a", "b"]
    assert out == {"a": {"step": [6.0, 9.0, 10.0]}, "b": {"step": [7.0, 8.0, 11.0]}}
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["warm-up 1/2", "warm-up 2/2", "repeat 1/3",
                                                              "repeat 2/3", "repeat 3/3"]
    assert lines[3].startswith("  repeat 2/3: b ") and ", a " in lines[3]  # the round's own order
    common.interleaved({"a": variant("a")}, repeats=1, warmup=0)
    assert capsys.readouterr().err == ""  # quiet unless asked


def test_median_interval_is_the_order_statistics_interval_of_the_binomial() -> None:
    common = bench_module("common")
    for n in range(1, 31):
        low, high, coverage = common.median_interval([float(i) for i in range(n)])
        j = int(low)
        assert high == n - 1 - j  # symmetric ranks
        # brute force: s[j] lies above the median when at most j of n fair coins come up "below"
        def p_at_most(k: int) -> float:
            return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
        assert coverage == pytest.approx(1 - 2 * p_at_most(j))
        if j > 0 or n >= 6:  # (below 6 values not even min..max reaches 95 %)
            assert coverage >= 0.95
        if j + 1 <= (n - 1) // 2:  # the next pair inward would fall short: the interval is the narrowest
            assert 1 - 2 * p_at_most(j + 1) < 0.95
    assert common.median_interval([3.0, 1.0, 2.0])[:2] == (1.0, 3.0)  # (sorted first)
    # the textbook ranks (1-based): n = 9 -> 2nd and 8th, n = 15 -> 4th and 12th
    assert common.median_interval(list(map(float, range(9))))[:2] == (1.0, 7.0)
    assert common.median_interval(list(map(float, range(15))))[:2] == (3.0, 11.0)


def test_paired_ratios_cancel_the_drift_both_variants_share() -> None:
    common = bench_module("common")
    drift = [1.0, 1.3, 0.8, 1.6, 1.1, 0.9]  # e.g. the clock changing between repeats
    base = [10.0 * d for d in drift]
    adapter = [10.5 * d for d in drift]
    assert common.spread(base) > 0.1  # the series alone: a noise far above the 5 % difference
    assert common.paired_ratios(adapter, base) == pytest.approx([1.05] * len(drift))
    with pytest.raises(ValueError, match="same repeats"):
        common.paired_ratios(adapter, base[:-1])


def test_interleaved_stops_repeating_before_the_steps_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    common = bench_module("common")
    variants = {"a": lambda: 1.0, "b": lambda: 2.0}
    monkeypatch.delenv(common.DEADLINE_ENV, raising=False)
    assert common.repeats_done(common.interleaved(variants, 7, 0)) == 7
    monkeypatch.setenv(common.DEADLINE_ENV, str(time.time() + 3600))  # far: every repeat
    assert common.repeats_done(common.interleaved(variants, 7, 0)) == 7
    monkeypatch.setenv(common.DEADLINE_ENV, str(time.time() - 1))  # passed: the fewest that still give a median
    out = common.interleaved(variants, 7, 1)
    assert common.repeats_done(out) == common.MIN_REPEATS == len(out["a"]["time"]) == len(out["b"]["time"])
    assert common.repeats_done(common.interleaved(variants, 2, 0)) == 2  # (never fewer than asked below the minimum)


def test_graphs_compiled_counts_dynamo_compiles() -> None:
    """The compiled sampling bench's note 'graphs compiled in the timed repeats' (a recompile while timing is
    an outlier repeat): dynamo's own counter, one more per new graph, none for a call that hits the cache."""
    import torch

    common = bench_module("common")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x.cos() + 1, backend="eager")
    before = common.graphs_compiled()
    compiled(torch.randn(4))
    first = common.graphs_compiled()
    compiled(torch.randn(4))
    again = common.graphs_compiled()
    torch._dynamo.reset()
    assert (first - before, again - first) == (1, 0)


def test_cuda_graph_note_counts_graphs_left_without_cuda_graphs() -> None:
    """The compiled benches' note on whether CUDA graphs ran: torch's skip counter, one more for a graph the
    cudagraphs backend leaves uncaptured (on the CPU every graph is: its tensors are CPU tensors)."""
    import re

    import torch

    common = bench_module("common")

    def skips() -> int:
        return int(re.search(r"run without CUDA graphs: (\d+)", common.cuda_graph_note()).group(1))
    assert [common.uses_cuda_graphs(*c) for c in (("cudagraphs", None), ("inductor", "reduce-overhead"),
                                                   ("inductor", None), ("inductor", "max-autotune-no-cudagraphs"))] \
        == [True, True, False, False]
    torch._dynamo.reset()
    before = skips()
    compiled = torch.compile(lambda x: x.cos() + 1, backend="cudagraphs")
    out = compiled(torch.randn(4))
    skipped = skips()
    torch._dynamo.reset()
    assert torch.isfinite(out).all() and skipped - before == 1


def test_host_only_backend_runs_a_graph_once_and_then_returns_its_first_outputs() -> None:
    """--compile host-only: after its first call a compiled function launches nothing, so a sampling step
    under it is its host work alone. A later call with other values gets the first call's result back
    (and the guards, which stay, still send a new shape to a new graph)."""
    import torch

    common = bench_module("common")
    torch._dynamo.reset()
    ran: list[int] = []

    def traced(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1
    compiled = torch.compile(traced, backend=common.host_only_backend())
    with torch.inference_mode():
        first = compiled(torch.ones(3))
        with torch.profiler.profile() as prof:
            again = compiled(torch.full((3,), 5.0))
        ran += [e.count for e in prof.key_averages() if e.key in ("aten::mul", "aten::add")]
        other_shape = compiled(torch.ones(4))
    torch._dynamo.reset()
    assert torch.equal(first, torch.full((3,), 3.0)) and torch.equal(again, first)
    assert ran == []  # no kernel of the graph ran on the second call
    assert torch.equal(other_shape, torch.full((4,), 3.0))


def fake_cuda_event(clock_ms: list[float]) -> type:
    """A stand-in for torch.cuda.Event (no GPU here): record() notes clock_ms[0], the device's time in ms."""
    class Event:
        def record(self) -> None:
            self.at = clock_ms[0]

        def elapsed_time(self, end: "Event") -> float:
            return end.at - self.at
    return Event


def test_replay_clock_times_each_replay_and_only_while_installed() -> None:
    """The CUDA-graph split of sampling_overhead: a pair of events around each run_graph of inductor's graph
    nodes, taken per run. Fakes stand in for CUDAGraphNode and torch.cuda.Event (no GPU here)."""
    common = bench_module("common")
    clock_ms = [0.0]
    Event = fake_cuda_event(clock_ms)

    class Node:
        def __init__(self, ms: float) -> None:
            self.ms = ms

        def run_graph(self) -> None:
            clock_ms[0] += self.ms

    original = Node.run_graph
    capturing = [False]
    clock = common.ReplayClock(node_class=Node, event=Event, capturing=lambda: capturing[0]).install()
    Node(2.0).run_graph()
    clock_ms[0] += 10.0  # outside any replay: not counted
    Node(0.5).run_graph()
    capturing[0] = True
    Node(4.0).run_graph()  # inside a capture: runs, untimed
    capturing[0] = False
    assert clock.take("cpu") == [2.0, 0.5] and clock.take("cpu") == [] and clock_ms[0] == 16.5
    clock.uninstall()
    Node(1.0).run_graph()
    assert Node.run_graph is original and clock.take("cpu") == []


def test_sampling_overhead_times_each_variant_with_both_step_clocks(tmp_path: Path) -> None:
    """--step-clock both (the CUDA default): every variant is timed pipelined and synced in the same rounds, and
    each clock's rows compare with that clock's unpatched runs (on this CPU the two clocks are one)."""
    out = tmp_path / "clocks.json"
    text = run_bench("sampling_overhead.py", "--small", "--models", "sd15", "--modes", "clip", "--steps", "3",
                     "--repeats", "2", "--warmup", "0", "--no-real-flops", "--step-clock", "both", json_out=out)
    assert "steps pipelined: stamped by CUDA events" in text and "both rows read one clock" in text
    data = json.loads(out.read_text())
    raw = data["raw"]["sd15"]
    assert set(raw) == {"unpatched", "clip", "unpatched@synced", "clip@synced"}
    rows = {r["adapter"]: r for r in section(data, "per-step time")}
    assert set(rows) == {"hybrid (clip), steps pipelined", "hybrid (clip), steps synced"}
    for name, suffix in (("hybrid (clip), steps pipelined", ""), ("hybrid (clip), steps synced", "@synced")):
        mine, base = raw["clip" + suffix], raw["unpatched" + suffix]
        ratios = [a / u for a, u in zip(mine["step"], base["step"])]
        assert rows[name]["paired overhead %"] == pytest.approx(100 * (statistics.median(ratios) - 1))
        assert rows[name]["unpatched ms/step"] == pytest.approx(1e3 * statistics.median(base["step"]))


def test_step_stamps_read_the_device_clock_after_the_run_when_pipelined(monkeypatch: pytest.MonkeyPatch) -> None:
    """sampling_overhead's step clock. Pipelined: an event per stamp, read only after the run (one sync, then the
    device's times); synced: a sync and the host clock at every stamp. A fake event stands in for
    torch.cuda.Event (no GPU here); on a CPU device without one, pipelined is the synced clock."""
    common = bench_module("common")
    device_ms, host_s, syncs = [0.0], [100.0], [0]
    Event = fake_cuda_event(device_ms)
    monkeypatch.setattr(common, "sync", lambda device: syncs.__setitem__(0, syncs[0] + 1))
    monkeypatch.setattr(common, "now", lambda: host_s[0])
    pipelined = common.StepStamps("cpu", synced=False, event=Event)
    pipelined.start()
    for ms in (5.0, 2.0, 3.0):
        device_ms[0] += ms
        host_s[0] += 1.0  # the host's clock is not what a pipelined stamp reads
        pipelined.stamp()
    assert syncs[0] == 0
    assert pipelined.seconds() == [0.005, 0.007, 0.010] and syncs[0] == 1

    synced = common.StepStamps("cpu", synced=True, event=Event)
    synced.start()
    host_s[0] += 0.5
    synced.stamp()
    assert synced.seconds() == [0.5] and syncs[0] == 3  # (start and stamp each synchronised)
    assert not common.StepStamps("cpu", synced=False).pipelined  # a CPU device: one clock


def test_sampling_overhead_host_only_small(tmp_path: Path) -> None:
    """The step's host work alone (no U-Net kernel runs), patched against unpatched, with the table's note."""
    out = tmp_path / "host.json"
    text = run_bench("sampling_overhead.py", "--small", "--models", "sd15", "--modes", "clip", "--steps", "4",
                     "--repeats", "2", "--warmup", "1", "--compile", "host-only", "--no-real-flops", json_out=out)
    assert "compile host-only: every U-Net call returns its graph's first outputs" in text
    assert "graphs compiled in the warm-up 2, in the timed repeats 0" in text
    (row,) = section(json.loads(out.read_text()), "per-step time")
    assert row["adapter"] == "hybrid (clip)" and finite(row["overhead %"])
    assert 0 < row["unpatched ms/step"] and 0 < row["adapter ms/step"]


def test_sampling_overhead_cut_by_its_step_timeout_writes_what_finished(tmp_path: Path) -> None:
    """A SIGINT while the second model is measured (device_run.sh's `timeout` for a step; raised here where that
    model's repeats start) ends the run with status 130 and the first model's tables written, its cut named."""
    out = tmp_path / "cut.json"
    script = (f"import runpy, sys; sys.path.insert(0, {str(BENCH)!r}); import common\n"
              "real, calls = common.interleaved, []\n"
              "def interleaved(*args, **kwargs):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 2:\n"
              "        raise KeyboardInterrupt\n"
              "    return real(*args, **kwargs)\n"
              "common.interleaved = interleaved\n"
              f"sys.argv = ['sampling_overhead.py', '--small', '--models', 'sd15,sdxl', '--modes', 'clip', "
              f"'--steps', '2', '--repeats', '2', '--warmup', '0', '--json', {str(out)!r}]\n"
              f"runpy.run_path({str(BENCH / 'sampling_overhead.py')!r}, run_name='__main__')\n")
    env = dict(os.environ, PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 130, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["model"] for r in section(data, "per-step time")] == ["sd15"]
    assert any(n.startswith("interrupted (SIGINT: the step's time ran out) while measuring sdxl") for n in data["notes"])
    assert not any(s["name"].startswith("FLOP floor") for s in data["sections"])  # (no time left for it)


def test_the_kernel_table_counts_device_work_not_annotations(capsys: pytest.CaptureFixture[str]) -> None:
    """profile_sampling's CUDA table (what a compiled step's adapter costs on the device): kernels are the
    device rows that are no annotation's device-side range (device_gaps.is_device_work, also the training
    profile's busy time); per step and per site, patched minus unpatched."""
    from collections import Counter
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    ps, dg = bench_module("profile_sampling"), bench_module("device_gaps")

    def avg(key: str, device: Any, annotation: bool = False) -> Any:
        return SimpleNamespace(key=key, device_type=device, is_user_annotation=annotation)
    assert dg.is_device_work(avg("triton_poi_fused_addcmul_0", DeviceType.CUDA))
    assert not dg.is_device_work(avg("Torch-Compiled Region", DeviceType.CUDA, annotation=True))
    assert not dg.is_device_work(avg("aten::mm", DeviceType.CPU))  # (its self device time is its kernels')
    steps, sites = 2, 4
    unpatched = Counter({"gemm": 20, "attention": 8}), Counter({"gemm": 2000, "attention": 800})
    patched = Counter({"gemm": 28, "attention": 16, "triton_fused": 2}), Counter({"gemm": 2400, "attention": 1600,
                                                                                  "triton_fused": 40})
    ps.kernel_table(*unpatched, *patched, steps, sites, top=10)
    out = capsys.readouterr().out
    assert "kernels per step: unpatched 14, patched 23 (2.2 more per site)" in out
    assert "unpatched 1.400 ms, patched 2.020 ms (44.3 %, 155.0 µs per site)" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "kernel" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["attention", "gemm", "triton_fused"]  # by extra time


def test_kernel_families_compare_two_graphs_triton_kernels() -> None:
    """Inductor numbers each graph's Triton kernels, so the patched and unpatched graphs' kernels of the same fused
    ops only line up in profile_sampling's kernel table without the number; library kernels keep their names."""
    ps = bench_module("profile_sampling")
    assert ps.kernel_family("triton_poi_fused_addcmul_select_transpose_view_9") == \
        ps.kernel_family("triton_poi_fused_addcmul_select_transpose_view_31") == \
        "triton_poi_fused_addcmul_select_transpose_view"
    assert ps.kernel_family("triton_red_fused_native_group_norm_0") != ps.kernel_family("triton_poi_fused_silu_0")
    gemm = "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas"
    assert ps.kernel_family(gemm) == gemm[:90]
