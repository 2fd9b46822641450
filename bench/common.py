"""Shared benchmark plumbing: ComfyUI setup, environment header, timers, memory, Markdown tables.

Every bench script:
    python bench/<script>.py [--small] [--comfyui-root ROOT] [--repeats N] [--warmup N] [--json OUT]
prints a header (device, torch, CUDA, ComfyUI, commit) and one Markdown table per measurement.

Timing rules (issue 5): medians of repeats after warmup; A/B comparisons run interleaved in one
process (A B, B A, A B, ... so that clock or thermal drift hits both sides alike); CUDA is
synchronised around every timed region; peak GPU memory comes from torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
H100_FLOPS = 989e12  # H100 SXM dense bf16 (= fp16) tensor-core peak, FLOP/s (NVIDIA datasheet): the card
H100_BYTES = 3.35e12  # H100 SXM HBM3 bandwidth, bytes/s (NVIDIA datasheet)


# --- ComfyUI setup ------------------------------------------------------------------------------

def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--comfyui-root", default=os.environ.get("LLMDIFF_COMFYUI_ROOT"),
                   help="ComfyUI root (folder with comfy/); default $LLMDIFF_COMFYUI_ROOT "
                        "(scripts/setup_env.sh prints the pinned one)")
    p.add_argument("--small", action="store_true",
                   help="tiny shapes that run on a CPU in seconds (ratios only, not the GPU targets)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda when available")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default per script)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warmup runs per variant (default per script)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --clock cpu, else torch's choice)")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="wall = perf_counter; cpu = this process's CPU time (robust on a shared, loaded CPU "
                        "machine; forces 1 thread unless --threads). auto = cpu for --small on CPU, else wall")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    p.add_argument("--markdown", dest="markdown_out", default=None, help="also append the Markdown output here")
    return p


def setup_comfy(opts: argparse.Namespace, extra_args: dict[str, Any] | None = None) -> Any:
    """Put ComfyUI and this repository on sys.path and set ComfyUI's args before anything imports
    comfy.model_management (the dance of tests/conftest.py). Returns the torch device to use."""
    root = opts.comfyui_root
    if not root or not (Path(root) / "comfy").is_dir():
        sys.exit("--comfyui-root (or LLMDIFF_COMFYUI_ROOT) must point to a ComfyUI root with comfy/ in it; "
                 "`scripts/setup_env.sh` prints the pinned one on its second line")
    root = str(Path(root).resolve())
    for path in (root, str(REPO)):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    want = opts.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    if opts.clock == "auto":
        opts.clock = "cpu" if (want == "cpu" and opts.small) else "wall"
    if opts.clock == "cpu" and want == "cuda":
        sys.exit("--clock cpu measures CPU time: use --clock wall on a GPU")
    if opts.threads is None and opts.clock == "cpu":
        opts.threads = 1  # process CPU time counts every thread's spinning: one thread keeps it honest
    if opts.threads:
        torch.set_num_threads(opts.threads)
    CLOCK["now"] = time.process_time if opts.clock == "cpu" else time.perf_counter
    CLOCK["name"] = opts.clock
    from comfy.cli_args import args  # parses [] (not our argv)

    args.cpu = want == "cpu"
    args.use_pytorch_cross_attention = True  # torch SDPA: flash / mem-efficient on GPU, fastest on CPU too
    for k, v in (extra_args or {}).items():
        setattr(args, k, v)
    import utils.extra_config  # noqa: F401  (ComfyUI 0.3.x: before anything imports `nodes`)
    import comfy.model_management as mm

    opts.root = root
    return mm.get_torch_device()


def comfyui_version(root: str) -> str:
    try:
        ns: dict[str, Any] = {}
        exec((Path(root) / "comfyui_version.py").read_text(), ns)
        return str(ns["__version__"])
    except Exception:
        return "unknown"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def env_header(device: Any, root: str, **extra: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = f"{props.name} ({props.total_memory / GIB:.0f} GiB)"
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    info.update({"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": CLOCK["name"],
                 "ComfyUI": comfyui_version(root), "python": platform.python_version(),
                 "commit": git_commit()})
    info.update(extra)
    return info


# --- timing -------------------------------------------------------------------------------------

CLOCK: dict[str, Any] = {"now": time.perf_counter, "name": "wall"}


def now() -> float:
    """The benchmark clock (seconds): perf_counter, or process CPU time with --clock cpu."""
    return CLOCK["now"]()


def sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any, calls: int = 1) -> Callable[[], float]:
    """A measurement: seconds per call of `calls` back-to-back calls of fn, CUDA synchronised before and after."""
    def measure() -> float:
        sync(device)
        t0 = now()
        for _ in range(calls):
            fn()
        sync(device)
        return (now() - t0) / calls
    return measure


Measurement = Callable[[], "float | dict[str, float]"]


def interleaved(variants: dict[str, Measurement], repeats: int, warmup: int, progress: bool = False,
                after_warmup: Callable[[], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Run each variant's measurement warmup + repeats times, interleaved A B / B A / A B ...

    A measurement returns seconds, or a dict of named metrics (e.g. per-step and per-run times).
    Returns {variant: {metric: [values per repeat]}} ("time" for plain floats). progress: a line on stderr per
    round with each call's wall seconds, so a run its time limit stops still tells where the time went (a
    compile in the first warm-up round). after_warmup runs between the warm-up and the timed rounds.

    With $BENCH_DEADLINE (Unix seconds; bench/device_run.sh sets it to where the step's time limit stops it) the
    timed rounds end early, after at least MIN_REPEATS, when another round like the last would not end before
    it: the step then reports fewer repeats instead of being killed with nothing (a GPU lease's minutes)."""
    names = list(variants)
    deadline = float(os.environ.get(DEADLINE_ENV) or "inf")

    def call(name: str) -> tuple[float | dict[str, float], float]:
        t0 = now()
        value = variants[name]()
        return value, now() - t0

    def say(label: str, walls: dict[str, float]) -> None:
        if progress:
            print(f"  {label}: " + ", ".join(f"{n} {s:.1f} s" for n, s in walls.items()), file=sys.stderr, flush=True)

    for w in range(warmup):
        say(f"warm-up {w + 1}/{warmup}", {name: call(name)[1] for name in names})
    if after_warmup is not None:
        after_warmup()
    out: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for r in range(repeats):
        walls: dict[str, float] = {}
        round_start = time.time()  # (walls may be CPU seconds: --clock cpu)
        for name in (names if r % 2 == 0 else names[::-1]):
            value, walls[name] = call(name)
            metrics = value if isinstance(value, dict) else {"time": float(value)}
            for k, v in metrics.items():
                out[name].setdefault(k, []).append(float(v))
        say(f"repeat {r + 1}/{repeats}", walls)
        now_s = time.time()
        if r + 1 >= MIN_REPEATS and r + 1 < repeats and now_s + 1.2 * (now_s - round_start) > deadline:
            print(f"  stopped after {r + 1} of {repeats} repeats: ${DEADLINE_ENV} is near", file=sys.stderr, flush=True)
            break
    return out


