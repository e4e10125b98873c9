"""Notes a conversion prints about choices the user may not expect (computed before any write)."""
from __future__ import annotations


def source_notes(source, to, out_fmt: str, true_vocab: int | None) -> list[str]:
    """`source`: `convert.Source`; `to`: the target layout or None (store only)."""
    notes = []
    if to is None:
        return notes
    if str(to) == str(source.layout) and out_fmt == source.fmt:
        notes.append(f"the target layout equals the source's ({to}): this is a full copy through the store")
    if source.cfg.true_vocab is None and true_vocab is None and to.tp != source.layout.tp:
        notes.append(f"args.vocab_size is unknown: the source's padded vocabulary ({source.cfg.padded_vocab} rows) "
                     "is kept; pass --true-vocab-size N to re-pad for the target TP as Megatron-LM would")
    return notes
