"""The shape of the package, kept by tests: small modules, imports only downward, no reads of
another object's private state, and the per-layer path of a step free of validation and uploads."""

import ast
import pathlib

import numpy as np
import pytest

import pagedkv
from pagedkv import validate

PACKAGE = pathlib.Path(pagedkv.__file__).parent

# Each module may import only modules of a lower rank (the README's "Where things live").
RANKS = {
    "_version": 0, "errors": 0, "layout": 1, "formats": 1, "events": 1, "config": 2, "device": 3, "_cuda_fill": 2,
    "pool": 4,
    "_scan": 4, "conventions": 5, "backends._numba_codecs": 7, "backends._numba_prefill": 7.5,
    "backends._numba_decode": 7.75, "backends._numba_stream": 7.1,
    "validate": 5, "plan": 6, "backends._host": 7, "backends.reference": 8, "backends.numba_cpu": 8,
    "backends.cuda_kernels": 7, "backends.cuda_attention": 7.25, "backends.cuda_words": 7.25,
    "backends.cuda_format_kernels": 7.5, "backends.cuda": 8, "backends": 9,
    "prefix_key": 10, "block_table": 10, "block_pool": 10, "retention": 9, "manager_views": 11.5,
    "prefix_cache": 11, "sequence": 11, "manager": 12, "stored_block": 10.5, "stores": 11, "tiers": 12.5,
    "cache": 13, "model": 14, "testing.tolerance": 14, "testing.strategies": 15, "testing.checkers": 16,
    "testing.compare": 15.5, "testing.verify": 16.5, "testing.manager_check": 15.5, "testing": 17, "demo": 15,
    "bench": 15, "cli": 18, "__main__": 19, "": 20,
    "integrations": 14, "integrations.hf_layers": 13.5, "integrations.hf_identity": 13.5,
    "integrations.transformers": 14, "integrations.hf_attention": 14.5, "integrations.generate": 15,
}
NAMEDTUPLE_API = {"_replace", "_fields", "_asdict", "_make"}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def imported(name: str, path: pathlib.Path):
    """Modules of pagedkv that ``name`` imports (anywhere in it, lazily or not)."""
    parts = [p for p in name.split(".") if p]
    package = parts if path.name == "__init__.py" else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:  # "from . import layout" names a module
                sub = f"{target}.{alias.name}" if target else alias.name
                yield sub if sub in RANKS else target
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for n in names:
                if n == "pagedkv" or n.startswith("pagedkv."):
                    yield n.removeprefix("pagedkv").lstrip(".")


# A module says one idea; past this many lines it has likely grown a second. 500, not the 400 this
# started with: at 400, modules were cut where the count fell rather than between ideas.
MAX_LINES = 500


@pytest.mark.parametrize("name, path", list(modules()), ids=[n or "pagedkv" for n, _ in modules()])
def test_small_modules_that_import_only_downward(name, path):
    assert name in RANKS, f"add {name} to RANKS"
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path} is over {MAX_LINES} lines"
    for target in imported(name, path):
        assert RANKS[target] < RANKS[name], f"{name} imports {target}, which is not below it"


@pytest.mark.parametrize("name, path", list(modules()), ids=[n or "pagedkv" for n, _ in modules()])
def test_no_reads_of_another_objects_private_attributes(name, path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            assert owner in ("self", "cls") or node.attr in NAMEDTUPLE_API, \
                f"{path.name}:{node.lineno} reads {ast.unparse(node)}"


def test_a_decode_step_validates_its_index_arrays_once(backend, monkeypatch):
    """begin_step checks the slot mapping and the block tables once; the layers' write and
    attention calls check nothing of them again and (cuda) upload no index array."""
    counts = {"slot_mapping": 0, "block_tables": 0, "upload": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in ("slot_mapping", "block_tables"):
        monkeypatch.setattr(validate, name, counting(name, getattr(validate, name)))
    if backend.NAME == "cuda":
        monkeypatch.setattr(backend, "_upload", counting("upload", backend._upload))
    config = pagedkv.CacheConfig(num_layers=3, num_kv_heads=2, head_dim=4, num_blocks=8, block_size=2)
    cache = pagedkv.PagedKVCache(config, backend=backend.NAME)
    seqs = [cache.add_sequence().seq_id for _ in range(2)]
    cache.begin_step(seqs, [3, 2])
    step = cache.begin_step(seqs, [1, 1])
    after_plan = dict(counts)
    assert after_plan["slot_mapping"] == after_plan["block_tables"] == 2  # once per begin_step

    rng = np.random.default_rng(0)
    kv, q = rng.standard_normal((2, 2, 4), dtype=np.float32), rng.standard_normal((2, 4, 4), dtype=np.float32)
    if backend.NAME == "cuda":  # K/V and q already on the device, as a model on the GPU has them
        from numba import cuda

        kv, q = cuda.to_device(kv), cuda.to_device(q)
    for layer in range(config.num_layers):
        cache.write(layer, kv, kv, step)
        cache.attention(layer, q, step)
    assert counts == after_plan


def test_a_plan_is_bound_to_its_pools_geometry(backend):
    config = pagedkv.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=4, block_size=2)
    other = pagedkv.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=2, block_size=2)
    pool = pagedkv.KVPool(config, device=backend.DEVICE)
    small = pagedkv.KVPool(other, device=backend.DEVICE)
    plan = backend.plan(pool, slot_mapping=np.array([7], np.int64))
    key = np.ones((1, 1, 2), np.float32)
    with pytest.raises(pagedkv.StepError, match="another geometry"):
        backend.write_step(small, 0, key, key, plan)  # slot 7 would lie outside the small pool
    with pytest.raises(pagedkv.StepError, match="no block tables"):
        backend.attention_step(np.ones((1, 1, 2), np.float32), pool, 0, plan)
    with pytest.raises(pagedkv.StepError, match="expected a Plan"):
        backend.write_step(pool, 0, key, key, "plan")
