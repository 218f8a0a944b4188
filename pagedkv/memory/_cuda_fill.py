"""A one-line CUDA kernel that fills a device array (the pool starts zeroed).

Imported only by :func:`pagedkv.memory.device.zeros`, once numba.cuda is known to
work. It is a module of its own because a kernel must see ``cuda`` as a
module global: that is the name numba's CUDA simulator replaces.
"""

from numba import cuda


@cuda.jit
def fill(data, value):
    """Set every element of the 1-D ``data`` to ``value``: one thread each."""
    i = cuda.grid(1)
    if i < data.shape[0]:
        data[i] = value
