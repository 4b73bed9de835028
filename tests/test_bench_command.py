"""`agentforge bench --cold` sizes its rotating weight sets from the cache and the memory there is."""

from agentforge.commands import bench


def test_cold_sets_are_eight_last_level_caches_where_memory_allows(monkeypatch):
    monkeypatch.setattr(bench, "_available_memory_bytes", lambda: 64 << 30)
    assert bench.cold_set_bytes(32 << 20) == (256 << 20, False)


def test_a_huge_reported_cache_is_capped_by_available_memory(monkeypatch):
    # a guest reporting its host's 480 MiB L3 with 21 GiB free: 8x480 MiB per set, four sets, would not fit
    monkeypatch.setattr(bench, "_available_memory_bytes", lambda: 21 << 30)
    nbytes, capped = bench.cold_set_bytes(480 << 20)
    assert capped and nbytes == (21 << 30) // bench.COLD_MEMORY_SHARE


def test_copies_cover_the_cold_set_and_one_copy_is_hot():
    assert bench._copies_needed(10 << 20, None) == 1
    assert bench._copies_needed(10 << 20, 256 << 20) == 26
