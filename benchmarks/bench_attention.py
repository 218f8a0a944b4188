"""asv: decode paged attention (B=32, context 2048, Hq=32, H=8, D=128, block_size=16, blocks in
random order) on the CPU backends, beside torch CPU scaled_dot_product_attention on a dense
contiguous copy of the same K/V and the copy-bandwidth limit.

Targets: numba reads K/V at >= 0.7x the contiguous-copy bandwidth, and is at least
as fast as torch SDPA on the dense copy."""

import pagedkv

from . import harness as B


class DecodeAttention:
    params = (["numpy", "numba"], ["NHD", "HND"])
    param_names = ["backend", "layout"]
    timeout = 900

    def setup(self, backend, layout):
        if backend == "numpy":  # the float64 reference at this size takes seconds: a smaller batch
            self.w = B.make_attention_workload(batch=4, layout=layout)
        else:
            self.w = B.make_attention_workload(layout=layout)
        self.call = B.attention_call(pagedkv.get_backend(backend), self.w)
        self.call()

    def time_paged_attention(self, *_):
        self.call()


class TorchSDPA:
    timeout = 900

    def setup(self):
        self.call = B.torch_sdpa(B.make_attention_workload())
        if self.call is None:
            raise NotImplementedError("torch is not installed")

    def time_dense_sdpa(self):
        self.call()


class AttentionRatios:
    params = [["NHD", "HND"]]
    param_names = ["layout"]
    number = 1
    repeat = 1
    timeout = 900

    def setup(self, layout):
        self.m = B.measure_attention(layout)

    def track_gbps(self, layout):
        return self.m["gbps"]

    track_gbps.unit = "GB/s of K/V"

    def track_ratio_to_copy(self, layout):
        return self.m["vs_copy"]

    track_ratio_to_copy.unit = "x copy (target >= 0.7)"

    def track_ratio_to_torch_sdpa(self, layout):
        if self.m["vs_torch_sdpa"] is None:
            raise NotImplementedError("torch is not installed")
        return self.m["vs_torch_sdpa"]

    track_ratio_to_torch_sdpa.unit = "x torch SDPA (target >= 1)"


class FormatAttention:
    """Decode attention over a narrow pool against the same over float32 (targets:
    bfloat16 >= 1.6x the tokens/s of float32, fp8 and int8 >= 2.5x)."""

    params = [["float16", "bfloat16", "fp8_e4m3", "fp8_e5m2", "int8"]]
    param_names = ["dtype"]
    number = 1
    repeat = 1
    timeout = 900

    def setup(self, dtype):
        self.m = B.measure_format_attention(dtype)

    def track_tokens_per_second_vs_float32(self, dtype):
        return self.m["vs_float32"]

    track_tokens_per_second_vs_float32.unit = "x float32 tokens/s"


class FormatRoutines:
    """write / gather / copy_blocks at the prefill shape on narrow pools, against a contiguous copy of
    the same stored bytes (target: >= 0.8x)."""

    params = (["write", "gather", "copy_blocks"], ["bfloat16", "fp8_e4m3", "int8"])
    param_names = ["routine", "dtype"]
    number = 1
    repeat = 1
    timeout = 600

    def setup(self, routine, dtype):
        self.m = B.measure_format_routine(routine, dtype)

    def track_ratio_to_copy(self, *_):
        return self.m["vs_copy"]

    track_ratio_to_copy.unit = "x copy of the stored bytes"


class AttentionScaling:
    """Decode attention (numba, B=2, Hq=32, H=8, D=128) against the number of threads and the
    context length, as tokens/s of context read and as a ratio to the copy bandwidth measured in
    the same run (target: >= 0.8x at every context >= 1k)."""

    params = ([1, 2], [512, 2048, 8192, 32768])
    param_names = ["threads", "context"]
    number = 1
    repeat = 1
    timeout = 900

    def setup(self, threads, context):
        import numba

        if threads > numba.config.NUMBA_NUM_THREADS:
            raise NotImplementedError(f"this machine runs numba with {numba.config.NUMBA_NUM_THREADS} threads")
        w = B.make_attention_workload(batch=2, context=context)
        call = B.attention_call(pagedkv.get_backend("numba"), w)
        before = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            self.seconds = B.median_seconds(call, repeat=5)
        finally:
            numba.set_num_threads(before)
        self.tokens = 2 * context
        self.copy_seconds = B.copy_limit_seconds(w.kv_bytes * 2)  # a copy reading as many bytes (and writing them)

    def track_context_tokens_per_second(self, threads, context):
        return self.tokens / self.seconds

    track_context_tokens_per_second.unit = "context tokens read per second"

    def track_ratio_to_copy(self, threads, context):
        return self.copy_seconds / self.seconds

    track_ratio_to_copy.unit = "x copy (target >= 0.8 for context >= 1k)"


class PrefillAttention:
    """Causal prefill of 2,048 tokens (Hq=32, H=8, D=128) in tiles: against
    torch's scaled_dot_product_attention(is_causal=True) on a dense copy; target >= 1.0."""

    number = 1
    repeat = 1
    timeout = 300

    def setup(self):
        self.m = B.measure_prefill()

    def track_ratio_to_torch_sdpa(self):
        if self.m["vs_torch_sdpa"] is None:
            raise NotImplementedError("torch is not installed")
        return self.m["vs_torch_sdpa"]

    track_ratio_to_torch_sdpa.unit = "x torch SDPA (target >= 1)"

