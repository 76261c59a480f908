"""``train.compile``: the whole step (every forward and loss term of the cohort) compiles into one graph for every
registered method, and a compiled step gives the eager step's losses, gradients and updated weights.

The registry test compiles with ``fullgraph=True`` (any graph break raises) on dynamo's ``eager`` backend (the
captured graph run as is: fast on the CPU); the largest step (FFSD) also goes through ``aot_eager``, which traces
forward and backward as inductor receives them, and one method runs through inductor itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing

from okd.config import OptimConfig, TrainConfig
from okd.engine.builder import build_optimizer
from okd.engine.step import StepRunner, prepare_method
from okd.methods import METHODS, MethodContext
from okd.models import create_model

pytestmark = pytest.mark.slow  # torch.compile of whole training steps

K = 10
PARAMS = {"cmff": {"image_size": 16}}  # CMFF's auxiliary heads are sized for the input resolution
#: methods whose algorithm decides inside every step which optimizers step (their networks' forwards are compiled)
STEPWISE = ("switokd", "switokd_2t1s")
PARAMS["lmcl"] = {"meta_every": 0}  # the main step; L-MCL's meta round steps optimizers itself (eager)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(create_model("resnet20", K).state_dict(), path)
    return path


#: methods whose loss needs every class of a batch twice (trained with data.sampler=m_per_class)
PAIRED_LABELS = {"mcl", "lmcl"}


def make(name: str, teacher_file, **params):
    params = {**PARAMS.get(name, {}), **params}
    if name == "kd":
        params.update(teacher_model="resnet20", teacher_checkpoint=str(teacher_file))
    hp = METHODS.get(name).Params(**params)
    ctx = MethodContext(model="resnet20", num_classes=K, optim=OptimConfig(), params=hp, epochs=300)
    torch.manual_seed(0)
    return METHODS.get(name)(ctx)


def batch(name: str, method, n: int = 4, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    views = type(method).views_for(method.hp)
    xs = [torch.randn(n, 3, size, size, generator=g) for _ in range(views)]
    labels = torch.randint(0, K, (n,), generator=g)
    if name in PAIRED_LABELS:  # every class twice, as data.sampler=m_per_class gives
        labels = torch.arange(n) // 2
    return (xs[0] if views == 1 else xs), labels


def runner(method, compile_: bool, backend="aot_eager") -> StepRunner:
    cfg = TrainConfig(device="cpu", channels_last=False, compile=compile_)
    optimizers = [build_optimizer(g) for g in method.param_groups() if g.params]
    return StepRunner(method, optimizers, cfg, torch.device("cpu"), compile_backend=backend, compile_fullgraph=True)


def assert_same_step(eager, compiled, x, y, epoch: int, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """One step of each: same losses, same gradients, same updated parameters and buffers (float tolerance)."""
    torch.manual_seed(7)
    losses_e, total_e = eager.step(x, y, epoch)
    torch.manual_seed(7)
    losses_c, total_c = compiled.step(x, y, epoch)
    assert set(losses_e) == set(losses_c)
    for key in losses_e:
        torch.testing.assert_close(losses_c[key], losses_e[key], rtol=rtol, atol=atol, msg=key)
    torch.testing.assert_close(total_c, total_e, rtol=rtol, atol=atol)
    params_c = dict(compiled.method.named_parameters())
    for n, p in eager.method.named_parameters():
        q = params_c[n]
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)
    buffers_c = dict(compiled.method.named_buffers())
    for n, b in eager.method.named_buffers():
        torch.testing.assert_close(buffers_c[n], b, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", [n for n in METHODS.names() if n not in STEPWISE])
def test_compiled_step_is_one_graph_and_equals_eager(name, teacher_file):
    """fullgraph=True: a graph break anywhere in the method's step fails here. Methods with epoch-dependent loss
    weights also step at epochs 3 and 4: the weights are inputs of the graph, so the first new epoch recompiles
    once (the floats turn dynamic) and later epochs reuse that graph with their own weights."""
    torch._dynamo.reset()
    method = make(name, teacher_file)
    method.train()
    assert not method.manual_optimization, f"{name}'s default configuration steps optimizers inside its step"
    twin = copy.deepcopy(method)
    x, y = batch(name, method)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    eager, compiled = runner(method, False), runner(twin, True, counter)
    assert_same_step(eager, compiled, x, y, epoch=2)
    assert counter.frame_count == 1
    if method.epoch_scalars(2):
        for epoch in (3, 4):
            assert_same_step(eager, compiled, x, y, epoch)
        assert counter.frame_count == 2, f"{name}: a new epoch recompiled the step"
        assert method.epoch_scalars(3) != method.epoch_scalars(4)  # the ramp still rises: new inputs each epoch


def test_ramp_weights_stay_inputs_through_aot_autograd(teacher_file):
    """AOTAutograd (what inductor receives) keeps the epoch's weights as inputs too (an op such as ``new_full``
    would bake them in and recompile every epoch): FFSD, its warm-up weights and logged ``stat/warmup``, epochs 2-4."""
    torch._dynamo.reset()
    method = make("ffsd", teacher_file)
    method.train()
    twin = copy.deepcopy(method)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    eager, compiled = runner(method, False), runner(twin, True, backend=counter)
    x, y = batch("ffsd", method)
    for epoch in (2, 3, 4):
        assert_same_step(eager, compiled, x, y, epoch)
    assert counter.frame_count == 2, counter.frame_count  # epoch 2 (weights specialised), epoch 3 (dynamic)


def test_inductor_compiled_step_equals_eager(teacher_file):
    """The real backend once (inductor generates CPU kernels): a baseline network's step."""
    torch._dynamo.reset()
    method = make("baseline", teacher_file)
    method.train()
    twin = copy.deepcopy(method)
    x, y = batch("baseline", method)
    assert_same_step(runner(method, False), runner(twin, True, backend="inductor"), x, y, epoch=0, rtol=1e-4)


