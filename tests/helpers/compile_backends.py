"""A torch.compile backend for the tests: runs the captured graphs eagerly and counts them."""


class CountingBackend:
    """Counts the graphs dynamo hands it (`graphs`) and their runs (`runs`); with `fail_at`, compiling
    that graph (1-based) raises, as a compiler error would."""

    def __init__(self, fail_at: int | None = None):
        self.graphs, self.runs, self.fail_at = 0, 0, fail_at

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        if self.graphs == self.fail_at:
            raise RuntimeError("this backend cannot compile that graph")

        def run(*args):
            self.runs += 1
            return graph.forward(*args)

        return run
