"""asv: the cost of each bookkeeping call does not grow with what it does not touch.

- ``OneTokenAppend``: appending one token to a sequence of 1k to 128k tokens (with and
  without token ids) costs the same, whatever the sequence's length.
- ``PerSequence``: ``append_batch`` (one token each, with and without ids), ``fork`` + ``free``
  and ``block_tables`` cost the same per sequence from B = 64 to B = 4096.

Each ``track_`` value is a median measured in one process (``pagedkv.tools.bench.median_seconds``).
"""

from pagedkv import BlockManager
from pagedkv.tools.bench import median_seconds

BLOCK = 16


class OneTokenAppend:
    params = ([1024, 8192, 32768, 131072], [False, True])
    param_names = ["context", "token_ids"]
    number = 1
    repeat = 1

    def setup(self, context, token_ids):
        m = BlockManager(BLOCK, num_blocks=context // BLOCK + 8)
        seq = m.add_sequence()
        m.append(seq, context, token_ids=list(range(context)) if token_ids else None)
        one = [7] if token_ids else None

        def append_and_roll_back():  # the roll-back keeps the sequence at its length
            m.append(seq, 1, token_ids=one)
            m.truncate(seq, context)

        self.seconds = median_seconds(append_and_roll_back)

    def track_append_one_token_us(self, *_):
        return self.seconds * 1e6

    track_append_one_token_us.unit = "us per append + truncate (flat in context)"


class PerSequence:
    params = (["append_batch", "append_batch_ids", "fork_free", "block_tables"], [64, 512, 4096])
    param_names = ["call", "sequences"]
    number = 1
    repeat = 1
    timeout = 300

    def setup(self, call, sequences):
        m = BlockManager(BLOCK, num_blocks=sequences * 8)
        seqs = [m.add_sequence(prompt_token_ids=list(range(64))) for _ in range(sequences)]
        m.append_batch(seqs, [64] * sequences)
        ones, ids = [1] * sequences, [[5]] * sequences

        def roll_back():
            for s in seqs:
                m.truncate(s, 64)

        def fork_free():
            for child in [m.fork(s) for s in seqs]:
                m.free(child)

        calls = {
            "append_batch": lambda: (m.append_batch(seqs, ones), roll_back()),
            "append_batch_ids": lambda: (m.append_batch(seqs, ones, ids), roll_back()),
            "fork_free": fork_free,
            "block_tables": lambda: m.block_tables(seqs),
        }
        seconds = median_seconds(calls[call], repeat=5)
        if call.startswith("append_batch"):
            seconds -= median_seconds(roll_back, repeat=5)
        self.per_sequence = seconds / sequences

    def track_us_per_sequence(self, *_):
        return self.per_sequence * 1e6

    track_us_per_sequence.unit = "us per sequence (flat in B)"
