"""The command line's side of `ckptctl digest` and `verify --digest`: records read before any work, the
digest run, records compared, the result printed; exit codes as every command (1: a record or replica
differs, 2: bad input)."""
from __future__ import annotations

from pathlib import Path

from ckptctl import output


def run(ckpt: Path, nproc, max_memory, true_vocab, out, check, all_rows: bool, json_out: bool) -> int:
    from ckptctl import digest as dg, digest_record
    from ckptctl.reshard.launch import default_nproc
    from ckptctl.reshard.stream import parse_size
    own = ckpt / dg.RECORD   # convert --digest's record of the source: always compared
    records = [(p, digest_record.load(p)) for p in ([check] if check else []) +
               ([own] if own.is_file() and check != own else [])]
    with output.progress(not json_out) as prog:
        rep = dg.digest(ckpt, true_vocab, parse_size(max_memory), default_nproc() if nproc is None else nproc, prog)
    d = rep.to_json()
    d["checked"] = [{"record": str(p), "record_of": r.get("record_of"), "differences": digest_record.differences(d, r)}
                    for p, r in records]
    failed = not rep.ok or any(c["differences"] for c in d["checked"])
    d["ok"] = not failed
    if out is not None:
        digest_record.write(rep, out)
    if json_out:
        output.emit_json(d)
    elif not output.QUIET:
        digest_record.render(d, output.say, all_rows)
        for c in d["checked"]:
            diffs = c["differences"]
            word = "[red]DIFFERENT[/]" if diffs else "[green]MATCHES[/]"
            output.out.print(f"{word} the digest in {c['record']} (of {c['record_of']})" +
                             (f": {len(diffs)} differ, first {diffs[0]['name']} ({diffs[0]['reason']})" if diffs else ""),
                             highlight=False)
    return 1 if failed else 0


def verify_first(a: Path, b: Path, true_vocab, max_memory, nproc: int, weights_only: bool, json_out: bool) -> bool:
    """`verify --digest`: True when both sides' digests are equal (the result printed); else False, and
    the caller's byte comparison runs."""
    from ckptctl.digest_record import same_state
    with output.progress(not json_out) as prog:
        same = same_state(a, b, true_vocab, max_memory, max(1, nproc), weights_only, prog)
    if same["equal"]:
        line = (f"EQUAL by digest: {same['tensors']} tensors, {output.human_bytes(same['bytes'])} per side hashed "
                f"in {same['seconds']:.2f} s, root {same['a'] or '(weights only)'}")
        if json_out:
            output.emit_json({"ok": True, "verdict": line, "digest": same, "differences": []})
        elif not output.QUIET:
            output.out.print(f"[green]EQUAL[/]{line[5:]}", highlight=False)
        return True
    if not json_out:
        output.say(f"digests differ ({len(same['differ'])} entries, first {(same['differ'] or ['a replica'])[0]}): "
                   "comparing bytes")
    return False
