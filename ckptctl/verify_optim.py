"""verify's optimizer comparison: each side's optimizer state gathered rank by rank by its format
(`Format.optim_gather`), compared bitwise tensor by tensor, plus the master==weight invariant and a check
that no moment is a copy of another buffer (DESIGN §9)."""
from __future__ import annotations

from ckptctl.core.diff import Difference, byte_diff
from ckptctl.optstate.check import verify_invariant
from ckptctl.optstate.params import ADAM_KEYS, optim_array
from ckptctl.verify_gather import Gatherer as WeightGather, compare_arrays


def verify_optimizer(sa, sb, rep) -> None:
    """Compare optimizer state of two checkpoints bitwise, tensor by tensor (DESIGN §9)."""
    ia, ib = getattr(sa, "optim", None), getattr(sb, "optim", None)
    if ia is None and ib is None:
        return
    if (ia is None) != (ib is None):
        rep.differences.append(Difference("optimizer", f"optimizer state only in {'a' if ia else 'b'}"))
        return
    if (ia["kind"], ia["variant"]) != (ib["kind"], ib["variant"]):
        rep.differences.append(Difference("optimizer", f"optimizer kinds differ: {ia['kind']}/{ia['variant']} vs "
                                                       f"{ib['kind']}/{ib['variant']}"))
        return
    ga, gb = sa.format.optim_gather(sa), sb.format.optim_gather(sb)
    ca, cb = ga.common(), gb.common()
    for k in ("step",):
        if repr(ca.get(k)) != repr(cb.get(k)):
            rep.differences.append(Difference("optimizer.step", f"differs: {ca.get(k)!r} vs {cb.get(k)!r}"))
    gra, grb = ga.groups_by_array(), gb.groups_by_array()
    bad = [a for a in gra if a in grb and gra[a] != grb[a]]
    if bad:
        rep.differences.append(Difference("optimizer.param_groups", f"param-group hyperparameters or grad scaler "
                                                                    f"differ for {len(bad)} parameter(s), first {bad[0]}"))
    names_b = set(gb.arrays())
    # Beside the decoding shared with convert: each side's fp32 master against its weight, the weight taken
    # by verify's own reference gather (verify_invariant; issue 10).
    weights = {"a": (sa, WeightGather(sa)), "b": (sb, WeightGather(sb))}
    for array in ga.arrays():
        if array not in names_b:
            rep.differences.append(Difference(optim_array(array, "*"), "optimizer state only in a"))
            continue
        got = {}
        for c in ia["comps"]:
            rep.tensors += 1
            ta, pa = ga.gather(array, c)
            tb, pb = gb.gather(array, c)
            rep.differences.extend(pa + pb)
            compare_arrays(optim_array(array, c), ta, tb, sa.plan.arrays[array].get("vocab", False), rep)
            if c == "param":
                for side, t in (("a", ta), ("b", tb)):
                    src, wg = weights[side]
                    if array in src.plan.arrays:
                        d = verify_invariant(f"{side} ({src.ckpt.root})", array, t, wg.gather(array)[0])
                        if d is not None:
                            rep.differences.append(d)
            got[c] = ta
        # A moment byte-identical to the master weights or to the other moment is a known bug class.
        master = got.get("param")
        if master is None and sa.plan.arrays[array]["dtype"] == "float32":
            master = None   # fp32 Adam: the weight is the master; compared below through the model array
        for c in ADAM_KEYS:
            t = got.get(c)
            if t is None or not bool((t != 0).any()):
                continue
            others = [("param", master)] + [(o, got.get(o)) for o in ADAM_KEYS if o != c]
            for name, o in others:
                if o is not None and o.shape == t.shape and byte_diff(t, o) is None:
                    rep.differences.append(Difference(optim_array(array, c),
                                                      f"byte-identical to {name} (a moment copied from another buffer)"))
        del got
    for array in sorted(names_b - set(ga.arrays())):
        rep.differences.append(Difference(optim_array(array, "*"), "optimizer state only in b"))


