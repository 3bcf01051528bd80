"""A fake CUDA machine for the engine's GPU host path, on a CPU-only torch (no GPU in CI).

torch's FakeTensorMode makes tensors that have a device, a shape and a dtype but no data: under it,
`torch.empty(4, device="cuda:1")` is a fake `cuda:1` tensor, an op that mixes it with a CPU tensor raises
FakeTensorDeviceMismatchError, and `.item()` / `.tolist()` / `bool()` raise DataDependentOutputException
(a host sync). `fake_cuda()` adds what a CPU-only build lacks for the engine to run its CUDA path there:

- a CUDA device guard in c10 (elastic_decode._C.install_stand_in_cuda_guard): without one, indexing or
  copying a fake CUDA tensor fails in the Python bindings;
- torch.cuda's device API as a GPU machine with `num_devices` GPUs has it: a current device per thread
  (0 until set, as CUDA's is), `torch.cuda.device(...)`, properties, memory counters (scripted), streams
  and graphs that record where they were made and replay nothing;
- Triton launches replaced by a check, `Launches`: a launch goes to the *current* device (Triton takes
  its device and stream from `torch.cuda.current_device()`), so every tensor it is given must be there.
  A launch that breaks the rule raises WrongDevice on the spot; launches are counted per kernel.

What the fake run cannot see: values (a fake tensor has none, so the engine's read-back of a step is
replaced by `scripted_results`, host values that follow each sequence's budget), the kernels themselves
(the interpreter tests and the compile gate cover them), real CUDA graph capture and replay, stream
ordering and races, NCCL (tensor parallelism is not run here), and memory figures (scripted).
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

from elastic_decode import _C


class WrongDevice(AssertionError):
    """A Triton launch whose tensors are not on the device it launches on."""


class HostToDevice(AssertionError):
    """Data copied from the host inside a step a CUDA graph replays (a replay would reuse stale data)."""


@dataclass
class Launches:
    """Every Triton launch of the fake run: kernel name -> count, and the devices they went to."""

    counts: Counter = field(default_factory=Counter)
    devices: set[int] = field(default_factory=set)
    mode: FakeTensorMode | None = None  # the fake mode (a thread the block starts must enter it: modes are per thread)


class _DeviceState(threading.local):
    index = 0  # CUDA's current device starts at 0 on every thread


@dataclass
class FakeMemory:
    """The memory counters start-up reads (bytes)."""

    free: int = 8 * 2**30
    total: int = 80 * 2**30


class _Stream:
    def __init__(self, device=None, *args, **kwargs):
        self.device = torch.device("cuda", _index(device) if device is not None else torch.cuda.current_device())

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Graph:
    """A CUDA graph that records the device current at its capture and replays nothing."""

    captured_on: list[int] = []

    def __init__(self, *args, **kwargs):
        pass

    def replay(self) -> None:
        pass

    def pool(self):
        return object()


def _index(device) -> int:
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return device.index if device.index is not None else 0


@contextlib.contextmanager
def _stream_context(stream):
    yield


@contextlib.contextmanager
def _graph_context(graph, pool=None, stream=None, **kwargs):
    current = torch.cuda.current_device()
    if stream is not None and stream.device.index != current:
        raise WrongDevice(f"a graph captured on a stream of cuda:{stream.device.index} while cuda:{current} is current")
    _Graph.captured_on.append(current)
    yield


def _check_launch(launches: Launches, name: str, args, kwargs) -> None:
    current = torch.cuda.current_device()
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.device != torch.device("cuda", current):
            raise WrongDevice(f"{name} launched on cuda:{current} (the current device) with a tensor on "
                              f"{value.device}: Triton would read that pointer in the wrong context")
    launches.counts[name] += 1
    if kwargs.get("CONFIDENCE"):  # the sampler's token-confidence variant
        launches.counts[name + " + confidence"] += 1
    launches.devices.add(current)


class NoHostCopies(TorchDispatchMode):
    """Raises HostToDevice on a copy from a CPU tensor to a CUDA one while `armed`."""

    armed = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.armed and func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            target = kwargs.get("device") if func is torch.ops.aten._to_copy.default else args[0].device
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and target is not None \
                    and torch.device(target).type == "cuda":
                raise HostToDevice(f"{func} from the host to {target} inside a decode step")
        return func(*args, **kwargs)


class _HostFile:
    """safetensors' safe_open with the fake mode off while it reads (it builds tensors from storages, which
    a fake mode cannot): checkpoints load as real host tensors, copied into the fake parameters."""

    def __init__(self, open_file, *args, **kwargs):
        with unset_fake_temporarily():
            self._file = open_file(*args, **kwargs)

    def __enter__(self):
        with unset_fake_temporarily():
            self._file.__enter__()
        return self

    def __exit__(self, *exc):
        with unset_fake_temporarily():
            return self._file.__exit__(*exc)

    def keys(self):
        return self._file.keys()

    def get_tensor(self, name):
        with unset_fake_temporarily():
            return self._file.get_tensor(name)

    def get_slice(self, name):
        with unset_fake_temporarily():
            return self._file.get_tensor(name)  # a whole tensor slices as the lazy slice would


@contextlib.contextmanager
def fake_cuda(monkeypatch, num_devices: int = 2, memory: FakeMemory | None = None) -> Iterator[Launches]:
    """Run the block as on a machine with `num_devices` GPUs: fake CUDA tensors, torch.cuda's device API,
    and Triton launches checked (see the module docstring). Yields the launch record."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    _C.install_stand_in_cuda_guard()
    state, memory, launches = _DeviceState(), memory or FakeMemory(), Launches()

    def set_device(device) -> None:
        index = _index(device)
        if not 0 <= index < num_devices:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        state.index = index

    def exchange(index: int) -> int:
        previous = state.index
        if index >= 0:
            set_device(index)
        return previous

    class Properties:
        name, multi_processor_count, total_memory, major, minor = "fake H100", 132, memory.total, 9, 0

    cuda = torch.cuda
    for name, value in {
        # (not is_available: FakeTensorMode builds `torch.tensor(..., device="cuda")` as a fake only while it is
        # False; the engine asks device_count)
        "device_count": lambda: num_devices, "current_device": lambda: state.index,
        "set_device": set_device, "_exchange_device": exchange, "_maybe_exchange_device": exchange,
        "get_device_properties": lambda device=None: Properties(), "synchronize": lambda device=None: None,
        "mem_get_info": lambda device=None: (memory.free, memory.total), "memory_reserved": lambda device=None: 0,
        "max_memory_reserved": lambda device=None: 0, "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None, "Stream": _Stream, "current_stream": lambda device=None: _Stream(device),
        "stream": _stream_context, "CUDAGraph": _Graph, "graph": _graph_context,
    }.items():
        monkeypatch.setattr(cuda, name, value)
    import safetensors

    open_file = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *args, **kwargs: _HostFile(open_file, *args, **kwargs))
    def launcher(kernel, grid):
        return lambda *args, **kwargs: _check_launch(launches, kernel.fn.__name__, args, kwargs)

    for kernel_class in (jit.JITFunction, interpreter.InterpretedFunction):  # compiled, or interpreted (the tests)
        monkeypatch.setattr(kernel_class, "__getitem__", launcher)
    _Graph.captured_on = []
    launches.mode = FakeTensorMode(allow_non_fake_inputs=True)
    with launches.mode:
        yield launches


