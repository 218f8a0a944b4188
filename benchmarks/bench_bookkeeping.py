"""asv: the block manager's cost per decode step, beside the K/V write it prepares.

Target (issue 3): bookkeeping for one decode step of 256 running sequences
(slot mapping, block tables, context lengths) costs less than writing that
step's K/V for a single layer (H=8, D=128) with the numpy backend.
"""

from . import harness as B


class DecodeStep:
    params = [[32, 256]]
    param_names = ["sequences"]

    def setup(self, sequences):
        self.step = B.DecodeStep(sequences)

    def time_bookkeeping(self, sequences):
        self.step()


class BookkeepingRatio:
    number = 1
    repeat = 1

    def setup(self):
        self.m = B.bookkeeping_vs_write(256)

    def track_bookkeeping_over_numpy_write(self):
        return self.m["ratio"]

    track_bookkeeping_over_numpy_write.unit = "ratio (target < 1)"
