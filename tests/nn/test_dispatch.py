"""The dispatcher's decisions (one place, every mode on a fast path), the custom ops' registrations, and the package
structure (no import cycles in bnlstm_lit.nn, no lightning)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

import bnlstm_lit.nn
from bnlstm_lit.nn import BNLSTM, batchnorm_sites, estimate_population_statistics, native, native_build, reference
from bnlstm_lit.nn.dispatch import choose

needs_kernel = pytest.mark.skipif(not native_build.available(), reason="the native kernel cannot be built here")


def _plan(model: BNLSTM, x: torch.Tensor, mask=None, probing: bool = False):
    cell = model.cells[0]
    state = tuple(s[0] for s in model.initial_state(x.shape[1]))
    return choose(cell, x, state, mask, model.implementation, probing)


@needs_kernel
def test_every_mode_of_the_sites_has_a_fast_path():
    """float32 CPU: training, the population-statistics estimation pass (module in eval, sites in train, no
    gradient), evaluation with batch statistics and with population statistics all run the native kernel."""
    model = BNLSTM(3, 8, max_steps=10)
    x = torch.randn(6, 4, 3)
    plan = _plan(model, x)
    assert (plan.path, plan.statistics, plan.input_in_kernel) == ("native", "train", True)
    model.eval()
    for site in batchnorm_sites(model):
        site.train()
    with torch.no_grad():
        assert (_plan(model, x).path, _plan(model, x).statistics) == ("native", "train")
    for site in batchnorm_sites(model):
        site.eval()
        site.eval_statistics = "batch"
    assert (_plan(model, x).path, _plan(model, x).statistics) == ("native", "batch")
    for site in batchnorm_sites(model):
        site.eval_statistics = "population"
    with torch.no_grad():
        assert (_plan(model, x).path, _plan(model, x).statistics) == ("native", "population")
    # population statistics with gradients: the differentiable eager loop
    assert (_plan(model, x).path, _plan(model, x).statistics) == ("eager", "population")


def test_where_each_implementation_runs():
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    assert _plan(BNLSTM(3, 8, max_steps=10, dtype=torch.float64), x).path == "eager"
    assert _plan(BNLSTM(3, 8, max_steps=10, normalize=False, dtype=torch.float64), x).path == "plain"
    tanh = _plan(BNLSTM(3, 8, max_steps=10, cell="tanh", dtype=torch.float64), x)
    assert tanh.path == "reference" and "no fast path" in tanh.reason
    assert _plan(BNLSTM(3, 8, max_steps=10, dtype=torch.float64), x, probing=True).path == "reference"
    forced = _plan(BNLSTM(3, 8, max_steps=10, implementation="reference", dtype=torch.float64), x)
    assert forced.path == "reference"
    eager = BNLSTM(3, 8, max_steps=10, implementation="eager")
    assert _plan(eager, x.float()).path == "eager"
    mixed = BNLSTM(3, 8, max_steps=10, dtype=torch.float64)
    mixed.cells[0].bn_c.eval()
    assert "different modes" in _plan(mixed, x).reason
    # a mask whose real positions are a prefix of the sorted batch: the packed fast path
    mask = torch.arange(6)[:, None] < torch.tensor([6, 2, 4, 1])[None, :]
    plan = _plan(BNLSTM(3, 8, max_steps=10, dtype=torch.float64), x, mask)
    assert plan.path == "eager" and plan.packed is not None


def test_native_on_what_it_cannot_run_is_an_error_naming_the_setting():
    layer = BNLSTM(3, 8, max_steps=10, implementation="native", dtype=torch.float64)
    with pytest.raises(ValueError, match="implementation='native'.*float64"):
        layer(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="implementation must be one of"):
        BNLSTM(3, 8, implementation="fast")  # type: ignore[arg-type]


@needs_kernel
def test_estimation_pass_runs_the_kernel_not_the_reference_loop(count_kernel_calls, monkeypatch):
    """The paper's estimation protocol (sites in training mode, module in eval, no gradient) goes through the native
    kernel, and gives the statistics the reference loop gives."""
    reference_calls = []
    run = reference.run
    monkeypatch.setattr(reference, "run", lambda *a, **k: reference_calls.append(1) or run(*a, **k))
    torch.manual_seed(0)
    model = BNLSTM(3, 16, 2, max_steps=8)
    twin = copy.deepcopy(model)
    twin.implementation = "reference"
    batches = [torch.randn(8, 5, 3) for _ in range(3)]
    estimate_population_statistics(model, batches)
    assert count_kernel_calls["train"] == 2 * 3 and not reference_calls
    estimate_population_statistics(twin, batches)
    assert reference_calls
    for a, b in zip(batchnorm_sites(model), batchnorm_sites(twin), strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-5)
        assert torch.equal(a.num_batches_tracked, b.num_batches_tracked)


@needs_kernel
@pytest.mark.parametrize("variant", ["input_norm_projected", "input_norm", "input_term"])
def test_custom_ops_pass_opcheck(variant):
    """torch.library.opcheck of the training op (and through its autograd registration, the backward op): schema,
    fake tensors, autograd registration, AOT dispatch with dynamic shapes."""
    g = torch.Generator().manual_seed(3)
    T, B, I, H = 10, 4, 3, 6
    G = 4 * H

    def leaf(*shape, scale=1.0, positive=False):
        t = torch.rand(*shape, generator=g) + 0.5 if positive else torch.randn(*shape, generator=g) * scale
        return t.requires_grad_()

    weight_ih = leaf(G, I, scale=0.5) if variant == "input_norm_projected" else None
    first = leaf(T, B, I) if weight_ih is not None else leaf(T, B, G)
    gamma_x, bias = (leaf(G, positive=True), leaf(G)) if variant != "input_term" else (None, None)
    args = (
        first, leaf(B, H), leaf(B, H), leaf(G, H, scale=0.3), leaf(G, positive=True), leaf(H, positive=True),
        leaf(H), gamma_x, bias, weight_ih, 1e-5, 1e-4, True,
    )  # fmt: skip
    torch.library.opcheck(native._recurrence_op, args)
    population = (
        first.detach(), torch.randn(B, H), torch.randn(B, H), torch.randn(G, H) * 0.3,
        torch.rand(T, G) + 0.5, torch.randn(T, G), torch.rand(T, G) + 0.5, torch.rand(T, H) + 0.5, torch.randn(T, H),
        None if weight_ih is None else weight_ih.detach(),
    )  # fmt: skip
    torch.library.opcheck(native._population_op, population)


def _imports(path: Path, package: str) -> set[str]:
    """Every bnlstm_lit module a module imports (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == package:  # from bnlstm_lit.nn import native: the submodule
                found.update(f"{package}.{alias.name}" for alias in node.names)
            elif node.module.startswith("bnlstm_lit"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("bnlstm_lit"))
    return found


def test_no_import_cycles_in_nn_and_no_lightning():
    """No module of bnlstm_lit.nn imports (directly or through others) a module that imports it back; nn never
    imports lightning (it is plain PyTorch)."""
    folder = Path(bnlstm_lit.nn.__file__).parent
    modules = {f"bnlstm_lit.nn.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in _imports(path, "bnlstm_lit.nn") if m in modules} for name, path in modules.items()}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m.split(".")[0] in ("lightning", "pytorch_lightning") for m in names), name

    def reaches(start: str, target: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()]:
                if nxt == target:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return False

    cycles = [name for name in graph if reaches(name, name)]
    assert not cycles, {name: sorted(graph[name]) for name in cycles}
    # the leaves never import the layer or the dispatcher
    for leaf in ("reference", "eager", "native", "plain"):
        assert not graph[f"bnlstm_lit.nn.{leaf}"] & {"bnlstm_lit.nn.layer", "bnlstm_lit.nn.dispatch"}, leaf


def test_importing_the_package_imports_neither_dynamo_nor_triton():
    """Start-up time: torch._dynamo (about 2 s) and triton (about 0.4 s) load only when used (torch.compile, the
    Triton path on CUDA), not when bnlstm_lit.nn is imported (lightning itself imports both)."""
    import subprocess
    import sys

    code = "import sys, bnlstm_lit.nn; print(sorted({'torch._dynamo', 'triton'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
