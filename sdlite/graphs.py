"""CUDA graphs: a network call's kernels replayed with one launch.

On a fast GPU a UNet call is bound by the CPU launching its kernels (SD 2.1's UNet runs about 650
torch operations a call, each one kernel or more), not by the GPU: it took 13 ms a call on an H200
in fp16 at 256 and at 512 px alike (batch 2), though the 512 px call has 4.4 times the FLOPs. A
CUDA graph records the kernels of one call, at the first call with each input signature (shapes,
dtypes), and later calls copy their inputs into the recorded ones and replay it: 7.6 and 11.2 ms.
"""

import threading
import warnings
from collections import OrderedDict
from typing import Callable

import torch

MAX_GRAPHS = 4  # signatures kept; each holds its call's activations, so the least recently used goes


class CUDAGraphs:
    """Runs `function(*inputs)` (CUDA tensors in, one tensor out) from recorded CUDA graphs. The
    function must do the same work for every input of a signature: no host synchronisation, no
    branch on values, no copies from the CPU. Its parameters must stay the same tensors: call
    `clear` after replacing any (as LoRA merging does). If a recording fails, calls run plainly
    from then on, with a warning (the fall-back has not met such a failure on a GPU yet)."""

    def __init__(self):
        self.graphs = OrderedDict()  # signature -> (graph, its inputs, its output)
        self.lock = threading.Lock()  # the recorded inputs and output are shared: one replay at a time
        self.failed = False  # a recording failed: every call runs plainly from then on

    def __call__(self, function: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        signature = tuple((t.shape, t.dtype, t.device) for t in inputs)
        with self.lock:
            if self.failed:
                return function(*inputs)
            if signature in self.graphs:
                self.graphs.move_to_end(signature)
            else:
                if len(self.graphs) == MAX_GRAPHS:
                    self.graphs.popitem(last=False)
                try:
                    self.graphs[signature] = record(function, inputs)
                except RuntimeError as e:  # an operation CUDA cannot record (another GPU, driver or torch)
                    self.failed = True
                    warnings.warn(f"CUDA graphs turned off: recording a call failed ({e}); calls run plainly")
                    return function(*inputs)
            graph, recorded_inputs, output = self.graphs[signature]
            for recorded, value in zip(recorded_inputs, inputs):
                recorded.copy_(value)
            graph.replay()
            return output.clone()  # the next replay overwrites `output`

    def clear(self) -> None:
        with self.lock:
            self.graphs.clear()


def record(function: Callable[..., torch.Tensor], inputs: tuple) -> tuple:
    """(graph, its input tensors, its output tensor) for one call of `function` on copies of `inputs`."""
    recorded_inputs = [t.clone() for t in inputs]
    stream = torch.cuda.Stream(device=inputs[0].device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # a plain call first: lazy set-up (handles, workspaces) stays out
        function(*recorded_inputs)
    graph = torch.cuda.CUDAGraph()
    # "thread_local": CUDA calls of other threads (the server's other workers) do not break the recording
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        output = function(*recorded_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    return graph, recorded_inputs, output
