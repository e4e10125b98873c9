"""What a checkpoint format is: the interface every format package implements, and `Source`, the inspected
description of one checkpoint that the commands and the worker phases pass around.

Call order of one conversion (as PyTorch DCP's StorageReader/StorageWriter document theirs):

    CLI process      detect -> inspect -> check_target (whole target plan, no writes) -> optim_form (report)
    every worker     source_plan (pure, the same on every worker) -> open_unit (its share of units)
                     -> optim_source (its share of the optimizer state)
    every worker     target_phase (its share of target files; rank 0 also writes the format's metadata)
    CLI process      the output is committed by rename (ckptctl.storage.commit), never by the format
    verify (CLI)     inspect -> open_unit (the reference gather) -> optim_gather -> common_state

Generic code finds a format with `ckptctl.formats.registry` and never names one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ckptctl.layout import Layout
from ckptctl.models.config import ModelConfig
from ckptctl.reshard.plan import SourcePlan


@dataclass
class Source:
    """A checkpoint, inspected: its files (`ckpt`: the format's own description, with `root`, `iteration`,
    `iter_dir`, `layout`, `args`), config, family and source plan. No tensor bytes."""

    ckpt: object
    family: str
    cfg: ModelConfig
    inventories: list[dict]             # JSON-able per-unit key lists (legacy: one per rank file)
    plan: SourcePlan
    policies: dict[str, str]            # non-model state key -> policy (copy, rewrite, rng, optimizer, dropped)
    fmt: str = "legacy"                 # the format's registry name
    dist: dict | None = None            # JSON-able extra description a format's workers need (torch_dist: index)
    optim: dict | None = None           # the optimizer variant (ckptctl.optstate.state.inspect_info; None: none)

    @property
    def layout(self) -> Layout:
        return self.ckpt.layout

    @property
    def format(self) -> "Format":
        from ckptctl.formats import registry
        return registry.get(self.fmt)

    def opener(self):
        """FilePlan -> opened unit (rank file or DCP chunk), for the gather and the source phase."""
        return self.format.unit_opener(self.layout, self.inventories, self.dist)

    def common_state(self) -> dict:
        """The non-model state of the checkpoint (iteration, checkpoint_version, args ...)."""
        return self.format.common_state(self)

    @property
    def nbytes(self) -> int:
        return sum(self.plan.owned_bytes(i) for i in range(len(self.plan.files)))


class Format:
    """One checkpoint format. A package `ckptctl/formats/<name>/` exposes an instance as `FORMAT`; the
    registry finds it. Methods say which process calls them."""

    name: str = ""
    aliases: tuple[str, ...] = ()
    megatron_name: str = ""          # Megatron-LM's --ckpt-format of this format
    detect_order: int = 100          # lower is tried first (a more specific layout before a looser one)
    fallback: bool = False           # inspected when no format detects the path (its error names what is missing)
    writes_examples: bool = False    # `example` writes it directly; other formats go through convert
    memory_mapped: bool = False      # units are memory-mapped files (readers may drop pages after a copy)
    indices_rebuilt: bool = False    # the optimizer encoding keeps per-parameter indices (convert's report)
    layout_free: bool = False        # a target without a parallel layout (no --to; planned as TP1PP1)
    holds_optimizer: bool = True     # False: a target of weights only (convert drops optimizer state, says so)
    workers_share_files: bool = False   # target workers beyond one per file help write each file (convert starts nproc)
    matrix_pairs: dict = {}          # family name -> `ckptctl matrix` rows (source, target, example options) in this format

    # --- CLI process ---------------------------------------------------------------------------
    def detect(self, path: Path) -> bool:
        """Whether `path` is a checkpoint of this format (cheap: names and small metadata files only)."""
        raise NotImplementedError

    def inspect(self, path: Path, true_vocab: int | None = None, family: str | None = None) -> Source:
        """The immutable description of a checkpoint: key lists, config, the pure source plan. No tensor
        bytes are read; bad input is a BadInput naming the file, before any output."""
        raise NotImplementedError

    def check_options(self, optim_sharding: str | None) -> str | None:
        """The target's options normalised (`--optim-sharding`; a format without such options passes it on)."""
        return optim_sharding

    def check_format_options(self, opts: dict | None) -> dict:
        """`convert --format-option KEY=VALUE` of a target in this format, checked (CLI process)."""
        if opts:
            from ckptctl.errors import BadInput
            raise BadInput(f"--format-option: the {self.name} format takes none (got {', '.join(opts)})")
        return {}

    def check_target(self, family, cfg, layout: Layout, manifest: list, arrays: dict, slots: set,
                     options: dict | None = None) -> None:
        """Validate this format's whole target plan before any byte is written (no writes). The generic
        target plan (`ckptctl.reshard.plan.plan_target`) is checked by the caller first; `options`: the
        checked `--format-option`s."""

    def optim_form(self, info: dict, sharding: str | None) -> str:
        """What this format holds of an optimizer variant (convert's and inspect's reports)."""
        raise NotImplementedError

    def policy_extra(self, info: dict | None, optimizer: bool) -> dict[str, str]:
        """Report lines for state only this format's target files hold (e.g. legacy's distrib_optim.pt)."""
        return {}

    def target_files(self, to: Layout, family, cfg, manifest, arrays, slots, iteration,
                     optim_info: dict | None = None) -> list[str]:
        """The files a target phase writes, relative to DST (dry run; no writes). `optim_info`: the optimizer
        state converted with the weights (None: none, or --no-optimizer)."""
        raise NotImplementedError

    def common_state(self, src: Source) -> dict:
        """The checkpoint's non-model state (verify compares iteration and version)."""
        raise NotImplementedError

    def write_example(self, fam, cfg, layout: Layout, out: Path, src: SourcePlan, arrays: dict, dtype: str,
                      seed: int, optim) -> dict:
        """CLI process, `writes_examples` formats only: `ckptctl example`'s global `arrays` (planned as `src`,
        TP1PP1) written at `layout` into the new folder `out`; `optim`: (arrays, common, info) or None.
        Returns {"files", "bytes"}. Other formats get the example converted."""
        raise NotImplementedError

    # --- workers -------------------------------------------------------------------------------
    def source_plan(self, family, cfg, layout: Layout, inventories: list, dist: dict | None) -> SourcePlan:
        """Every worker: the pure source plan from the inspected key lists (no I/O; the same on every worker)."""
        raise NotImplementedError

    def unit_opener(self, layout: Layout, inventories: list, dist: dict | None):
        """A source worker and verify's gather: a function FilePlan -> opened unit. A unit answers
        `tensor(item)`, `object(item)`, `rng()` (store slot -> RNG state), `common()` (the non-model state
        the store keeps) and `dropped()` (state not converted)."""
        raise NotImplementedError

    def with_grouped_experts(self, src: Source) -> Source:
        """`convert --moe-grouped-gemm`: the source read with grouped-GEMM expert keys (a source whose expert
        layout is not fixed by its files: Hugging Face)."""
        from ckptctl.errors import BadInput
        raise BadInput(f"--moe-grouped-gemm: only for a Hugging Face source ({src.ckpt.root} is {self.name}: its "
                       "expert keys are kept)")

    def with_fresh_optimizer(self, src: Source, spec: str) -> Source:
        """`convert --fresh-optimizer SPEC`: the source with a freshly made optimizer state (formats whose
        checkpoints hold none: Hugging Face)."""
        from ckptctl.errors import BadInput
        raise BadInput(f"--fresh-optimizer: only for a source without optimizer state (a Hugging Face folder); "
                       f"{src.ckpt.root} is {self.name}")

    def optim_source(self, family, cfg, layout: Layout, info: dict, plan, dist: dict | None):
        """Source workers: the optimizer side (`write_file` per unit, or `run` over its own units)."""
        raise NotImplementedError

    def target_phase(self, job, comm, progress) -> dict:
        """Every target worker: write this worker's share of the target files into `job.out` (rank 0 also
        the format's metadata and tracker), reading the complete store; ends with a barrier."""
        raise NotImplementedError

    # --- verify --------------------------------------------------------------------------------
    def optim_gather(self, src: Source):
        """verify: the optimizer gather (`ckptctl.optstate.gather.Gather`) of an inspected checkpoint."""
        raise NotImplementedError

    def optim_locate(self, src: Source, gather, array: str, comp: str, index: list[int], held,
                     memo: dict) -> dict | None:
        """verify (CLI): where in this format's files element `index` of optimizer array `array`, component
        `comp`, lies: {"file", "tensor", "local_index", "byte_offset", ...}. `gather` is `optim_gather(src)`,
        `held` the rank plan holding the element (`ckptctl.verify_locate_optim.Held`), `memo` a dict the
        caller keeps per checkpoint (files decoded once). None: not located."""
        return None
