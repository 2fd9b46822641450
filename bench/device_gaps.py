"""Where a profiled step leaves the GPU idle, and which host phase of the step it was waiting for.

A device that is not busy for part of a step waits either for the host (the next kernel was launched
only after the device had run out of work: the host is too slow there) or for something else (the
kernel was launched in time but started late: a stream wait, a host sync, a copy). Each gap between
device activities is put on the phase the host was in when the activity that ends the gap was
launched, and counted as host-bound when that launch came after the gap had begun.

Phases are host time windows marked with torch.profiler.record_function(PHASE_PREFIX + name): the
training bench marks each step, and in it data, forward and backward; torch.optim marks its optimizer
step; the rest of a step is what lies outside them up to the next step (the host reading the step
before, logging). A step is analysed from its start to the next step's start, since the trainer queues a
step while the device still runs the one before. Device activities come from the profiler's kineto
events (kernels, copies, memsets), linked to their launch on the host by the CUDA runtime call's
correlation id or, failing that, to the host op that launched them. The device-side copies of the
annotations (kineto's gpu_user_annotation: each record_function range, the phases included, spans the
kernels launched in it, idle gaps and all) are not device work and are left out: counted as activities
they covered every step, and the idle time came out near zero (sessions 7 and 10 read "device-bound"
into it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

PHASE_PREFIX = "llmdiff.phase/"
STEP_PHASE = "step"  # the window the analysis covers; every other phase lies inside it
OTHER = "rest of the step"
UNLINKED = "unlinked launch"
END_OF_STEP = "end of the step (sync, bookkeeping)"


@dataclass(frozen=True)
class Window:
    name: str
    start: int  # ns, host clock
    end: int


@dataclass(frozen=True)
class DeviceActivity:
    start: int  # ns, same clock
    end: int
    launch: int | None  # when the host launched it (ns), None when the profiler did not link it


@dataclass
class PhaseRow:
    phase: str
    host_ms: float = 0.0  # the phase's own host time
    launched_busy_ms: float = 0.0  # device time of the activities launched in the phase
    idle_host_bound_ms: float = 0.0  # device idle, then the phase launched the next activity
    idle_other_ms: float = 0.0  # device idle although the next activity had been launched (waits, syncs)


def phase_at(windows: Sequence[Window], t: int | None) -> str:
    """The innermost phase (the latest-starting window) that contains t."""
    if t is None:
        return UNLINKED
    best: Window | None = None
    for w in windows:
        if w.start <= t <= w.end and (best is None or w.start >= best.start):
            best = w
    return OTHER if best is None or best.name == STEP_PHASE else best.name


def attribute(windows: Sequence[Window], device: Iterable[DeviceActivity]) -> tuple[list[PhaseRow], dict[str, float]]:
    """Per phase: host time, device time launched from it, device idle time it is charged with; plus
    totals (ms) over the step windows: wall, device busy (union of activities), idle."""
    acts = sorted(device, key=lambda a: a.start)
    marked = sorted((w for w in windows if w.name == STEP_PHASE), key=lambda w: w.start)
    # A step's window runs to the next step's start: the trainer queues a step and then reads the one before,
    # so a step's device work (and the host's bookkeeping between steps) lies partly after its host window.
    # The last one runs to the end of the device work it launched.
    steps = [Window(STEP_PHASE, w.start, nxt.start) for w, nxt in zip(marked, marked[1:])]
    if marked:
        last = marked[-1]
        steps.append(Window(STEP_PHASE, last.start, max([last.end] + [a.end for a in acts if a.launch is not None
                                                                       and last.start <= a.launch <= last.end])))
    phases = [w for w in windows if w.name != STEP_PHASE]
    rows: dict[str, PhaseRow] = {}

    def row(name: str) -> PhaseRow:
        return rows.setdefault(name, PhaseRow(name))
    for w in phases:
        row(w.name).host_ms += (w.end - w.start) / 1e6
    totals = {"wall_ms": sum(w.end - w.start for w in steps) / 1e6, "busy_ms": 0.0, "idle_ms": 0.0}
    # the host time of the steps outside every marked phase (phases do not overlap on the training thread)
    row(OTHER).host_ms += totals["wall_ms"] - sum(r.host_ms for r in rows.values())
    for step in steps if acts else []:  # no device activities: a CPU run, host times only
        frontier = step.start  # the device is known busy (or the step not begun) up to here
        for a in acts:
            if a.end <= step.start or a.start >= step.end:
                continue
            start, end = max(a.start, step.start), min(a.end, step.end)
            r = row(phase_at(phases, a.launch))
            r.launched_busy_ms += (end - start) / 1e6
            if start > frontier:
                gap = (start - frontier) / 1e6
                if a.launch is not None and a.launch > frontier:
                    r.idle_host_bound_ms += gap
                else:
                    r.idle_other_ms += gap
                totals["idle_ms"] += gap
            if end > frontier:
                totals["busy_ms"] += (end - max(start, frontier)) / 1e6
                frontier = end
        if step.end > frontier:  # idle at the end of the step: the host finishing it (sync, bookkeeping)
            gap = (step.end - frontier) / 1e6
            row(END_OF_STEP).idle_host_bound_ms += gap
            totals["idle_ms"] += gap
    order = sorted(rows.values(), key=lambda r: -(r.idle_host_bound_ms + r.idle_other_ms))
    return order, totals


def is_annotation(event: Any) -> bool:
    """A kineto event that marks a range (record_function, ProfilerStep, the optimizer's step, a compiled
    region) rather than work: on the device timeline it spans the kernels launched in the range, gaps
    included (activity type gpu_user_annotation there). The flag torch's own tables read."""
    return bool(event.is_user_annotation())


