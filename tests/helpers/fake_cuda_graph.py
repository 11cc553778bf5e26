"""A stand-in for torch.cuda's graph calls (wanfit.runtime.cuda_graph.CudaGraphOps), so the runner's
logic runs on the CPU: a replay runs the captured function again, on the static buffers it reads."""


class FakeGraph:
    """A captured graph: replay runs the captured function again on the static buffers it read."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        self.out.copy_(self.fn())


class FakeOps:
    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.warmed = 0
        self.captured = 0

    def warm_up(self, fn, iterations, device):
        self.warmed += iterations
        for _ in range(iterations):
            fn()

    def capture(self, fn, device):
        if self.fail is not None:
            raise self.fail
        self.captured += 1
        out = fn()
        return FakeGraph(fn, out), out
