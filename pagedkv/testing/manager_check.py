"""A model checker for anyone's block manager: :func:`check_block_manager`.

Adapt your manager to :class:`ManagerAdapter` (a dozen lines), and a hypothesis
state machine drives it, writing each token's K/V (a value derived from the
token and everything before it) at the slots your manager hands out, into a
pool of your manager's geometry, then reads every live sequence back through
its block table after every step and compares with a dense shadow model. A
block shared without copy-on-write, a stale or colliding prefix-cache entry
served as a hit, a block freed twice and handed out twice: each shows up as a
sequence that reads back someone else's K/V, and the failure names the
sequence, the position and the rule sequence that led there (shrunk).

It also checks: a prefix hit leaves at least the prompt's last token to compute
(nano-vllm #144); an allocation that fails leaves the free count as it was
(no leaked blocks, seeds 000 and 003); freeing a sequence twice is refused.

:data:`SCENARIOS` replays the bug classes peers have shipped as named, fixed
scenarios (:func:`run_scenario`), so a regression names itself.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import numpy as np
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule


class ManagerAdapter(Protocol):
    """What the checker needs of a block manager (``out_of_blocks``: the exception types it
    raises when the pool is full; ``prefix_caching``: whether ``add`` may find a cached prefix)."""

    block_size: int
    num_blocks: int
    out_of_blocks: tuple[type[BaseException], ...]

    def add(self, seq_id: Hashable, prompt: list[int]) -> int:
        """Start a sequence for ``prompt``; return how many of its first tokens it holds
        already (a cached prefix; 0 without prefix caching). It then gets the rest by append."""

    def append(self, seq_id: Hashable, token_ids: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Room for these new tokens: their slots, and the ``(src, dst)`` block copies to make
        first (copy-on-write; ``[]`` if it never shares a written block)."""

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """A new sequence sharing ``parent``'s tokens (raise NotImplementedError if unsupported)."""

    def free(self, seq_id: Hashable) -> None:
        """End a sequence (an unknown or freed one: raise)."""

    def truncate(self, seq_id: Hashable, new_len: int) -> None:
        """Keep the first ``new_len`` tokens (raise NotImplementedError if unsupported)."""

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The sequence's blocks, in token order."""

    def num_free(self) -> int:
        """Blocks an allocation could take now."""


def token_value(prefix: Sequence[int]) -> float:
    """The K/V the checker writes for the last token of ``prefix``: a function of all of it."""
    return float(zlib.crc32(repr(tuple(prefix)).encode()) % 1_000_003)


class BlockManagerMismatch(AssertionError):
    """The manager broke a rule; the message says which, for which sequence."""


