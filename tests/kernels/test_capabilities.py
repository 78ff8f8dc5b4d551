"""kernels/capabilities.py: what the memory plan may count on the fast path to recompute.

See harness.py for how the kernels run without a GPU (Triton's interpreter)."""

from __future__ import annotations

import copy

import pytest
from harness import HAS_TRITON, _kernel_env, needs_triton, tiny_decoder  # noqa: F401 (_kernel_env: a fixture)

if HAS_TRITON:
    from snuggle.kernels import apply_fast_path

pytestmark = pytest.mark.usefixtures("single_thread", "_kernel_env")


@needs_triton
def test_memory_plan_takes_the_fast_paths_elementwise_savings_first():
    from snuggle.train.memory import apply_memory_plan, plan_for_model

    ref = tiny_decoder(tie=False, seed=1)
    fast = copy.deepcopy(ref)
    apply_fast_path(fast)
    roomy = plan_for_model(fast, 2, 64, 80.0)
    assert (roomy.checkpoint_layers, roomy.recompute_product, roomy.recompute_norm) == (0, False, False)
    just_below = roomy.predicted_gib - 1e-9  # "nothing" no longer fits
    plan = plan_for_model(fast, 2, 64, just_below)
    assert (plan.checkpoint_layers, plan.recompute_product, plan.recompute_norm) == (0, True, False)
    plan = plan_for_model(fast, 2, 64, plan.predicted_gib - 1e-9)  # nor the product alone
    assert (plan.checkpoint_layers, plan.recompute_product, plan.recompute_norm) == (0, True, True)
    apply_memory_plan(fast, plan)
    assert all(b.recompute_norm and b.mlp.recompute_product for b in fast.model.layers)
    # the reference model has neither: the same budget costs a recomputed block
    plan = plan_for_model(ref, 2, 64, just_below)
    assert plan.checkpoint_layers > 0 and not (plan.recompute_product or plan.recompute_norm)


@needs_triton
def test_memory_plan_counts_no_kernel_savings_where_the_kernels_fall_back(monkeypatch):
    """A model on the CPU of a GPU machine has the fast path swapped in, but each swap point runs the
    reference beneath it (no Triton for CPU tensors without the interpreter), which keeps the SwiGLU
    product and the norms' outputs: the plan must not count those savings there."""
    from snuggle.train.memory import plan_for_model

    fast = tiny_decoder(tie=False, seed=1)
    apply_fast_path(fast)
    roomy = plan_for_model(fast, 2, 64, 80.0)
    plan = plan_for_model(fast, 2, 64, roomy.predicted_gib - 1e-9)
    assert plan.recompute_product and plan.checkpoint_layers == 0  # the kernels run (interpreter)
    # as on a GPU machine: triton importable, the fast path swapped in, the model on the CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan = plan_for_model(copy.deepcopy(fast).cpu(), 2, 64, roomy.predicted_gib - 1e-9)
    assert plan.checkpoint_layers > 0 and not (plan.recompute_product or plan.recompute_norm)