def is_device_work(event: Any) -> bool:
    """A row of a finished profile's key_averages() that is device work (a kernel, copy or memset), not an
    annotation's device-side range: what torch's own "Self CUDA time total" sums."""
    from torch.autograd import DeviceType

    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def from_profiler(prof: object) -> tuple[list[Window], list[DeviceActivity], dict[str, int]]:
    """Phase windows and device activities of a finished torch.profiler.profile, and how many device
    activities were linked to their launch (by runtime call, by host op, not at all)."""
    from torch.autograd import DeviceType

    events = prof.profiler.kineto_results.events()  # type: ignore[attr-defined]
    windows: list[Window] = []
    runtime: dict[int, int] = {}  # CUDA runtime call (cudaLaunchKernel, cudaMemcpyAsync, ...) -> its start
    host_ops: dict[int, int] = {}  # host op -> its start
    device: list[tuple[int, int, int, int]] = []
    annotations = 0
    for e in events:
        name = e.name()
        if e.device_type() == DeviceType.CPU:
            if name.startswith(PHASE_PREFIX):
                windows.append(Window(name[len(PHASE_PREFIX):], e.start_ns(), e.end_ns()))
            elif name.startswith("Optimizer.step#"):  # torch.optim marks its own step
                windows.append(Window("optimizer step", e.start_ns(), e.end_ns()))
            elif name.startswith(("cuda", "cu")) and e.correlation_id():
                runtime[e.correlation_id()] = e.start_ns()
            elif e.correlation_id():
                host_ops[e.correlation_id()] = e.start_ns()
        elif e.device_type() == DeviceType.CUDA:
            if is_annotation(e):
                annotations += 1
                continue
            device.append((e.start_ns(), e.end_ns(), e.correlation_id(), e.linked_correlation_id()))
    linked = {"by runtime call": 0, "by host op": 0, "not linked": 0, "annotations left out": annotations}
    acts = []
    for start, end, corr, linked_corr in device:
        launch = runtime.get(corr)
        if launch is not None:
            linked["by runtime call"] += 1
        else:
            launch = host_ops.get(linked_corr)
            linked["by host op" if launch is not None else "not linked"] += 1
        acts.append(DeviceActivity(start, end, launch))
    return windows, acts, linked
