"""asv: the block manager's cost per decode step, beside the K/V write it prepares.

Target: bookkeeping for one decode step of 256 running sequences
(slot mapping, block tables, context lengths) costs less than writing that
step's K/V for a single layer (H=8, D=128) with the numpy backend; with two
layer groups (full, and a sliding window of 256), too. And the
memory a Gemma-3-shaped cache saves by freeing what leaves the windows.
"""

from . import harness as B

GROUPS = {"one": (None,), "two": (None, 256)}  # layer groups: full; full and a sliding window of 256


class DecodeStep:
    params = [[32, 256], list(GROUPS)]
    param_names = ["sequences", "groups"]

    def setup(self, sequences, groups):
        self.step = B.DecodeStep(sequences, windows=GROUPS[groups])

    def time_bookkeeping(self, sequences, groups):
        self.step()


class BookkeepingRatio:
    number = 1
    repeat = 1
    params = [list(GROUPS)]
    param_names = ["groups"]

    def setup(self, groups):
        self.m = B.bookkeeping_vs_write(256, GROUPS[groups])

    def track_bookkeeping_over_numpy_write(self, groups):
        return self.m["ratio"]

    track_bookkeeping_over_numpy_write.unit = "ratio (target < 1)"


class WindowMemory:
    """One 32k-token sequence in a Gemma-3-shaped cache: 5 layers with a window of 1024, 1 full."""

    number = 1
    repeat = 1

    def setup(self):
        self.m = B.window_memory()

    def track_share_of_kv_memory_saved(self):
        return self.m["saved"]

    track_share_of_kv_memory_saved.unit = "share of the blocks kept without window freeing"
