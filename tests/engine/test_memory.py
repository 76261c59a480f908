"""Memory is flat over training steps: the real trainer loop keeps no graph, activation or state from earlier steps.

``okd.engine.trainer.train`` runs one short epoch on a tiny CIFAR-10 folder (batch 8, CPU); a probe wrapped
around ``StepRunner.step`` measures, before every step (so after the trainer has handled the previous one):

- autograd nodes reachable from any live tensor (a growing count: graphs chained across steps, e.g. loss sums
  accumulated without ``detach``);
- tensors saved for backward in an *earlier* step that are still alive (kept graphs: ``retain_graph``, stored
  outputs; parameters and buffers excluded);
- live tensor objects, and the storages of the method's state and optimizer state (no accumulation).

A negative control keeps every step's loss dict (graph attached): the same probe must flag it.
"""

from __future__ import annotations

import gc
import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from okd.bench import graph_nodes
from okd.engine import step as step_module
from okd.engine.trainer import train
from okd.methods.build import load_config

pytestmark = pytest.mark.slow  # every test here trains for many steps and measures memory

BATCH, STEPS, WARMUP = 8, 6, 2


def write_tiny_cifar10(root: Path, per_file: int, n_test: int = 8) -> None:
    """Random images in the official ``cifar-10-batches-py`` layout (5 train files and a test file)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_file
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def live_tensors() -> list[torch.Tensor]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is torch.Tensor or type(o) is torch.nn.Parameter]


def graph_nodes_alive(tensors: list[torch.Tensor]) -> int:
    """Autograd nodes reachable from the ``grad_fn`` of the given (live) tensors."""
    return len(graph_nodes(*(t for t in tensors if t.grad_fn is not None)))


class Probe:
    """Wraps ``StepRunner.step``: records saved-for-backward tensors per step and measures before each step."""

    def __init__(self, leak: bool = False) -> None:
        self.leak = leak
        self.kept: list = []
        self.saved: list[list[weakref.ref]] = []
        self.nodes: list[int] = []
        self.tensors: list[int] = []
        self.stale_saved: list[int] = []
        self.state_ptrs: list[frozenset[int]] = []

    def measure(self, runner) -> None:
        tensors = live_tensors()
        self.nodes.append(graph_nodes_alive(tensors))
        self.tensors.append(len(tensors))
        del tensors
        # saved tensors of steps before the previous one: they must all be gone
        self.stale_saved.append(sum(r() is not None for step in self.saved[:-1] for r in step))
        state = [*runner.method.state_dict().values()]
        for opt in runner.optimizers:
            state += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        self.state_ptrs.append(frozenset(t.data_ptr() for t in state))

    def wrap(self, original):
        probe = self

        def step(runner, images, labels, epoch):
            probe.measure(runner)
            own = {id(t) for t in [*runner.method.parameters(), *runner.method.buffers()]}
            refs: list[weakref.ref] = []

            def pack(t):
                if id(t) not in own:
                    refs.append(weakref.ref(t))
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = original(runner, images, labels, epoch)
                if probe.leak:  # the bug the test must catch: a graph kept from every step
                    probe.kept.append(runner.method.training_step(images, labels, epoch))
            probe.saved.append(refs)
            return out

        return step


def run_probed(method: str, tmp_path: Path, monkeypatch, leak: bool = False) -> Probe:
    root = tmp_path / "data"
    write_tiny_cifar10(root, per_file=BATCH * STEPS // 5 + 1)
    overrides = [
        f"data.root={root}", "data.download=false", f"data.batch_size={BATCH}", f"data.limit_train={BATCH * STEPS}",
        "data.drop_last=true", "data.test_batch_size=8", "train.epochs=1", "train.device=cpu",
        "train.progress=none", f"output_dir={tmp_path / 'runs'}", "name=mem",
    ]  # fmt: skip
    cfg = load_config(f"cifar10/{method}_resnet20", overrides)
    probe = Probe(leak)
    monkeypatch.setattr(step_module.StepRunner, "step", probe.wrap(step_module.StepRunner.step))
    train(cfg)
    assert len(probe.nodes) == STEPS, f"the trainer ran {len(probe.nodes)} steps, expected {STEPS}"
    return probe


def assert_flat(probe: Probe) -> None:
    after = slice(WARMUP, None)
    assert len(set(probe.nodes[after])) == 1, f"autograd nodes alive grow over steps: {probe.nodes}"
    assert not any(probe.stale_saved), f"tensors saved in earlier steps still alive: {probe.stale_saved}"
    assert len(set(probe.tensors[after])) == 1, f"live tensors grow over steps: {probe.tensors}"
    assert len(set(probe.state_ptrs[after])) == 1, "method/optimizer state storages change after warm-up"


@pytest.mark.parametrize("method", ["baseline", "ffsd"])
def test_memory_is_flat_over_steps(method, tmp_path, monkeypatch):
    assert_flat(run_probed(method, tmp_path, monkeypatch))


def test_probe_catches_a_graph_kept_every_step(tmp_path, monkeypatch):
    probe = run_probed("baseline", tmp_path, monkeypatch, leak=True)
    assert probe.nodes[-1] > probe.nodes[WARMUP] and probe.stale_saved[-1] > 0
    with pytest.raises(AssertionError):
        assert_flat(probe)
