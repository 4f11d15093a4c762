"""Weighted data_path blends: proportions, determinism, reachability, bad weights."""
import pytest

from nemo_neva.data.blend import BlendedNevaDataset, parse_blend
from nemo_neva.data.dataset import NevaDataset
from neva_data_helpers import conv, write_json


class Source:
    """A map-style source whose items say where they come from."""

    def __init__(self, name, n):
        self.name, self.n = name, n
        self.lengths = list(range(1, n + 1))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert 0 <= i < self.n
        return (self.name, i)


def test_parse_blend_forms_and_errors():
    assert parse_blend("a.json") == (["a.json"], None)
    assert parse_blend(["a.json", "b.json"]) == (["a.json", "b.json"], None)  # plain concatenation
    assert parse_blend([3, "a.json", 1, "b"]) == (["a.json", "b"], [0.75, 0.25])
    assert parse_blend([0.5, "a", 0, "b"])[1] == [1.0, 0.0]
    for bad, msg in [([1, "a", 2], "odd-length"), ([-1, "a", 2, "b"], ">= 0"), ([0, "a", 0.0, "b"], "sum to"),
                     ([1, "a", "b", 2], "numbers then paths"), ([float("nan"), "a"], "finite"),
                     ([], "empty")]:
        with pytest.raises(ValueError, match=msg):
            parse_blend(bad)


def test_blend_proportions_determinism_and_reach():
    sources = [Source("a", 50), Source("b", 7), Source("c", 400)]
    weights = [0.5, 0.3, 0.2]
    blend = BlendedNevaDataset(sources, weights, seed=7, size=2000, names=["a", "b", "c"])
    items = [blend[i] for i in range(len(blend))]
    for name, w in zip("abc", weights):
        share = sum(it[0] == name for it in items) / len(items)
        assert abs(share - w) < 0.01, (name, share)
        # every prefix follows the weights too (the greedy assignment), not just the whole epoch
        assert abs(sum(it[0] == name for it in items[:100]) / 100 - w) < 0.02
    # oversampled sources (a: 1000 draws of 50, b: 600 of 7) cover every sample, evenly
    for src in sources[:2]:
        got = [i for n, i in items if n == src.name]
        assert set(got) == set(range(src.n))
        assert max(got.count(i) for i in range(src.n)) - min(got.count(i) for i in range(src.n)) <= 1
    # undersampled c (400 draws of 400) gets each sample once, not just its first ones
    assert sorted(i for n, i in items if n == "c") == list(range(400))
    assert blend.lengths == [sources["abc".index(n)].lengths[i] for n, i in items]
    again = BlendedNevaDataset(sources, weights, seed=7, size=2000, names=["a", "b", "c"])
    assert [again[i] for i in range(2000)] == items  # deterministic for a seed
    other = BlendedNevaDataset(sources, weights, seed=8, size=2000)
    assert [other[i] for i in range(2000)] != items
    assert [other[i][0] for i in range(2000)] == [it[0] for it in items]  # the seed picks samples, not sources
    half = BlendedNevaDataset(sources, weights, seed=7, size=200)
    assert sum(it[0] == "c" for it in (half[i] for i in range(200))) == 40
    assert len({half[i] for i in range(200) if half[i][0] == "c"}) == 40  # distinct samples of c


def test_blend_zero_weight_and_unreachable_source():
    blend = BlendedNevaDataset([Source("a", 5), Source("b", 5)], [1.0, 0.0])
    assert len(blend) == 5 and {blend[i][0] for i in range(5)} == {"a"}
    with pytest.raises(ValueError, match="gets no sample"):
        BlendedNevaDataset([Source("a", 5), Source("b", 5), Source("c", 5)], [0.998, 0.001, 0.001], size=3)


def test_model_blends_json_files(tmp_path):
    from nemo_neva import build_model
    from tests.model.helpers import tiny_model_cfg

    a = write_json(tmp_path / "a.json", [{"id": f"a{i}", "conversations": conv("hi", "aaa")} for i in range(6)])
    b = write_json(tmp_path / "b.json", [{"id": f"b{i}", "conversations": conv("yo", "bbb")} for i in range(6)])
    cfg = tiny_model_cfg(**{"data.data_path": [3, a, 1, b], "data.conv_template": "chatml"})
    model = build_model(cfg)
    ds = model.build_dataset(cfg.data)
    assert isinstance(ds, BlendedNevaDataset) and len(ds) == 12
    ids = [ds[i]["id"] for i in range(12)]
    assert sum(i.startswith("a") for i in ids) == 9
    assert "weight 0.750" in ds.summary()
    cfg.data.packed_sequence = True  # packing works on a blend (its lengths follow the blended positions)
    packed = model.data_loader(ds, cfg.data, shuffle=False)
    rows = [i for batch in packed for row in batch["ids"] for i in row]
    assert sorted(rows) == sorted(ids)
    assert isinstance(model.build_dataset(cfg.data, [a, b]), NevaDataset)  # plain list: concatenation
    with pytest.raises(ValueError, match="odd-length"):
        model.build_dataset(cfg.data, [3, a, 1])
