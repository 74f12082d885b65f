"""The round-2 variants: ids, groups and files of an extended pool, read back on access, reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.imagegen import photo
from trainer.pool import load_pool
from trainer.variants import add_variants


def test_variants_extend_the_pool_reproducibly(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    for k in range(3):
        photo(40, 30, seed=k).save(tmp_path / "pool" / f"p{k}.png")
    pool = load_pool(tmp_path / "pool", 28 * 28 * 4)  # the pool is already at the model's pixel budget
    extended, groups = add_variants(pool, 2, seed=5, folder=tmp_path / "a")

    assert extended.ids[:3] == pool.ids and extended.ids[3:5] == ["p0.png#v01", "p0.png#v02"]
    assert groups == [[0, 3, 4], [1, 5, 6], [2, 7, 8]]
    assert len(extended) == len(extended.images) == 9 and extended.images[0] is pool.images[0]
    for k in range(3, 9):
        assert extended.images[k] is not extended.images[k]  # read from its file on each access
        assert extended.images[k].tobytes() == extended.images[k].tobytes()
        assert extended.images[k].size == pool.images[(k - 3) // 2].size
    assert not all(np.array_equal(np.asarray(extended.images[k]), np.asarray(pool.images[0])) for k in (3, 4))
    index = json.loads((tmp_path / "a" / "variants.json").read_text())
    assert [v["id"] for v in index] == extended.ids[3:] and {v["reference"] for v in index} == set(pool.ids)

    add_variants(pool, 2, seed=5, folder=tmp_path / "b")
    add_variants(pool, 2, seed=6, folder=tmp_path / "c")
    files = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert files == sorted(p.name for p in (tmp_path / "b").glob("*.png")) and len(files) == 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)
