"""CUDA graphs of whole training steps: one bag's forward, loss and backward recorded once, then replayed.

Why: at the paper's average bag a CrossFusion step issues about 5,900 operations, and the host takes longer to
issue them than the GPU takes to run them (docs/performance.md). A replayed graph launches the recorded kernels
at once. Bags differ in size, so there is one graph per bag, keyed by where its tensors lie on the device (the
engine's device store keeps a bag at one address for the whole fold); all graphs share one memory pool, so the
memory is that of one step, not one per bag. A graph runs the same kernels as the eager step (dropout draws fresh
numbers at every replay); only the host work is gone.

What keeps replays correct:
- gradients exist before any capture and are zeroed in place, never set to None (``set_to_none=False``), so every
  graph's backward accumulates into the same tensors; should they move all the same, the graphs are dropped and
  recorded again; a model with a parameter that gets no gradient is not graphed (Adam would then see zeros
  instead of no gradient);
- labels reach every step through static buffers, and each step adds its loss into one static sum, so no graph
  has an output that another graph's memory could overwrite;
- the first step runs eagerly on the capture stream (CUDA graph capture needs a warmed-up stream); every other
  bag is recorded the first time it comes (in "relaxed" capture mode, so that a library may set up a plan for a
  new size, e.g. cuFFT, outside the graph) and replayed from then on;
- an attention shape class first met during a recording runs with the default kernel order; it is measured right
  after (:func:`milbench.accel.attention.tune_pending`), and if another kernel wins, that bag's graph is dropped and
  recorded again the next time the bag comes;
- a capture that fails turns graphs off for the rest of the fold, with the reason (``stats()["off"]``), and the
  step runs eagerly, as every later one does. Bags not kept on the device (key None) always run eagerly.
Only models that declare ``cuda_graphs = True`` are graphed: a forward that draws host-side random numbers or
reads host data would be frozen into the graph, so each model vouches for itself.
"""

from __future__ import annotations

from typing import Callable

import torch

from milbench.accel.attention import tune_pending
from milbench.data.bag import Bag
from milbench.models.registry import card_of


def graph_key(bag: Bag) -> tuple:
    """Where a stored bag's tensors lie (pointer, shape, dtype): the same key means a graph's inputs are in place."""
    parts = []
    for group in ("features", "coords", "slide_index", "extras"):
        for name, t in sorted(getattr(bag, group).items()):
            if isinstance(t, torch.Tensor):
                parts.append((group, name, t.data_ptr(), tuple(t.shape), t.dtype))
    return tuple(parts)


def can_graph(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether ``model`` may be graphed on ``device`` (CUDA, and its card's traits allow CUDA graphs)."""
    card = card_of(model)
    return device.type == "cuda" and card is not None and card.traits.cuda_graphs


_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every :class:`StepGraphs` of the process. cuBLAS keeps a workspace for each
    stream it has run on for the life of the process (64 MiB on an H200 with PyTorch 2.11, issue 20): a fresh stream
    per model (per fold, per benchmark measurement) would leave one more behind each time."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(index)
    return _STREAMS[index]


class StepGraphs:
    """Training steps of one model, graphed per bag. ``run(key, y, c, step)`` does one step: ``step(y, c)`` must
    compute the loss of one bag from the static labels it is given, call backward, and return the detached loss;
    the losses add up in ``loss_sum``."""

    def __init__(self, model: torch.nn.Module, device: torch.device, max_graphs: int = 4096) -> None:
        self.model, self.device, self.max_graphs = model, device, max_graphs
        self.stream = capture_stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.y = torch.zeros(1, dtype=torch.long, device=device)
        self.c = torch.zeros(1, dtype=torch.float32, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_pointers: tuple[int, ...] = ()
        self.warm = False
        self.off: str | None = None
        self.counts = {"replayed": 0, "captured": 0, "eager": 0}

    def run(self, key: tuple | None, y: torch.Tensor, c: torch.Tensor,
            step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """One training step of the bag under ``key`` (None: not kept on the device, run eagerly)."""
        self.y.copy_(y.reshape(1), non_blocking=True)
        self.c.copy_(c.reshape(1), non_blocking=True)
        pointers = tuple(0 if p.grad is None else p.grad.data_ptr() for p in self.params)
        if pointers != self.grad_pointers:  # gradients reallocated: recorded graphs would write to freed memory
            self.graphs.clear()
            self.grad_pointers = pointers
        graph = self.graphs.get(key) if key is not None else None
        if graph is not None:
            graph.replay()
            self.counts["replayed"] += 1
            return
        if key is None or self.off or not self.warm or len(self.graphs) >= self.max_graphs or 0 in pointers:
            self._eager(step)
            if not self.warm:
                self._check_gradients()
            return
        graph = self._capture(step)
        if graph is None:
            self._eager(step)
            return
        self.graphs[key] = graph
        self.counts["captured"] += 1
        graph.replay()
        if tune_pending():  # an attention kernel chosen after this recording: record the bag again next time
            del self.graphs[key]

    def _capture(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.cuda.CUDAGraph | None:
        """Record ``step`` (nothing runs); None, with graphs off and the reason kept, if recording fails. The capture
        is begun and ended directly: ``torch.cuda.graph`` would synchronise and empty the allocator's cache for
        every bag."""
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin(self.pool, capture_error_mode="relaxed")
                try:
                    self.loss_sum.add_(step(self.y, self.c))
                finally:
                    graph.capture_end()
        except Exception as err:  # e.g. an op that synchronises with the host: eager from now on
            self.off = f"capture failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
            self._close_failed_capture()
            return None
        finally:
            current.wait_stream(self.stream)
        return graph

    def _close_failed_capture(self) -> None:
        """A capture_end that fails stops before it tidies up: the capture stream would go on allocating into the
        graphs' pool, and the random generators would stay in capture mode (every later dropout would then fail
        with "Offset increment outside graph capture"). Release the pool, then record and end an empty graph,
        which takes the generators out of capture mode."""
        try:
            torch._C._cuda_endAllocateToPool(self.device.index or 0, self.pool)
        except Exception:
            pass
        try:
            with torch.cuda.stream(self.stream):
                empty = torch.cuda.CUDAGraph()
                empty.capture_begin(capture_error_mode="relaxed")
                empty.capture_end()
        except Exception:
            pass

    def _eager(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """The step without a graph: on the capture stream while graphs are on (it warms the stream up), ordered with
        the current stream; on the current stream once they are off."""
        self.counts["eager"] += 1
        if self.off:
            self.loss_sum.add_(step(self.y, self.c))
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self.loss_sum.add_(step(self.y, self.c))
        current.wait_stream(self.stream)

    def _check_gradients(self) -> None:
        """After the first step: every trainable parameter must hold a gradient, or graphs stay off."""
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            self.off = f"{len(missing)} parameters get no gradient (e.g. {missing[0]}); graphs need every one"
        self.warm = True

    def take_loss(self) -> torch.Tensor:
        """The summed loss since the last call (on the device, no host synchronisation), and a fresh sum."""
        total = self.loss_sum.clone()
        self.loss_sum.zero_()
        return total

    def stats(self) -> dict[str, object]:
        """Graphs held, steps replayed / captured / run eagerly, and why graphs were turned off (None if they were
        not)."""
        return {"graphs": len(self.graphs), **self.counts, "off": self.off}
