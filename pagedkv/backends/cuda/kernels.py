"""The numba.cuda data-movement kernels of the cuda backend (:mod:`pagedkv.backends.cuda` launches
them), and the device helpers that attention (:mod:`pagedkv.backends.cuda.attention`) shares.

Each data-movement kernel gives one thread one element, consecutive threads
consecutive ``d``, so loads and stores are coalesced in both layouts (an element
is one stored number, or an 8-byte word of them where
:mod:`pagedkv.backends.cuda.words` moves words); the
offset arithmetic is :mod:`pagedkv.geometry.layout`'s, compiled as device functions,
with the pool's :class:`~pagedkv.geometry.layout.Strides` passed as one argument ``s``.
"""

from numba import cuda, float32, int64

from ...geometry import layout
from ...geometry.layout import K, V

# ---- device helpers: the layout arithmetic, compiled for the GPU ------------------------------

token_base = cuda.jit(device=True)(layout.token_base)
block_base = cuda.jit(device=True)(layout.block_base)
table_slot = cuda.jit(device=True)(layout.table_slot)
scale_index = cuda.jit(device=True)(layout.scale_index)
window_start = cuda.jit(device=True)(layout.window_start)

#: how load_value turns a stored element into float32: as it is, by table, or times its int8 scale
AS_IS, TABLE, INT8 = 0, 1, 2


@cuda.jit(device=True)
def load_value(data, at, decode, table, scales, si):
    """The float32 value of the stored element ``data[at]``: as it is (float32), looked up in
    ``table`` (a minifloat: every pattern's value, fp8's scale folded in), or times the int8
    scale ``scales[si]`` (see :mod:`pagedkv.backends.cuda.format_kernels`)."""
    if decode == TABLE:
        return table[int64(data[at])]
    if decode == INT8:
        return float32(data[at]) * scales[si]
    return float32(data[at])


@cuda.jit(device=True)
def sequence_of(cu, i):
    """The b with ``cu[b] <= i < cu[b + 1]`` (binary search; skips empty sequences)."""
    lo = 0
    hi = cu.shape[0] - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cu[mid] <= i:
            lo = mid
        else:
            hi = mid
    return lo


@cuda.jit(device=True)
def split_element(i, s):
    """(row, head, dim) of element i of a flat ``[rows, H, D]`` array."""
    row_len = s.num_kv_heads * s.head_dim
    r = i // row_len
    h = (i - r * row_len) // s.head_dim
    return r, h, i - r * row_len - h * s.head_dim


# ---- kernels: one thread per float ------------------------------------------------------------

@cuda.jit
def write_kernel(data, layer, key, value, slots, s):
    """Element i of the flat key/value (token t, head h, dim d) goes to slot ``slots[t]``."""
    i = cuda.grid(1)
    if i >= key.shape[0]:
        return
    t, h, d = split_element(i, s)
    slot = slots[t]
    if slot < 0:  # padding (checked explicitly: a negative index would wrap)
        return
    within = h * s.head_stride + d
    data[token_base(layer, K, slot, s) + within] = key[i]
    data[token_base(layer, V, slot, s) + within] = value[i]


@cuda.jit(device=True)
def _load_pair(data, layer, slot, h, d, out_k, out_v, i, s, decode, k_table, v_table, scales):
    """Element i of the outputs: (head h, dim d) of the token at ``slot``, K and V, as float32."""
    within = h * s.head_stride + d
    out_k[i] = load_value(data, token_base(layer, K, slot, s) + within, decode, k_table, scales,
                          scale_index(layer, K, slot, h, s))
    out_v[i] = load_value(data, token_base(layer, V, slot, s) + within, decode, v_table, scales,
                          scale_index(layer, V, slot, h, s))


@cuda.jit
def read_kernel(data, layer, slots, out_k, out_v, s, decode, k_table, v_table, scales):
    """Element i of the flat outputs is (token t, head h, dim d) of slot ``slots[t]``; 0 for padding."""
    i = cuda.grid(1)
    if i >= out_k.shape[0]:
        return
    t, h, d = split_element(i, s)
    slot = slots[t]
    if slot < 0:
        out_k[i] = 0.0
        out_v[i] = 0.0
        return
    _load_pair(data, layer, slot, h, d, out_k, out_v, i, s, decode, k_table, v_table, scales)


@cuda.jit
def gather_kernel(data, layer, tables, cu, out_k, out_v, s, decode, k_table, v_table, scales):
    """Packed row r (token ``r - cu[b]`` of sequence b), head h, dim d, for element i of the outputs."""
    i = cuda.grid(1)
    if i >= out_k.shape[0]:
        return
    r, h, d = split_element(i, s)
    b = sequence_of(cu, r)
    _load_pair(data, layer, table_slot(tables, b, r - cu[b], s.block_size), h, d, out_k, out_v, i, s, decode,
               k_table, v_table, scales)


@cuda.jit(device=True)
def _packed_offset(i, blocks, s):
    """Pool offset of element i of ``blocks`` packed as ``[N, layers, 2 (K, V), block_stride]``."""
    per_block = s.num_layers * 2 * s.block_stride
    n = i // per_block
    rest = i - n * per_block
    half = rest // s.block_stride  # = layer * 2 + kv
    layer = half // 2
    return block_base(layer, half - layer * 2, blocks[n], s) + rest - half * s.block_stride


@cuda.jit
def move_blocks_kernel(src_data, dst_data, src, dst, s):
    """Element i of the packed copies ``src[n] -> dst[n]`` (every layer, K and V): one thread each."""
    i = cuda.grid(1)
    if i < src.shape[0] * s.num_layers * 2 * s.block_stride:
        dst_data[_packed_offset(i, dst, s)] = src_data[_packed_offset(i, src, s)]


@cuda.jit
def pack_blocks_kernel(data, blocks, packed, s):
    """Copy ``blocks`` of every layer and K/V into ``packed`` [N, layers, 2, block_stride] (flat)."""
    i = cuda.grid(1)
    if i < packed.shape[0]:
        packed[i] = data[_packed_offset(i, blocks, s)]


@cuda.jit
def unpack_blocks_kernel(packed, data, blocks, s):
    """The inverse of :func:`pack_blocks_kernel`."""
    i = cuda.grid(1)
    if i < packed.shape[0]:
        data[_packed_offset(i, blocks, s)] = packed[i]
