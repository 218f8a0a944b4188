"""asv benchmarks of the data-movement routines on the CPU backends, beside their peers.

Shapes (see pagedkv.tools.bench): decode = 64 tokens, prefill = 8192 tokens; H=8,
D=128, block_size=16, one layer of 1024 blocks, both layouts.

- ``Routines.time_*``: seconds per call, validation included.
- ``Peers.time_*``: numpy fancy indexing and torch CPU indexing on the same pool.
- ``CopyLimit.time_copy``: each contiguous copy of the same bytes (the fastest is the copy limit).
- ``Bandwidth.track_*``: GB/s and the ratios the targets are stated in,
  each measured against its peer in the same process.
- ``DecodeCallOverhead.track_call_over_kernel``: a decode step's calls at B=64 over
  their bare kernels.
"""

import pagedkv
from pagedkv.tools import bench as B

from . import decode_calls, harness

LAYOUTS = ["NHD", "HND"]
SHAPES = list(B.SHAPES)


def _backend(name):
    try:
        return pagedkv.get_backend(name)
    except pagedkv.BackendUnavailableError as e:
        raise NotImplementedError(str(e)) from e  # asv: skip


class Routines:
    params = (["numpy", "numba"], LAYOUTS, SHAPES)
    param_names = ["backend", "layout", "shape"]
    timeout = 600

    def setup(self, backend, layout, shape):
        b = _backend(backend)
        w = B.make_workload(shape, layout)
        self.calls = {r: B.backend_call(b, w, r) for r in B.ROUTINES}
        for call in self.calls.values():
            call()  # compile outside the timing

    def time_write(self, *_):
        self.calls["write"]()

    def time_read(self, *_):
        self.calls["read"]()

    def time_gather(self, *_):
        self.calls["gather"]()

    def time_gather_out(self, *_):
        self.calls["gather_out"]()

    def time_copy_blocks(self, *_):
        self.calls["copy_blocks"]()

    def time_swap_blocks(self, *_):
        self.calls["swap_blocks"]()


class Peers:
    params = (["numpy-fancy", "torch"], LAYOUTS, SHAPES)
    param_names = ["peer", "layout", "shape"]
    timeout = 600

    def setup(self, peer, layout, shape):
        w = B.make_workload(shape, layout)
        make = B.numpy_peer if peer == "numpy-fancy" else B.torch_peer
        self.calls = {r: make(w, r) for r in B.PEER_ROUTINES}
        if None in self.calls.values():
            raise NotImplementedError("torch is not installed")

    def time_write(self, *_):
        self.calls["write"]()

    def time_gather(self, *_):
        self.calls["gather"]()

    def time_copy_blocks(self, *_):
        self.calls["copy_blocks"]()


class CopyLimit:
    params = (["numpy", "numba", "numba streaming", "torch"], ["write", "copy_blocks"], SHAPES)
    param_names = ["copy", "bytes_of", "shape"]

    def setup(self, copy, bytes_of, shape):
        w = B.make_workload(shape)
        copies = B.contiguous_copies(B.bytes_moved(w, bytes_of))
        if copy not in copies:
            raise NotImplementedError(f"{copy} is not installed")
        self.copy = copies[copy]

    def time_copy(self, *_):
        self.copy()


class Bandwidth:
    """GB/s of the numba backend, and its ratios to the targets' yardsticks, in one process."""

    params = (B.PEER_ROUTINES, LAYOUTS, SHAPES)
    param_names = ["routine", "layout", "shape"]
    timeout = 600
    number = 1
    repeat = 1

    def setup(self, routine, layout, shape):
        _backend("numba")
        self.m = harness.measure(routine, layout, shape)

    def track_gbps(self, *_):
        return self.m["gbps"]

    track_gbps.unit = "GB/s"

    def track_ratio_to_copy(self, *_):
        return self.m["vs_copy"]

    track_ratio_to_copy.unit = "x copy"

    def track_ratio_to_copy_out(self, routine, *_):
        """gather into ``out=`` buffers over the copy limit."""
        if routine != "gather":
            raise NotImplementedError("only gather takes out=")
        return self.m["vs_copy_out"]

    track_ratio_to_copy_out.unit = "x copy"

    def track_ratio_to_copy_into_new(self, routine, *_):
        """gather's new outputs over a copy into new memory (both pay its page faults)."""
        if routine != "gather":
            raise NotImplementedError("only gather returns new outputs")
        return self.m["vs_new_copy"]

    track_ratio_to_copy_into_new.unit = "x copy"

    def track_ratio_to_torch(self, *_):
        if self.m["vs_torch"] is None:
            raise NotImplementedError("torch is not installed")
        return self.m["vs_torch"]

    track_ratio_to_torch.unit = "x torch"

    def track_ratio_to_reference(self, *_):
        return self.m["vs_numpy"]

    track_ratio_to_reference.unit = "x numpy"

    def track_call_over_kernel(self, *_):
        return self.m["call_over_kernel"]

    track_call_over_kernel.unit = "call / kernel"


class DecodeCallOverhead:
    """A decode step's calls at B=64 (numba) over their bare kernels, interleaved in one process
    (target: within 1.5x); see :mod:`benchmarks.decode_calls`."""

    params = (list(decode_calls.CALLS), LAYOUTS, [16, 256])
    param_names = ["call", "layout", "context"]
    timeout = 600
    number = 1
    repeat = 1

    def setup(self, call, layout, context):
        _backend("numba")
        self.ratio = decode_calls.call_over_kernel(call, layout, context)

    def track_call_over_kernel(self, *_):
        return self.ratio

    track_call_over_kernel.unit = "call / kernel"
