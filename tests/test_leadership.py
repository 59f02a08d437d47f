"""The write fence: a replica writes only while its Lease is fresh (promptpipe_operator/leader/write_fence.py)."""

from __future__ import annotations

import time

import pytest

from promptpipe_operator.leader.write_fence import Leadership, NotLeading


def test_without_leader_election_every_write_is_allowed() -> None:
    Leadership().check()


def test_a_leader_writes_only_within_the_renew_deadline_of_its_last_renewal() -> None:
    fence = Leadership()
    fence.elect(0.5)
    with pytest.raises(NotLeading):
        fence.check()  # elected, never renewed
    fence.renewed()
    fence.check()
    time.sleep(0.6)  # no renewal within the deadline: the Lease may be someone else's soon
    with pytest.raises(NotLeading, match=r"renewed more than 0\.5s ago"):
        fence.check()
    fence.renewed()
    fence.check()
    fence.lose()
    fence.renewed()  # a late renewal does not undo a loss: the process is on its way out
    with pytest.raises(NotLeading, match="lost the Lease"):
        fence.check()