@dataclass
class ScriptedStep:
    """What the scripted read-back gives each row of a step: `token` for every step it runs (so the run's
    tokens are known), until the sequence's max_new_tokens ends it (FINISH_LENGTH)."""

    token: int = 7
    batches: list = field(default_factory=list)  # (is_prefill, rows, num_steps) of each step read back


def scripted_results(monkeypatch, script: ScriptedStep) -> None:
    """Replace the runner's device-to-host read-back (which a fake tensor cannot give) with host values a
    step would produce, after checking that what it reads is on the runner's device; the rest of the
    runner (plan, device batch, launches, release of finished rows) runs as it is."""
    from elastic_decode.worker import model_runner
    from elastic_decode.kernels import DONE, FINISH_LENGTH
    from elastic_decode.core.step import StepResult

    current: dict = {}
    run = model_runner.ModelRunner.run

    def run_recorded(self, batch):
        current["batch"], current["device"] = batch, self.device
        return run(self, batch)

    def read_back(tokens, logprobs, forced, confidence, state, top=None, recent_width=None) -> StepResult:
        batch, device = current["batch"], current["device"]
        for t in (tokens, logprobs, forced, *([] if confidence is None else [confidence]), *vars(state).values()):
            if t.device != device:
                raise WrongDevice(f"a step's result on {t.device}, the runner's device is {device}")
        steps = tokens.shape[0]
        script.batches.append((batch.is_prefill, len(batch.seqs), steps))
        rows = [min(steps, s.max_new_tokens - s.num_generated) for s in batch.seqs]
        done = [s.num_generated + k >= s.max_new_tokens for s, k in zip(batch.seqs, rows)]
        return StepResult(
            tokens=[[script.token] * k for k in rows], logprobs=[[-0.5] * k for k in rows],
            forced=[[0] * k for k in rows],
            phase=[DONE if d else s.phase for s, d in zip(batch.seqs, done)],
            think_count=[s.think_count for s in batch.seqs],
            solution_count=[s.solution_count + k for s, k in zip(batch.seqs, rows)],
            force_pos=[s.force_pos for s in batch.seqs], recent=[list(s.recent) for s in batch.seqs],
            forced_end=[s.forced_end for s in batch.seqs],
            finish=[FINISH_LENGTH if d else s.finish for s, d in zip(batch.seqs, done)])

    monkeypatch.setattr(model_runner.ModelRunner, "run", run_recorded)
    monkeypatch.setattr(model_runner.ModelRunner, "_result", staticmethod(read_back))