DEADLINE_ENV = "BENCH_DEADLINE"
MIN_REPEATS = 3  # (fewer would leave no median worth reporting: the run goes on and may be stopped)


def repeats_done(results: dict[str, dict[str, list[float]]]) -> int:
    """How many timed repeats interleaved() ran (fewer than asked when $BENCH_DEADLINE ended it early)."""
    return min((len(v) for metrics in results.values() for v in metrics.values()), default=0)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> float:
    """Relative half-range of the middle values (robust noise estimate): (q3 - q1) / 2 / median."""
    if len(xs) < 4:
        return (max(xs) - min(xs)) / 2 / median(xs) if xs and median(xs) else float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / 2 / median(xs)


def median_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): the distribution-free interval for the median from order statistics.

    s[j] (0-based) lies above the true median exactly when at most j of the n values lie below it: binomial(n,
    1/2) odds, whatever the values' distribution. The interval is the narrowest symmetric pair of order
    statistics whose coverage is still >= level; with too few values for that (n < 6 at 95 %) it is min..max and the
    coverage says how much less it is."""
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    tail = (1.0 - level) / 2
    j = 0
    above = 1 / 2 ** n  # P(binomial(n, 1/2) <= j): the chance that s[j] lies above the true median
    while j + 1 <= (n - 1) // 2:
        nxt = above + math.comb(n, j + 1) / 2 ** n
        if nxt > tail:
            break
        above, j = nxt, j + 1
    return s[j], s[n - 1 - j], 1.0 - 2 * above


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a[r] / b[r] per repeat r of an interleaved run (common.interleaved runs the two back to back in every
    repeat): the drift both share (clocks, temperature, a neighbour on the machine) cancels in each ratio,
    which the two series' own spreads cannot tell apart from the difference being measured."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} and {len(b)} repeats: pairs need the same repeats")
    return [x / y for x, y in zip(a, b)]


# --- FLOPs --------------------------------------------------------------------------------------

def flop_counter() -> Any:
    """torch.utils.flop_counter.FlopCounterMode that also counts the CPU flash-attention kernel (torch
    registers only the CUDA SDPA kernels; on a CPU attention would count as 0 FLOPs). On meta tensors SDPA
    decomposes into bmm, which is counted anyway."""
    import torch
    from torch.utils import flop_counter as fc

    mapping: dict[Any, Any] = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in fc.flop_registry and hasattr(fc, "sdpa_flop_count"):
        def count(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                  **kwargs: Any) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)
        mapping[cpu_sdpa] = count
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


# --- memory -------------------------------------------------------------------------------------

@dataclass(eq=False)  # identity: nested contexts with equal fields are still different contexts
class PeakMemory:
    """Context manager: peak CUDA memory allocated inside it (GiB), None on CPU.

    Nests: torch keeps one peak counter per device, which each entry resets, so an inner context hands
    the peak seen so far to the contexts around it before resetting, and its own peak when it exits.
    """

    device: Any
    peak_gib: float | None = None
    _seen: int = 0

    def _now(self) -> int:
        import torch

        sync(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            now = self._now()
            for outer in _ACTIVE_PEAKS:
                outer._seen = max(outer._seen, now)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._seen = 0
            _ACTIVE_PEAKS.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            now = self._now()
            _ACTIVE_PEAKS.remove(self)
            self.peak_gib = max(self._seen, now) / GIB
            for outer in _ACTIVE_PEAKS:
                outer._seen = max(outer._seen, now)


_ACTIVE_PEAKS: list[PeakMemory] = []


# torch's compiler timers (torch._dynamo.utils.compile_times), nested: a phase includes those it calls
COMPILE_PHASES = {
    "_compile.compile_inner": "dynamo, forward compile included",
    "bytecode_tracing": "tracing",
    "aot_trace_joint_graph": "AOT joint graph",
    "min_cut_rematerialization_partition": "partition",
    "compile_fx.<locals>.fw_compiler_base": "inductor forward",
    "compile_fx.<locals>.bw_compiler": "inductor backward",
    "GraphLowering.run": "lowering",
    "Scheduler.__init__": "fusion",
    "async_compile.wait": "waiting on kernel compiles",
}


HOST_ONLY = "host-only"  # --compile host-only: the step without the U-Net's kernels (host_only_backend)


def host_only_backend() -> Callable:
    """A torch.compile backend whose graphs compute nothing after their first call: it traces through dynamo
    and AOTAutograd as inductor does, runs the graph once, and from then on every call returns those first
    outputs. Under ComfyUI's compile wrapper a sampling step then costs exactly its host work: the sampler's
    Python, the patches' wrappers, dynamo's guards and AOTAutograd's runtime wrappers, but no U-Net kernel.
    Patched minus unpatched is the adapter's host time per step when the U-Net itself is free, as under CUDA
    graphs, where a step's U-Net is one replay (what is left of the overhead is then device time).
    The images are garbage (every step sees the first step's U-Net output): a timing tool only."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def frozen(gm: Any, example_inputs: Any) -> Callable:
        first: list[Any] = []

        def call(*args: Any) -> Any:
            if not first:
                first.append(gm(*args))
            return first[0]
        return make_boxed_func(call)
    return aot_autograd(fw_compiler=frozen)


def comfy_compiled(model_patcher: Any, backend: str, mode: str | None = None) -> Any:
    """A clone with ComfyUI's torch.compile wrapper, as the TorchCompileModel node makes it (backend HOST_ONLY:
    host_only_backend)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    import torch._dynamo

    cfg = torch._dynamo.config  # the benches' variants are each their own graph of the same U-Net code: above 8
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 16))
    m = model_patcher.clone()
    set_torch_compile_wrapper(m, backend=host_only_backend() if backend == HOST_ONLY else backend, mode=mode)
    return m


def graphs_compiled() -> int:
    """Dynamo graphs compiled in this process so far (its own counter, as gpu_checks' check 3 reads it)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def uses_cuda_graphs(backend: str | None, mode: str | None) -> bool:
    """Whether a compile runs its graphs as CUDA graphs: TorchCompileModel's cudagraphs backend, or inductor's
    reduce-overhead / max-autotune modes."""
    from llmdiff_core import fused_site

    return backend == "cudagraphs" or fused_site.inductor_cuda_graphs({"backend": backend, "mode": mode})


def cuda_graph_note() -> str:
    """What CUDA graphs did in this process so far, from torch's counters: the compiled graphs they left to run
    without them (torch logs each one's reason as a warning), and over every recording the inputs not taken
    as static, which each replay copies into the graph's own buffers. Per-run tensors belong there; a U-Net's
    parameters do not (hundreds more per recording, and a copy of the weights per step: docs/benchmarks.md §3n)."""
    from torch._dynamo.utils import counters

    return (f"compiled graphs run without CUDA graphs: {int(counters['inductor']['cudagraph_skips'])} (0 on CUDA: "
            f"every graph replayed as a CUDA graph; torch warns each reason); inputs each replay copies in, summed "
            f"over the recordings: {cuda_graph_recorded_inputs()} (the "
            f"per-run tensors, and with the cudagraphs backend every weight)")


def cuda_graph_recorded_inputs() -> int:
    """torch's count of the inputs each CUDA-graph recording leaves to copy per replay, summed over the recordings
    so far: it grows with every new recording (each has at least its per-call inputs), so a growth while timing
    warm runs means graphs were recorded again there."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_recorded_non_static_inputs"])


@contextlib.contextmanager
def counting_site_kernel(calls: dict[str, int], key: str = "fused_site") -> Iterator[None]:
    """Counts fused_site's kernel calls into calls[key] while inside. The op is defined here, before the block (its
    FLOP formula is registered before a FlopCounterMode copies torch's registry), and a run entry looks it up once
    per run through fused_site.op, so the entries built inside call the counting wrapper."""
    from llmdiff_core import fused_site

    lookup = fused_site.op
    op = lookup()

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[key] = calls.get(key, 0) + 1
        return op(*args, **kwargs)
    fused_site.op = lambda: counted
    try:
        yield
    finally:
        fused_site.op = lookup


def cuda_timing_event() -> Any:
    """A CUDA event that records a time (StepStamps' and ReplayClock's marks on the stream)."""
    import torch

    return torch.cuda.Event(enable_timing=True)


class StepStamps:
    """Where each step of a sampling run ends, stamped at the sampler's callback: seconds after start().

    synced: at each stamp the host waits for the device and reads the benchmark clock. A step then holds its
    host work and its device work back to back, as ComfyUI's sampler runs when something reads every step's
    latent (a preview). Every sampling number before session 15 was taken this way.
    pipelined: a CUDA event recorded on the stream at each stamp and read after the run. The host runs ahead as
    the sampler does when nothing reads: a step takes the longer of its host and its device work, and the
    stamps are the device's. On a CPU the two are the same clock (the device is the host), so pipelined is
    synced there unless an `event` factory is given (tests)."""

    def __init__(self, device: Any, synced: bool, event: Callable[[], Any] | None = None) -> None:
        self.device = device
        self.pipelined = not synced and (event is not None or getattr(device, "type", str(device)) == "cuda")
        self.event = event or cuda_timing_event
        self.origin: Any = None
        self.marks: list[Any] = []

    def _mark(self) -> Any:
        if not self.pipelined:
            sync(self.device)
            return now()
        mark = self.event()
        mark.record()
        return mark

    def start(self) -> None:
        self.marks = []
        self.origin = self._mark()

    def stamp(self) -> None:
        self.marks.append(self._mark())

    def seconds(self) -> list[float]:
        """Each stamp's seconds after start() (pipelined: synchronises first, then reads the events)."""
        if not self.pipelined:
            return [m - self.origin for m in self.marks]
        sync(self.device)
        return [self.origin.elapsed_time(m) / 1e3 for m in self.marks]


class ReplayClock:
    """The device time of every CUDA-graph replay that inductor's CUDA-graph trees (`reduce-overhead`) launch
    while it is installed: a CUDA event on each side of each `graph.replay()`. The events sit on the stream
    after the replay's input copies, so each pair times the graph alone on the device, with the gaps between
    its kernels (which a profiler's sum of kernel times leaves out). A sampling step's time minus its replays'
    is what the step spends outside the U-Net's graph: the host, the input copies and the sampler's own kernels.

    install() wraps node_class.run_graph (CUDAGraphNode's by default; tests pass their own) until uninstall();
    take() returns the milliseconds of the replays timed since the last take(), synchronising first. A replay
    while a stream captures is left untimed (its events would be captured into the graph being recorded)."""

    def __init__(self, node_class: Any = None, event: Callable[[], Any] | None = None,
                 capturing: Callable[[], bool] | None = None) -> None:
        self.node_class, self.event, self.capturing = node_class, event, capturing
        self.pairs: list[tuple[Any, Any]] = []
        self._original: Callable | None = None

    def install(self) -> ReplayClock:
        import torch

        if self.node_class is None:
            from torch._inductor.cudagraph_trees import CUDAGraphNode
            self.node_class = CUDAGraphNode
        if self.event is None:
            self.event = cuda_timing_event
        if self.capturing is None:
            self.capturing = torch.cuda.is_current_stream_capturing
        original = self._original = self.node_class.run_graph
        pairs, event, capturing = self.pairs, self.event, self.capturing

        def run_graph(node: Any) -> None:
            if capturing():
                return original(node)
            start, end = event(), event()
            start.record()
            original(node)
            end.record()
            pairs.append((start, end))
        self.node_class.run_graph = run_graph
        return self

    def uninstall(self) -> None:
        if self._original is not None:
            self.node_class.run_graph = self._original
            self._original = None

    def take(self, device: Any) -> list[float]:
        sync(device)
        times = [start.elapsed_time(end) for start, end in self.pairs]
        self.pairs.clear()
        return times


class CompileClock:
    """The seconds torch's compiler spent in each phase since this clock started: where a compile's minutes go
    (Python-side tracing and lowering, or the parallel kernel compiles), read from torch's own timers."""

    def __init__(self) -> None:
        self.start = self._totals()

    @staticmethod
    def _totals() -> dict[str, float]:
        try:
            from torch._dynamo.utils import compilation_time_metrics
        except ImportError:  # (another torch: no breakdown, nothing else changes)
            return {}
        return {k: sum(v) for k, v in compilation_time_metrics.items()}

    def phases(self) -> str:
        """'dynamo, forward compile included 12.3 s, tracing 1.2 s, ...' (phases that took 0.05 s or more)."""
        now = self._totals()
        spent = [(label, now.get(key, 0.0) - self.start.get(key, 0.0)) for key, label in COMPILE_PHASES.items()]
        return ", ".join(f"{label} {s:.1f} s" for label, s in spent if s >= 0.05)


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


# --- output -------------------------------------------------------------------------------------

def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return "n/a"
        if x != 0 and (abs(x) >= 10 ** 5 or abs(x) < 10 ** -digits):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


@dataclass
class Report:
    """Collects the header, tables and notes of one script run; prints Markdown, writes JSON."""

    title: str
    header: dict[str, Any]
    sections: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)  # JSON only: e.g. every repeat's value, for later statistics

    def table(self, name: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.sections.append({"name": name, "headers": list(headers), "rows": [list(r) for r in rows]})

    def markdown(self) -> str:
        head = ", ".join(f"{k} {v}" for k, v in self.header.items())
        parts = [f"### {self.title}", "", head, ""]
        for s in self.sections:
            parts += [f"**{s['name']}**", "", markdown_table(s["headers"], s["rows"]), ""]
        parts += [f"- {n}" for n in self.notes]
        return "\n".join(parts).rstrip() + "\n"

    def emit(self, opts: argparse.Namespace) -> None:
        text = self.markdown()
        print(text, flush=True)
        if opts.markdown_out:
            with open(opts.markdown_out, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")
        if opts.json_out:
            def clean(v: Any) -> Any:
                if isinstance(v, float) and not math.isfinite(v):
                    return None
                return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
            data = {"title": self.title, "header": {k: clean(v) for k, v in self.header.items()},
                    "sections": [{**s, "rows": [[clean(c) for c in r] for r in s["rows"]]} for s in self.sections],
                    "notes": self.notes, "raw": self.raw}
            Path(opts.json_out).write_text(json.dumps(data, indent=1), encoding="utf-8")


class Interruption:
    """A `with` block that a SIGINT (KeyboardInterrupt: bench/device_run.sh's `timeout` for a step, which sends KILL
    15 s later) ends instead of the script: the report notes what was under way (`during`), the script goes on to
    write the tables of what finished before it, then ends with exit_if_cut (status 130, as an interrupt would)."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.during = ""
        self.happened = False

    def __enter__(self) -> Interruption:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        if kind is not KeyboardInterrupt:
            return False
        self.happened = True
        self.report.notes.append(f"interrupted (SIGINT: the step's time ran out) while measuring {self.during or '?'}: "
                                 "no rows for it; the tables hold what finished before it")
        print(f"  interrupted while measuring {self.during or '?'}: writing what finished", file=sys.stderr,
              flush=True)
        return True

    def exit_if_cut(self) -> None:
        if self.happened:
            sys.exit(130)


def defaults(opts: argparse.Namespace, repeats: int, warmup: int) -> None:
    if opts.repeats is None:
        opts.repeats = repeats
    if opts.warmup is None:
        opts.warmup = warmup
