"""The O(n log n) planner: the same plans as the all-pairs reference (tests/plan_reference.py) on every
matrix pair of every family, a sweep that finds exactly the overlaps brute force finds, and a count of
`Box.intersect` calls that grows linearly, not quadratically, with the shards of one array."""
from __future__ import annotations

import itertools
import random

import pytest

from ckptctl.box import Box, find_overlap
from ckptctl.errors import BadInput
from ckptctl.layout import FileCoord, Layout, parse_layout
from ckptctl.models import family_names, get_family
from ckptctl.models.config import ModelConfig, padded_vocab
from ckptctl.reshard import plan, synth
from tests import plan_reference as ref


def synth_inventories(fam, cfg: ModelConfig, layout: Layout) -> list[plan.Inventory]:
    """Rank-file key lists (no data) of `layout`: the global model planned onto its files."""
    return synth.inventories(fam, cfg, layout, "float32")


def matrix_cases():
    from ckptctl.example import make_config
    out = []
    for name in family_names():
        fam = get_family(name)
        for a, b, opts in getattr(fam, "matrix_pairs", []):
            if opts.get("format") or opts.get("to_format"):
                continue
            out.append(pytest.param(name, a, b, opts, id=f"{name}-{a}-{b}-{len(out)}"))
    return out


@pytest.mark.parametrize("family,a,b,opts", matrix_cases())
def test_plans_equal_the_all_pairs_reference(family, a, b, opts):
    from ckptctl.example import make_config
    fam = get_family(family)
    src, dst = parse_layout(a), parse_layout(b)
    base = make_config(family, opts)
    cfg = ModelConfig(**{**base.__dict__, "padded_vocab": padded_vocab(base.true_vocab, base.vocab_divisor, src.tp)})
    invs = synth_inventories(fam, cfg, src)
    new, old = plan.plan_source(fam, cfg, src, invs), ref.plan_source(fam, cfg, src, invs)
    assert new == old
    for lay in (dst, src):
        assert (plan.plan_target(fam, cfg, lay, new.manifest, new.arrays, set(new.slots))
                == ref.plan_target(fam, cfg, lay, old.manifest, old.arrays, set(old.slots)))


def _brute(boxes):
    return any(a.volume and b.volume and a.intersect(b) is not None for a, b in itertools.combinations(boxes, 2))


@pytest.mark.parametrize("seed", range(300))
def test_find_overlap_agrees_with_brute_force(seed):
    rnd = random.Random(seed)
    ndim = rnd.choice([1, 2, 3])
    n = rnd.randint(0, 12)
    grid = rnd.choice([2, 4, 8])
    boxes = []
    for _ in range(n):
        offs = tuple(rnd.randrange(grid) for _ in range(ndim))
        sizes = tuple(rnd.randint(0 if rnd.random() < 0.05 else 1, grid - o) for o in offs)
        boxes.append(Box(offs, sizes))
    hit = find_overlap(boxes)
    assert (hit is not None) == _brute(boxes)
    if hit is not None:
        i, j = hit
        assert i < j and boxes[i].intersect(boxes[j]) is not None


def test_find_overlap_on_a_tiling_and_one_bad_box():
    tiles = [Box((e, r, 0), (1, 4, 8)) for e in range(16) for r in range(0, 16, 4)]
    assert find_overlap(tiles) is None
    bad = tiles + [Box((5, 2, 0), (1, 4, 8))]          # straddles two tiles of expert 5
    i, j = find_overlap(bad)
    assert j == len(tiles) and tiles[i].offsets[0] == 5


def test_overlapping_shards_are_refused_naming_both_files(monkeypatch):
    fam = get_family("gpt")
    cfg = ModelConfig(family="gpt", num_layers=1, hidden=8, heads=2, groups=2, kv_channels=4, ffn=16, glu=False,
                      tied=False, padded_vocab=128, true_vocab=128, vocab_divisor=128)
    lay = Layout(tp=2)
    good = synth_inventories(fam, cfg, lay)
    # a second copy of rank 1 is a replica: identical boxes, owned by the first copy
    twin = plan.Inventory(FileCoord(1, 0), "mp_rank_01_twin", good[1].chunks)
    assert [t.owned for t in plan.plan_source(fam, cfg, lay, good + [twin]).files[2].tensors][:2] == [(False,), (False,)]
    # a file whose split tensors are quarter slices (rank 1 of 4): its boxes straddle rank 0's halves
    orig = plan.Namer.split
    monkeypatch.setattr(plan.Namer, "split", lambda self, rule, fc: orig(self, rule, fc) if fc.tp < 2 else
                        ((4, 1) if rule.n(2, 2) > 1 else (1, 0)))
    bad = plan.Inventory(FileCoord(2, 0), "mp_rank_bad", _quarter(fam, cfg, good[0]))
    with pytest.raises(BadInput, match=r"in mp_rank_bad: its shard overlaps another rank's shard without "
                                       r"matching it \(.* in mp_rank_00\)"):
        plan.plan_source(fam, cfg, lay, good + [bad])


def _quarter(fam, cfg, inv: plan.Inventory) -> dict:
    """The key list of a TP-4 rank made from a TP-2 rank's list (split dims halved again)."""
    out = {}
    for c, entries in inv.chunks.items():
        rows = []
        for k, s, d in entries:
            if s is not None:
                rule = fam.rule(fam.locate(k), cfg)
                if rule.n(2, 2) > 1:
                    s = tuple(x // 2 if i == rule.dim else x for i, x in enumerate(s))
            rows.append((k, s, d))
        out[c] = rows
    return out


# --- scaling: Box.intersect calls per plan, as the shards of one array grow ------------------------

def _moe_cfg(experts: int) -> ModelConfig:
    return ModelConfig(family="moe", num_layers=2, hidden=8, heads=2, groups=2, kv_channels=4, ffn=16, glu=True,
                       tied=False, padded_vocab=128, true_vocab=128, vocab_divisor=128, num_experts=experts,
                       moe_ffn=8, extra={"add_bias_linear": False})


def _count_intersects(monkeypatch, fn) -> int:
    calls = [0]
    real = Box.intersect

    def counted(self, other):
        calls[0] += 1
        return real(self, other)
    monkeypatch.setattr(Box, "intersect", counted)
    try:
        fn()
    finally:
        monkeypatch.setattr(Box, "intersect", real)
    return calls[0]


def test_intersect_calls_grow_linearly_not_quadratically(monkeypatch):
    fam = get_family("moe")
    counts, ref_counts = {}, {}
    for E in (16, 64):
        cfg = _moe_cfg(E)
        lay = Layout(tp=2, ep=E, etp=2)       # E files, each expert's fc1/fc2 cut in 2: 2E boxes per array
        invs = synth_inventories(fam, cfg, lay)
        counts[E] = _count_intersects(monkeypatch, lambda: plan.plan_source(fam, cfg, lay, invs))
        ref_counts[E] = _count_intersects(monkeypatch, lambda: ref.plan_source(fam, cfg, lay, invs))
    # 4x the shards: the all-pairs reference makes ~16x the calls, the sweep ~4x
    print("Box.intersect calls (sweep, all-pairs):", counts, ref_counts)
    assert ref_counts[64] > 12 * ref_counts[16]
    assert counts[64] <= 5 * counts[16]
    assert counts[64] < ref_counts[64] / 10