class ManagerMachine(RuleBasedStateMachine):
    """Drives an adapter (from ``factory``) against a dense shadow; see the module docstring."""

    factory: Callable[[], ManagerAdapter]

    @initialize()
    def setup(self) -> None:
        self.m = self.factory()
        self.pool = np.full((self.m.num_blocks, self.m.block_size), np.nan)  # one number per token
        self.shadow: dict[int, list[int]] = {}  # live sequence -> its tokens
        self.freed: list[int] = []
        self.next_id = 0

    # -- helpers ---------------------------------------------------------------------------

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def write_tokens(self, seq: int, tokens: list[int]) -> bool:
        """Append ``tokens`` to ``seq`` and write their values; False if the pool was full."""
        before = (self.m.num_free(), {s: self.m.block_table(s) for s in self.shadow})
        try:
            slots, copies = self.m.append(seq, list(tokens))
        except self.m.out_of_blocks:
            after = (self.m.num_free(), {s: self.m.block_table(s) for s in self.shadow})
            if after[0] < before[0]:  # (more free blocks is fine: held copy sources may go back)
                raise BlockManagerMismatch(f"a failed allocation leaked blocks: {before[0]} free before, "
                                           f"{after[0]} after") from None
            if after[1] != before[1]:
                raise BlockManagerMismatch("a failed allocation changed block tables") from None
            return False
        if len(slots) != len(tokens):
            raise BlockManagerMismatch(f"sequence {seq}: {len(slots)} slots for {len(tokens)} tokens")
        for src, dst in copies:
            self.pool[dst] = self.pool[src]
        held = self.shadow[seq]
        for slot, tok in zip(slots, tokens, strict=True):
            held.append(tok)
            b, p = divmod(int(slot), self.m.block_size)
            self.pool[b, p] = token_value(held)
        return True

    def _pick(self, data) -> int:
        return data.draw(st.sampled_from(sorted(self.shadow)), label="sequence")

    # -- rules -----------------------------------------------------------------------------

    @rule(prompt=st.lists(st.integers(0, 5), min_size=1, max_size=12))
    def add(self, prompt: list[int]) -> None:
        seq = self._new_id()
        cached = self.m.add(seq, list(prompt))
        if not 0 <= cached < len(prompt):
            raise BlockManagerMismatch(f"sequence {seq}: {cached} of its {len(prompt)} prompt tokens came from the "
                                       "cache; at least the last must be left to compute (nano-vllm #144)")
        self.shadow[seq] = list(prompt[:cached])
        self._check_sequence(seq)  # a cached prefix must hold this prompt's own K/V
        if not self.write_tokens(seq, prompt[cached:]):
            self.m.free(seq)
            del self.shadow[seq]

    @precondition(lambda self: self.shadow)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 5), min_size=1, max_size=6))
    def append(self, data, tokens: list[int]) -> None:
        self.write_tokens(self._pick(data), tokens)

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent, child = self._pick(data), self._new_id()
        try:
            self.m.fork(parent, child)
        except NotImplementedError:
            return
        except self.m.out_of_blocks:
            return
        self.shadow[child] = list(self.shadow[parent])

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def truncate(self, data) -> None:
        seq = self._pick(data)
        new_len = data.draw(st.integers(0, len(self.shadow[seq])), label="new_len")
        try:
            self.m.truncate(seq, new_len)
        except NotImplementedError:
            return
        del self.shadow[seq][new_len:]

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def free(self, data) -> None:
        seq = self._pick(data)
        self.m.free(seq)
        del self.shadow[seq]
        self.freed.append(seq)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def free_again(self, data) -> None:
        seq = data.draw(st.sampled_from(self.freed), label="freed sequence")
        free_before = self.m.num_free()
        try:
            self.m.free(seq)
        except Exception:  # refused: right
            pass
        else:
            raise BlockManagerMismatch(f"sequence {seq} was freed twice without an error")
        if self.m.num_free() != free_before:
            raise BlockManagerMismatch(f"a refused second free of sequence {seq} changed the free blocks")

    # -- after every rule ------------------------------------------------------------------

    def _check_sequence(self, seq: int) -> None:
        tokens, table, bs = self.shadow[seq], self.m.block_table(seq), self.m.block_size
        if len(table) < -(-len(tokens) // bs):
            raise BlockManagerMismatch(f"sequence {seq} holds {len(tokens)} tokens in {len(table)} blocks")
        for pos in range(len(tokens)):
            got = self.pool[table[pos // bs], pos % bs]
            want = token_value(tokens[:pos + 1])
            if got != want:
                raise BlockManagerMismatch(
                    f"sequence {seq}, position {pos} (block {table[pos // bs]}): reads K/V {got}, its own is {want}: "
                    "another sequence's tokens (a block shared without copy-on-write, a stale or colliding "
                    "cache entry, a block handed out twice)")

    @invariant()
    def every_sequence_reads_back_its_own_tokens(self) -> None:
        if hasattr(self, "m"):
            for seq in self.shadow:
                self._check_sequence(seq)


def check_block_manager(factory: Callable[[], ManagerAdapter], *, max_examples: int = 200,
                        steps: int = 40, shrink: bool = True) -> None:
    """Drive fresh adapters from ``factory`` with random rule sequences (hypothesis shrinks a
    failure to the shortest, unless ``shrink=False``); raise :class:`BlockManagerMismatch` at
    the first broken rule."""
    machine: Any = type("Machine", (ManagerMachine,), {"factory": staticmethod(factory)})
    test = machine.TestCase
    test.settings = settings(max_examples=max_examples, stateful_step_count=steps, deadline=None,
                             database=None, derandomize=True, report_multiple_bugs=False,
                             phases=list(Phase) if shrink else [p for p in Phase if p is not Phase.shrink],
                             suppress_health_check=list(HealthCheck))
    test("runTest").runTest()


# ---- named scenarios: the bug classes peers have shipped ----------------------------------------

def _run(factory: Callable[[], ManagerAdapter], steps: list[tuple[str, Any]]) -> None:
    machine = type("Machine", (ManagerMachine,), {"factory": staticmethod(factory)})()
    machine.setup()
    for name, arg in steps:
        if name == "add":
            machine.add(arg)
        elif name == "append":
            seq, tokens = arg
            machine.write_tokens(seq, tokens)
        elif name == "fork":
            parent, child = arg
            machine.m.fork(parent, child)
            machine.shadow[child] = list(machine.shadow[parent])
            machine.next_id = max(machine.next_id, child)
        elif name == "free":
            machine.m.free(arg)
            del machine.shadow[arg]
            machine.freed.append(arg)
        machine.every_sequence_reads_back_its_own_tokens()


#: name -> what it replays; for an adapter whose pool is small (4 to 8 blocks of 2 tokens), so
#: that freed blocks are soon handed out again
SCENARIOS: dict[str, Callable[[Callable[[], ManagerAdapter]], None]] = {
    # nano-vllm #163: a prompt's cached block is freed, reallocated and overwritten, then served again
    "stale_hash_after_reallocation": lambda f: _run(f, [("add", [1, 2, 3, 4, 5]), ("free", 1),
                                                        ("add", [9] * 5), ("free", 2), ("add", [8] * 5), ("free", 3),
                                                        ("add", [7] * 5), ("free", 4), ("add", [1, 2, 3, 4, 5])]),
    # nano-vllm #144: a prompt wholly cached must still leave its last token to compute
    "full_prefix_hit": lambda f: _run(f, [("add", [1, 2, 3, 4]), ("add", [1, 2, 3, 4])]),
    # openvino.genai #3722: two prompts whose blocks a weak hash confuses (same tokens, other order)
    "hash_collision": lambda f: _run(f, [("add", [1, 2, 3, 4, 5]), ("add", [2, 1, 4, 3, 5])]),
    # seeds 000 and 003: an allocation that fails halfway leaks the blocks it took
    "leak_on_failed_allocation": lambda f: _run(f, [("add", [7] * 3), ("append", (1, [7] * 1000))]),
    # a shared block written in place: the fork reads its parent's new token
    "write_without_copy_on_write": lambda f: _run(f, [("add", [1, 2, 3]), ("fork", (1, 50)),
                                                      ("append", (1, [4])), ("append", (50, [5]))]),
}


def run_scenario(name: str, factory: Callable[[], ManagerAdapter]) -> None:
    """Replay one of :data:`SCENARIOS` (raises :class:`BlockManagerMismatch` if the manager has
    that bug). The double free is covered by :func:`check_block_manager`'s ``free_again`` rule."""
    SCENARIOS[name](factory)
