"""The script as users run it: `python llmdiff_core/train.py` with ComfyUI's real checkpoint loader
(a tiny single-file SD1.5 checkpoint, paper mode), validation images, SIGTERM, and two processes
(torchrun and accelerate launch, gloo on CPU) against one process with the same global batch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import yaml

from llmdiff_core.adapter_file import read_adapter_config
from llmdiff_core.training.options import parse_options
from train_support import REPO, cli_args, run_script, shared_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return shared_assets(str(tmp_path_factory.getbasetemp() / "train_assets"))


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_help_and_bad_flags() -> None:
    proc = run_script(["--help"], timeout=120)
    _ok(proc)
    assert "--base-model" in proc.stdout and "--resume" in proc.stdout and "(default: 0.0001)" in proc.stdout
    proc = run_script(["--llm", "x", "--data", "y"], timeout=120)
    assert proc.returncode == 2 and "--base-model" in proc.stderr


def test_example_config_parses() -> None:
    cfg = REPO / "configs" / "train_example.yaml"
    opts = parse_options(["--config", str(cfg)])
    assert yaml.safe_load(cfg.read_text())["base_model"] == opts.base_model
    assert opts.validation_prompts


@pytest.mark.slow
def test_script_trains_validates_and_exports(tmp_path: Path, assets) -> None:
    out = tmp_path / "run"
    proc = run_script(cli_args(assets, out, data="tar", **{
        "validation-prompts": "a green circle", "validation-steps": 2, "validate-every": 2,
        "cache-dir": tmp_path / "cache", "num-workers": 1}))
    _ok(proc)
    export = out / "llmdiff_adapter.safetensors"
    cfg = read_adapter_config(export)
    assert cfg.original_path == "llm" and cfg.base == "sd15" and len(cfg.sites) == 4
    assert cfg.training["steps"] == 4 and cfg.training["feature_cache"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert any("gates/w_new/03" in r for r in rows)
    grids = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert grids == ["step-00000002.png", "step-00000004.png"]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    try:  # TensorBoard is optional (not in the pinned test environment); when present it must log
        import tensorboard  # noqa: F401
    except ImportError:
        assert "TensorBoard logging is off" in proc.stderr
    else:
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def _wait_for_logged_steps(proc: subprocess.Popen, out: Path, steps: int, timeout_s: float) -> None:
    """Polls until the running training has logged `steps` steps (a deadline for the poll, not a timing
    check); fails with the process's output if it exits first."""
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < steps):
        assert proc.poll() is None, proc.stdout.read()[-4000:] if proc.stdout else ""
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path: Path, assets) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "llmdiff_core" / "train.py")] + [
        str(a) for a in cli_args(assets, out, **{"max-steps": 100000, "checkpoint-every": 0})]
    import os
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_logged_steps(proc, out, 2, timeout_s=240)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-4000:]
    assert "stopped by SIGTERM" in output
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "state.pt").exists()
    step = int(ckpts[0].name.split("-")[1])
    assert step >= 2
    # and the run continues from there
    proc2 = run_script(cli_args(assets, out, **{"max-steps": step + 1, "resume": "latest", "checkpoint-every": 0}))
    _ok(proc2)
    assert read_adapter_config(out / "llmdiff_adapter.safetensors").training["steps"] == step + 1


def _launchers() -> dict[str, list[str]]:
    return {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        # --multi_gpu without --cpu: `--cpu --num_processes 2` silently starts one process
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
    }


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return sorted(kids)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path: Path, assets) -> None:
    """One worker gets the signal; the processes agree on it through the step records (a step later, with
    no host sync per step) and write one checkpoint together, then exit cleanly (no hang in its gather)."""
    import os

    out = tmp_path / "run"
    cmd = _launchers()["torchrun"] + [str(REPO / "llmdiff_core" / "train.py")] + [
        str(a) for a in cli_args(assets, out, **{**DDP_FLAGS, "max-steps": 100000, "checkpoint-every": 0,
                                                 "batch-size": 1})]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_logged_steps(proc, out, 2, timeout_s=300)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGTERM)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # (a hang: the launcher and its workers)
            for pid in [*_children(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    assert "checkpoint written, continue with --resume latest" in output
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "state.pt").exists()
    assert not (out / "llmdiff_adapter.safetensors").exists()


# Adam divides by sqrt(v) + eps: with the default eps 1e-8 a parameter whose gradient is ~1e-9 moves by
# +-lr whichever way float summation order tips it. A larger eps keeps the comparison about the math.
DDP_FLAGS = {"max-steps": 3, "adam-eps": 1e-4}


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, assets) -> Path:
    out = tmp_path_factory.mktemp("one_process")
    _ok(run_script(cli_args(assets, out, **DDP_FLAGS, **{"batch-size": 2})))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_match_one(tmp_path: Path, assets, single_process_run: Path, launcher: str) -> None:
    out = tmp_path / "two"
    _ok(run_script(cli_args(assets, out, **DDP_FLAGS, **{"batch-size": 1}), launcher=_launchers()[launcher]))
    two = read_adapter_config(out / "llmdiff_adapter.safetensors").training
    assert two["processes"] == 2 and two["global_batch"] == 2
    a = safetensors.torch.load_file(str(single_process_run / "llmdiff_adapter.safetensors"))
    b = safetensors.torch.load_file(str(out / "llmdiff_adapter.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for d in (single_process_run, out)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
