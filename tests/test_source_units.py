"""Source units: with more workers than rank files each file's tensors are cut into parts, so every
worker reads and checksums a share; every owned tensor is read once, the objects go with part 0."""
from types import SimpleNamespace as NS

from ckptctl.reshard.comm import assign
from ckptctl.reshard.run import source_units


def _plan(files):
    """files: per file, a list of (elements, owned) per tensor (bf16: 2 bytes an element)."""
    fps = [NS(tensors=[NS(dtype="bfloat16", owned=(o,), pieces=(NS(local=NS(volume=n)),)) for n, o in f])
           for f in files]
    return NS(files=fps, owned_bytes=lambda i: sum(2 * n for n, o in files[i] if o))


FILES = [[(1000 + 37 * j, j % 5 != 3) for j in range(60)] for _ in range(3)] + [[(50, True), (7, False)]]


def _check_cover(plan, units):
    for i, fp in enumerate(plan.files):
        got = sorted(j for u in units if u.file == i for j in u.tensors)
        assert got == [j for j, t in enumerate(fp.tensors) if any(t.owned)]
        parts = sorted(u.part for u in units if u.file == i)
        assert parts == list(range(len(parts))) and all(u.parts == len(parts) for u in units if u.file == i)
        assert sum(u.nbytes for u in units if u.file == i) == plan.owned_bytes(i)
    assert len({u.mark for u in units}) == len(units)


def test_one_unit_per_file_when_workers_do_not_outnumber_files():
    plan = _plan(FILES)
    for world in (1, 2, 4):
        units = source_units(plan, world)
        assert [(u.file, u.part, u.parts) for u in units] == [(i, 0, 1) for i in range(4)]
        assert [u.mark for u in units] == ["0", "1", "2", "3"]   # the marks of a run before the split
        _check_cover(plan, units)


def test_files_are_cut_by_bytes_for_more_workers():
    plan = _plan(FILES)
    units = source_units(plan, 16)
    _check_cover(plan, units)
    assert [sum(1 for u in units if u.file == i) for i in range(4)] == [5, 5, 5, 1]   # ~16 * share each
    big = [u.nbytes for u in units if u.file == 0]
    assert max(big) < 1.5 * min(big)
    loads = [sum(units[k].nbytes for k in mine) for mine in assign([u.nbytes + 1 for u in units], 16)]
    assert sum(1 for x in loads if x) == len(units)   # each part on its own worker
    assert units[0].mark == "0.0of5" and units[15].mark == "3"