def test_alternating_dml_compiles_its_networks_forwards(teacher_file):
    """DML's alternating updates step optimizers inside the step: each network's forward is compiled instead."""
    from okd.engine.step import prepare_method

    torch._dynamo.reset()
    method = make("dml", teacher_file, alternate_updates=True)
    method.train()
    twin = copy.deepcopy(method)
    cfg = TrainConfig(device="cpu", channels_last=False, compile=True)
    prepare_method(twin, cfg, compile_backend="eager")
    assert all(net._compiled_call_impl is not None for net in twin.nets)
    x, y = batch("dml", method)
    eager = runner(method, False)
    compiled = StepRunner(twin, [build_optimizer(g) for g in twin.param_groups()], cfg, torch.device("cpu"))
    assert_same_step(eager, compiled, x, y, epoch=0, rtol=1e-4)


@pytest.mark.parametrize("name", STEPWISE)
def test_stepwise_methods_compile_their_networks_forwards(name, teacher_file):
    """SwitOKD skips its teacher's optimizer in expert mode, a decision on each batch: the step stays eager and
    each network's forward is compiled; a compiled step equals the eager one."""
    torch._dynamo.reset()
    method = make(name, teacher_file)
    method.train()
    assert method.manual_optimization
    twin = copy.deepcopy(method)
    cfg = TrainConfig(device="cpu", channels_last=False, compile=True)
    prepare_method(twin, cfg, compile_backend="eager")
    compiled_nets = [m for m in twin.modules() if hasattr(m, "forward_taps")]
    assert compiled_nets and all(net._compiled_call_impl is not None for net in compiled_nets)
    x, y = batch(name, method)
    compiled = StepRunner(twin, [build_optimizer(g) for g in twin.param_groups()], cfg, torch.device("cpu"))
    assert_same_step(runner(method, False), compiled, x, y, epoch=0, rtol=1e-4)
