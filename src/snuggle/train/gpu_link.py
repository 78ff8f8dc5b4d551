"""How the GPUs of one machine reach each other, and the NCCL settings that follow from it.

NCCL moves data between two GPUs of a machine by peer-to-peer (P2P) copies over PCIe or NVLink when
the driver allows it. GeForce cards do not: an RTX 4090 has no P2P, and drivers before 550.40.07 still
report it for the RTX 40 series, so NCCL tries it and hangs or corrupts transfers. Without P2P, NCCL
must be told to stage through host memory (`NCCL_P2P_DISABLE=1`); on a single machine it should also
not probe InfiniBand / RoCE adapters as a way between its own GPUs (`NCCL_IB_DISABLE=1`). A multi-node
job keeps InfiniBand: that is how its nodes talk. This is what accelerate's launcher sets on such
cards; a value the user set is never changed.

`nccl_link_settings` is pure (names, a peer-access query and the environment in; settings and the
line out) so that it is tested without GPUs; `configure_nccl_link` applies it to this process before
the process group starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

__all__ = ["configure_nccl_link", "nccl_link_settings"]

# GeForce RTX 40 cards: no P2P, but drivers before 550.40.07 report it (accelerate's list)
_FALSE_PEER_ACCESS = ("RTX 40",)


def _missing_pairs(n: int, can_access: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """Pairs i < j of local GPUs where either cannot reach the other's memory directly."""
    return [(i, j) for i in range(n) for j in range(i + 1, n) if not (can_access(i, j) and can_access(j, i))]


def nccl_link_settings(
    names: Sequence[str],
    can_access: Callable[[int, int], bool],
    environ: Mapping[str, str],
    single_node: bool,
) -> tuple[dict[str, str], str]:
    """(the NCCL variables to set, the link as the plan line says it) for these local GPUs.

    `names` are the local GPUs' names (torch.cuda.get_device_name), `can_access(i, j)` the driver's
    peer-access answer. One GPU (or none) has no link to speak of: ({}, "").
    """
    if len(names) < 2:
        return {}, ""
    missing = _missing_pairs(len(names), can_access)
    false_p2p = sorted({n for n in names if any(k in n for k in _FALSE_PEER_ACCESS)})
    if not missing and not false_p2p:
        return {}, f"GPU link: peer-to-peer between the {len(names)} local GPUs"
    why = (
        f"{', '.join(false_p2p)} (no peer-to-peer)"
        if false_p2p
        else f"no peer-to-peer between GPUs {missing[0][0]} and {missing[0][1]}"
        + (f" and {len(missing) - 1} more pairs" if len(missing) > 1 else "")
    )
    wanted = {"NCCL_P2P_DISABLE": "1"}
    if single_node:
        wanted["NCCL_IB_DISABLE"] = "1"
    to_set = {k: v for k, v in wanted.items() if k not in environ}
    told = ", ".join(
        f"{k}={environ.get(k, v)}" + ("" if k in to_set else " (yours)") for k, v in wanted.items()
    )
    return to_set, f"GPU link: {why}: through host memory, {told}"


def configure_nccl_link(single_node: bool) -> str:
    """Set what NCCL needs on this machine's GPUs in this process's environment; returns the line."""
    import torch

    n = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(n)]
    to_set, line = nccl_link_settings(names, torch.cuda.can_device_access_peer, os.environ, single_node)
    os.environ.update(to_set)  # read by NCCL when its communicators start, after this
    return line
