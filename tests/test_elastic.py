"""World-size-free batches and the NCCL settings for GPUs without peer-to-peer; no GPU, no process group.

The multi-process behaviour (restarts, a job shrinking from 2 processes to 1) is in test_distributed.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from snuggle.config import load_config
from snuggle.data import grad_accum_for
from snuggle.errors import SnuggleError
from snuggle.train.gpu_link import configure_nccl_link, nccl_link_settings
from snuggle.train.loop import grad_accum_for_config

REQUIRED = ["model.path=/models/tiny", "data.train=corpus.jsonl"]


@pytest.mark.parametrize(("world", "accum"), [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_a_global_batch_keeps_its_size_on_any_world_that_divides_it(world, accum):
    assert grad_accum_for(16, 2, world, "train.global_batch=16") == accum


def test_a_global_batch_the_world_cannot_divide_is_one_line_naming_what_fits():
    with pytest.raises(SnuggleError) as ei:
        grad_accum_for(12, 2, 4, "train.global_batch=12")
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("train.global_batch=12 (12 rows a step) is not a multiple of 4 processes x")
    assert "run on 1, 2, 3, 6 processes" in msg


def test_global_batch_tokens_count_rows_of_seq_len():
    cfg = load_config(
        None, [*REQUIRED, "data.seq_len=16", "train.batch_size=2", "train.global_batch_tokens=128"]
    )
    assert [grad_accum_for_config(cfg, w) for w in (1, 2, 4)] == [4, 2, 1]
    plain = load_config(None, [*REQUIRED, "train.grad_accum=3"])
    assert grad_accum_for_config(plain, 5) == 3  # without a global batch, grad_accum is as given


# --- GPUs without peer-to-peer ----------------------------------------------------------------------


def peers(blocked: set[tuple[int, int]]):
    return lambda i, j: (i, j) not in blocked and (j, i) not in blocked


def test_gpus_with_peer_access_need_nothing():
    to_set, line = nccl_link_settings(["NVIDIA H100 80GB HBM3"] * 4, peers(set()), {}, single_node=True)
    assert to_set == {}
    assert line == "GPU link: peer-to-peer between the 4 local GPUs"


def test_one_gpu_has_no_link():
    assert nccl_link_settings(["NVIDIA GeForce RTX 4090"], peers(set()), {}, single_node=True) == ({}, "")


def test_missing_peer_access_disables_p2p_and_infiniband_on_one_machine():
    names = ["NVIDIA GeForce RTX 3090"] * 3
    to_set, line = nccl_link_settings(names, peers({(0, 2), (1, 2)}), {}, single_node=True)
    assert to_set == {"NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"}
    assert line == (
        "GPU link: no peer-to-peer between GPUs 0 and 2 and 1 more pairs: through host memory, "
        "NCCL_P2P_DISABLE=1, NCCL_IB_DISABLE=1"
    )


def test_rtx_40_cards_are_treated_as_without_p2p_whatever_the_driver_reports():
    """Drivers before 550.40.07 report peer access on RTX 40 cards that cannot do it."""
    names = ["NVIDIA GeForce RTX 4090"] * 2
    to_set, line = nccl_link_settings(names, peers(set()), {}, single_node=True)
    assert to_set == {"NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"}
    assert line.startswith("GPU link: NVIDIA GeForce RTX 4090 (no peer-to-peer): through host memory")


def test_several_nodes_keep_infiniband_and_the_users_settings_stand():
    names = ["NVIDIA GeForce RTX 4090"] * 2
    to_set, line = nccl_link_settings(names, peers({(0, 1)}), {}, single_node=False)
    assert to_set == {"NCCL_P2P_DISABLE": "1"}  # InfiniBand is how the nodes talk
    to_set, line = nccl_link_settings(names, peers({(0, 1)}), {"NCCL_P2P_DISABLE": "0"}, single_node=True)
    assert to_set == {"NCCL_IB_DISABLE": "1"}
    assert "NCCL_P2P_DISABLE=0 (yours), NCCL_IB_DISABLE=1" in line


def test_the_peer_query_is_asked_both_ways():
    asked = []

    def one_way(i, j):
        asked.append((i, j))
        return (i, j) != (1, 0)

    to_set, _ = nccl_link_settings(["A", "B"], one_way, {}, single_node=True)
    assert to_set and set(asked) == {(0, 1), (1, 0)}


def test_configure_sets_the_process_environment_from_the_driver_query(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA GeForce RTX 3080")
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda i, j: False)
    monkeypatch.delenv("NCCL_P2P_DISABLE", raising=False)
    monkeypatch.setenv("NCCL_IB_DISABLE", "0")
    line = configure_nccl_link(single_node=True)
    assert os.environ["NCCL_P2P_DISABLE"] == "1" and os.environ["NCCL_IB_DISABLE"] == "0"
    assert line.endswith("NCCL_P2P_DISABLE=1, NCCL_IB_DISABLE=0 (yours)")


def test_a_torchrun_job_with_restarts_needs_resume(monkeypatch):
    """Under `torchrun --max-restarts`, resume=false would make each restarted worker refuse its own run."""
    from snuggle.train.loop import _check_restartable

    cfg = load_config(None, REQUIRED)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    _check_restartable(cfg.train)  # no restarts: nothing to continue
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    with pytest.raises(
        SnuggleError, match=r"--max-restarts 3\), but train.resume=false .* set train.resume=auto"
    ):
        _check_restartable(cfg.train)
    _check_restartable(load_config(None, [*REQUIRED, "train.resume=auto"]).train)
