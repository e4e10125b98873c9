"""What `convert` prints when it is done: the summary line, per-phase timings, the policies, notes, and
the Megatron-LM flags that load the result. Text and JSON say the same things."""
from __future__ import annotations

from ckptctl import output


def to_json(rep) -> dict:
    d = rep.to_json()
    d["ok"] = True
    d["wall_seconds"] = round(output.wall_seconds(), 3)   # the whole command, interpreter start included
    return d


def render(rep, say) -> None:
    h = output.human_bytes
    wall = output.wall_seconds()
    what = (f"{h(rep.bytes)} per phase (weights {h(rep.weight_bytes)}, optimizer {h(rep.optimizer_bytes)})"
            if rep.optimizer_bytes else f"{h(rep.bytes)}")
    say(f"converted {rep.family} {rep.source_layout} -> {rep.target_layout or 'store'}: "
        f"{rep.files_in} -> {rep.files_out} rank files, {what}, "
        f"{rep.workers or 'no'} worker{'' if rep.workers == 1 else 's'}{' (in this process)' if not rep.workers else ''} "
        f"-> {rep.dst}")
    t = rep.timings or {}
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
    moved = [t[k] for k in ("source", "target") if k in t]
    speed = f"; {output.rate(rep.bytes * len(moved), sum(moved))} while moving" if moved and sum(moved) > 0 else ""
    say(f"  time: {wall:.2f} s in all ({phases}; start-up {max(0.0, wall - rep.seconds):.2f} s){speed}")
    for k, v in rep.policies.items():
        say(f"  {k}: {v}")
    for note in rep.notes:
        say(f"  note: {note}")
    if rep.next:
        say(f"next: load it in Megatron-LM with {rep.next['line']}")
        say(f"      ({rep.next['note']})")
