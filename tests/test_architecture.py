"""The shape of the package, kept by tests: layers that import only downward, no reads of
another object's private state, and the per-layer path of a step free of validation and uploads."""

import ast
import pathlib

import numpy as np
import pytest

import pagedkv
from pagedkv.ops import validate

PACKAGE = pathlib.Path(pagedkv.__file__).parent

# The layers of the package, bottom up (the package docstring's table): a module imports only from
# its own layer or the layers before it. A layer is a subpackage, or one of the few modules at the
# top; "" is the package itself and __main__, which may import anything.
LAYERS = ["errors", "geometry", "memory", "ops", "backends", "blocks", "offload", "explain", "cache", "integrations",
          "engine", "serve", "testing", "tools", ""]
BASE = {"_version", "_old_paths"}  # no imports of pagedkv; anything may import them


def layer(module: str) -> int:
    top = module.split(".")[0]
    if top in BASE:
        return -1
    if top == "__main__":
        return len(LAYERS) - 1
    return LAYERS.index(top)


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
            yield target
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for n in names:
                if n == "pagedkv" or n.startswith("pagedkv."):
                    yield n.removeprefix("pagedkv").lstrip(".")


@pytest.mark.parametrize("name, path", list(modules()), ids=[n or "pagedkv" for n, _ in modules()])
def test_modules_import_only_from_their_layer_or_below(name, path):
    for target in imported(name, path):
        assert layer(target) <= layer(name), f"{name} imports {target}, a layer above it"


def test_every_layer_is_in_the_tree():
    tops = {name.split(".")[0] for name, _ in modules()}
    assert tops == set(LAYERS) | BASE | {"__main__"}, "a layer that LAYERS and the package docstring do not name"
    for name in LAYERS:
        assert f"``{name}``" in pagedkv.__doc__ or name == "", f"the package docstring does not name the {name} layer"


@pytest.mark.parametrize("name, path", list(modules()), ids=[n or "pagedkv" for n, _ in modules()])
def test_no_reads_of_another_objects_private_attributes(name, path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            op = ast.unparse(node.value).startswith("torch.ops.")  # an operator's name in torch's registry
            assert owner in ("self", "cls") or node.attr in NAMEDTUPLE_API or op, \
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
