"""Which tensors are trainable parameters, and how megatron-core 0.19.2 groups them (standard param-group
overrides; dense and expert sub-optimizers)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ckptctl.errors import BadInput
from ckptctl.models.rules import Piece

OPTIM = "optim/"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
KINDS = ("none", "adam", "distributed")
EMBEDDING_OR_OUTPUT = ("embedding.word_embeddings.weight", "output_layer.weight")
HALF = ("bfloat16", "float16")


def optim_array(array: str, comp: str) -> str:
    """Store array of one state component of a model array: model/X -> optim/<comp>/X."""
    return f"{OPTIM}{comp}/{array.removeprefix('model/')}"


def optim_piece(p: Piece, comp: str) -> Piece:
    return Piece(p.local, optim_array(p.array, comp), p.gbox)


@dataclass(frozen=True)
class Param:
    index: int          # position of the TensorItem in fp.tensors
    chunk: str
    key: str
    gkey: str
    shape: tuple
    dtype: str
    expert: bool        # in the expert sub-optimizer (expert params with EP>1 or ETP!=TP)
    shared: bool        # megatron-core's `shared_embedding` attribute (own bucket)

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1


def expert_groups(layout) -> bool:
    """Expert params use their own DP group (and sub-optimizer) only with EP>1 or ETP!=TP (DESIGN §6.1)."""
    return layout.ep > 1 or layout.expert_tp != layout.tp


def file_params(family, cfg, layout, fp, memo: dict | None = None) -> list[Param]:
    """A rank file's trainable params in named_parameters() order (= its model dict order, DESIGN §6.2).
    `memo`: gkey -> (has state, is expert), shared across the files of one layout (keys repeat per file)."""
    tied = family.tied_copies(cfg)
    shared_keys = set(tied) | set(tied.values()) if layout.pp > 1 else set()
    eg = expert_groups(layout)
    memo = {} if memo is None else memo
    out = []
    for i, t in enumerate(fp.tensors):
        hit = memo.get(t.gkey)
        if hit is None:
            loc = family.locate(t.gkey)
            hit = memo[t.gkey] = (family.optimizer_state(loc.rest), family.expert_of(loc.rest) is not None)
        if not hit[0]:
            continue
        out.append(Param(i, t.chunk, t.key, t.gkey, tuple(t.shape), t.dtype, eg and hit[1], t.gkey in shared_keys))
    return out


def n_subs(cfg, layout) -> int:
    return subs_for(bool(cfg.num_experts), layout)


def subs_for(experts: bool, layout) -> int:
    """Sub-optimizers of megatron-core's ChainedOptimizer: dense, plus expert when experts use their groups."""
    return 2 if (experts and expert_groups(layout)) else 1


def split_subs(params: list[Param], n: int) -> list[list[Param]]:
    if n == 1:
        return [params]
    return [[p for p in params if not p.expert], [p for p in params if p.expert]]


def classify(p: Param, args: dict) -> tuple[bool, bool]:
    """(weight decay off, decoupled lr) as megatron-core's standard overrides decide them."""
    one_d = len(p.shape) == 1 or p.key.endswith(".bias")
    if args.get("apply_wd_to_qk_layernorm"):
        one_d = one_d and not ("q_layernorm." in p.key or "k_layernorm." in p.key)
    emb = args.get("decoupled_lr") is not None and p.gkey in EMBEDDING_OR_OUTPUT
    return one_d, emb


def group_of(p: Param, groups: list[dict], args: dict, where: str) -> int:
    wd0, emb = classify(p, args)
    dec = args.get("decoupled_lr")
    hits = [i for i, g in enumerate(groups)
            if (float(g.get("wd_mult", 1.0)) == 0.0) == wd0 and bool(g.get("is_expert_parallel", False)) == p.expert
            and (dec is None or (g.get("max_lr") == dec) == emb)]
    if len(hits) != 1:
        raise BadInput(f"{where}: cannot place parameter {p.key!r} in one of the {len(groups)} param groups "
                       "(only megatron-core's standard grouping is supported)")
    return hits[0]


def comps_of(kind: str, variant: str) -> list[str]:
    return ["exp_avg", "exp_avg_sq"] if variant == "fp32" else ["param", "exp_avg", "exp_avg_sq"]

