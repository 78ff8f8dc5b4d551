"""DistContext.agreed: every rank reaches the agreement, also the one whose block raised.

A rank that skipped the collective after its own failure would leave the others waiting in it until the
timeout; the world of two ranks here is faked by answering the one all_gather_object of `agree`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from snuggle.errors import SnuggleError
from snuggle.train.parallel import DistContext, RankError


@dataclass
class PeerContext(DistContext):
    """Rank `rank` of two; the peer's message (None: it succeeded) is what the gather returns for it."""

    peer_msg: str | None = None
    gathered: list = field(default_factory=list)

    def all_gather_object(self, obj):
        self.gathered.append(obj)
        return [obj, self.peer_msg] if self.rank == 0 else [self.peer_msg, obj]


def test_one_process_raises_its_own_error_or_nothing():
    ctx = DistContext()
    with ctx.agreed():
        pass
    with pytest.raises(ValueError, match="bad"), ctx.agreed():
        raise ValueError("bad")


def test_convert_maps_the_error_raised():
    ctx = DistContext()
    with (
        pytest.raises(SnuggleError, match="one line: boom"),
        ctx.agreed(lambda e: SnuggleError(f"one line: {e}")),
    ):
        raise RuntimeError("boom")


def test_the_failing_rank_still_joins_the_agreement():
    ctx = PeerContext(world_size=2, rank=1)
    with pytest.raises(RankError, match="no such file"), ctx.agreed():
        raise SnuggleError("no such file")
    assert ctx.gathered == ["no such file"]  # the collective ran on the rank that failed


def test_a_rank_that_succeeded_raises_its_peers_failure():
    ctx = PeerContext(world_size=2, rank=0, peer_msg="out of data")
    with pytest.raises(RankError, match="rank 1: out of data"), ctx.agreed():
        pass
    assert ctx.gathered == [None]
    ok = PeerContext(world_size=2, rank=0)
    with ok.agreed():
        pass
    assert ok.gathered == [None]
