"""The node's slide cache: written once per node, memory-mapped by every worker, LRU under a byte limit, and never
reading what a killed writer left."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from milbench import MilbenchError
from milbench.data.cache import FeatureCache
from milbench.data.node_cache import NodeCache
from milbench.data.readers import find_feature_file, read_slide
from tests.data.files import clam_h5, grid, random_features

SLIDES = [f"slide_{i}" for i in range(4)]


def _root(tmp_path, patches=(30, 40, 50, 60), dim=8):
    root = tmp_path / "features"
    for i, (slide, n) in enumerate(zip(SLIDES, patches)):
        clam_h5(root, "20x", slide, random_features(n, dim, seed=i), grid(n))
    return root


def _same(got, want):
    assert got.features.dtype == torch.float16 and torch.equal(got.features, want.features)
    assert torch.equal(got.coords, want.coords) and got.coords.dtype == torch.int64
    assert got.path == want.path


def _mapped_from(tensor):
    """The file whose memory mapping holds ``tensor``'s data ("" when none does), from /proc/self/maps."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps").read().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else ""
    return ""


def _reader(folder, limit, root, order):
    """A worker process: read ``order`` through the node cache; (writes, hits, the arrays it got)."""
    cache = NodeCache(folder, limit)
    got = {s: cache.read(root, "20x", s) for s in order}
    return cache.writes, cache.hits, {s: (v.features.numpy().copy(), v.coords.numpy().copy()) for s, v in got.items()}


def test_two_processes_write_each_slide_once_and_read_what_read_slide_reads(tmp_path):
    root, folder = _root(tmp_path), tmp_path / "node"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_reader, [(folder, 2**30, root, SLIDES), (folder, 2**30, root, SLIDES[::-1])])
    assert sum(writes for writes, _, _ in results) == len(SLIDES)  # each slide written by one of them only
    assert sum(hits for _, hits, _ in results) == len(SLIDES)  # and mapped by the other
    for _, _, got in results:
        for slide in SLIDES:
            want = read_slide(root, "20x", slide)
            assert np.array_equal(got[slide][0], want.features.numpy()) and got[slide][0].dtype == np.float16
            assert np.array_equal(got[slide][1], want.coords.numpy())
    assert len(list((folder / "slides").glob("*.features.npy"))) == len(SLIDES)


def test_feature_cache_through_the_node_cache_keeps_only_mapped_tensors(tmp_path):
    root = _root(tmp_path)
    node = NodeCache(tmp_path / "node", 2**30)
    cache = FeatureCache(node_cache=node)
    for slide in SLIDES:
        got = cache.read(root, "20x", slide)
        _same(got, read_slide(root, "20x", slide))
        assert _mapped_from(got.features).endswith(".features.npy")  # the node's file itself, not a copy
    assert cache.read(root, "x20", SLIDES[0]) is not None and cache.hits == 1
    assert cache.nbytes == 0 and node.writes == len(SLIDES)
    again = NodeCache(tmp_path / "node", 2**30)  # another worker of the node
    _same(again.read(root, "20x", SLIDES[2]), read_slide(root, "20x", SLIDES[2]))
    assert again.writes == 0 and again.hits == 1


def test_the_limit_evicts_least_recently_used_slides_and_is_never_exceeded(tmp_path):
    root = _root(tmp_path, patches=(100, 100, 100, 100), dim=64)  # 12.8 kB of features + 1.6 kB of coords each
    probe = NodeCache(tmp_path / "probe", 2**30)
    probe.read(root, "20x", SLIDES[0])
    entry = probe.used_bytes()
    limit = entry + 100 * 64 * 2 + 100 * 2 * 8 + 3 * 4096  # one entry, and a second one at its worst-case size
    node = NodeCache(tmp_path / "node", limit)
    held = lambda: {k for _, k, _ in node.entries()}  # noqa: E731
    key = {s: NodeCache.key(find_feature_file(root, "20x", s), "20x", None) for s in SLIDES}
    node.read(root, "20x", SLIDES[0])
    node.read(root, "20x", SLIDES[1])
    assert held() == {key[SLIDES[0]], key[SLIDES[1]]}
    node.read(root, "20x", SLIDES[0])  # slide 0 used again: slide 1 is now the least recently used
    node.read(root, "20x", SLIDES[2])
    assert held() == {key[SLIDES[0]], key[SLIDES[2]]} and node.evicted == 1
    assert node.used_bytes() <= limit
    for slide in SLIDES[::-1]:
        _same(node.read(root, "20x", slide), read_slide(root, "20x", slide))
        assert node.used_bytes() <= limit and len(held()) <= 2
    assert [k for _, k, _ in node.entries()] == [key[SLIDES[1]], key[SLIDES[0]]]  # oldest first


def test_a_slide_larger_than_the_whole_limit_is_read_directly(tmp_path):
    root = _root(tmp_path, patches=(10, 10, 10, 500), dim=64)
    node = NodeCache(tmp_path / "node", 40_000)
    small, mapped = node.read_mapped(root, "20x", SLIDES[0])
    assert mapped and node.writes == 1
    big, mapped = node.read_mapped(root, "20x", SLIDES[3])  # 64 kB of features alone
    assert not mapped and node.direct == 1 and node.writes == 1
    _same(big, read_slide(root, "20x", SLIDES[3]))
    assert len(node.entries()) == 1  # nothing evicted for it
    cache = FeatureCache(node_cache=node)
    cache.read(root, "20x", SLIDES[3])
    assert cache.nbytes == big.nbytes  # read directly: this process's own memory, counted as such


def test_what_a_killed_writer_left_is_never_read_and_is_cleaned_up(tmp_path):
    root = _root(tmp_path)
    node = NodeCache(tmp_path / "node", 2**30)
    key = NodeCache.key(find_feature_file(root, "20x", SLIDES[0]), "20x", None)
    slides = tmp_path / "node" / "slides"
    # killed mid-write: a temporary file; killed between the renames: arrays without the .json that commits them
    (slides / f".{key}.features.npy.999999-deadbeef.tmp").write_bytes(b"\x93NUMPY half a file")
    np.save(slides / f"{key}.features.npy", np.zeros((3, 8), np.float16))
    _same(node.read(root, "20x", SLIDES[0]), read_slide(root, "20x", SLIDES[0]))
    assert node.writes == 1 and not list(slides.glob("*.tmp")) and not list(slides.glob(".*"))
    assert sorted(p.name for p in slides.iterdir()) == sorted(f"{key}{s}" for s in (".coords.npy", ".features.npy",
                                                                                   ".json"))


def test_a_changed_feature_file_is_a_new_entry(tmp_path):
    root = _root(tmp_path)
    node = NodeCache(tmp_path / "node", 2**30)
    node.read(root, "20x", SLIDES[0])
    clam_h5(root, "20x", SLIDES[0], random_features(7, 8, seed=99), grid(7))  # re-extracted
    got = node.read(root, "20x", SLIDES[0])
    assert got.features.shape == (7, 8) and node.writes == 2


def test_a_bad_limit_or_folder_is_refused(tmp_path):
    with pytest.raises(MilbenchError, match="--node-cache-gb"):
        NodeCache(tmp_path / "node", 0)
    (tmp_path / "file").write_text("")
    with pytest.raises(MilbenchError, match="--node-cache"):
        NodeCache(tmp_path / "file", 2**30)
