"""optstate.buffers.writer_flags from rank arithmetic equals the loop over the whole world it replaced,
on many layouts (TP, CP, PP, EP, ETP, DP) and every directory coordinate, including ones no rank writes."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from ckptctl.errors import LayoutError
from ckptctl.layout import FileCoord, Layout
from ckptctl.optstate.buffers import writer_flags


def world_loop(layout, fp) -> tuple[bool, bool]:
    """The pre-issue-16 definition: every rank of the world visited."""
    dense = expert = False
    for rank in range(layout.world):
        tp, dp, pp = layout.dense_coords(rank)
        etp, ep, edp = layout.expert_coords(rank)
        if (tp, pp, ep) == (fp.coord.tp, fp.coord.pp, fp.coord.ep) and (dp == 0 or edp == 0):
            dense |= dp == 0
            expert |= edp == 0
    return dense, expert


def layouts():
    out = []
    for tp, cp, pp, ep, etp, dpm in itertools.product((1, 2, 4), (1, 2), (1, 2), (1, 2, 4, 8), (None, 1, 2), (1, 2, 3)):
        try:
            base = Layout(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)
            out.append(Layout(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, dp=base.dp * dpm))
        except LayoutError:
            continue
    return out


LAYOUTS = layouts()


def test_many_layouts_are_covered():
    assert len(LAYOUTS) > 150
    assert any(lay.expert_tp != lay.tp for lay in LAYOUTS) and any(lay.cp > 1 and lay.ep > 1 for lay in LAYOUTS)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_writer_flags_equal_the_world_loop(layout):
    seen = set()
    for tp in range(layout.tp + 1):            # one coordinate past the grid: no rank writes it
        for pp in range(layout.pp + 1):
            for ep in range(layout.ep + 1):
                fp = SimpleNamespace(coord=FileCoord(tp=tp, pp=pp, ep=ep))
                got = writer_flags(layout, fp)
                assert got == world_loop(layout, fp), (layout, tp, pp, ep)
                seen.add(got)
    assert (False, False) in seen               # the out-of-grid coordinates
    try:
        files = layout.model_files
    except LayoutError:                         # ETP > TP: no legacy directories (torch_dist still asks)
        return
    for fc in files:                            # every directory a layout writes has a writer of some kind
        assert any(writer_flags(layout, SimpleNamespace(coord=fc)))
