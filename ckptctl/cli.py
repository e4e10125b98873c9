"""The `ckptctl` command line. Commands only parse, call, and render; errors map to exit codes here.

Exit codes (as cmp): 0 success, 1 verify found differences, 2 bad usage or input, 3 worker/internal failure.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from ckptctl import output
from ckptctl.errors import BadInput, CkptctlError
from ckptctl.layout import Layout, parse_layout

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reshard Megatron checkpoints between parallel layouts, bitwise, and prove it.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
NprocOpt = Annotated[Optional[int], typer.Option("--nproc", help="torchrun workers (0 = run in this process).")]
VocabOpt = Annotated[Optional[int], typer.Option("--true-vocab-size", help="True vocabulary size when args lack it.")]


def _layout(text: Optional[str], tp=None, pp=None, vpp=None, ep=None, etp=None, dp=None) -> Optional[Layout]:
    if text is None and all(v is None for v in (tp, pp, vpp, ep, etp, dp)):
        return None
    return parse_layout(text or "", tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, dp=dp)


@app.command(epilog="Examples:\n\n  ckptctl example gpt --layout tp2pp2 --out src\n\n"
                    "  ckptctl example gpt --layout tp1pp4vpp2 --swiglu --groups 2 --out src")
def example(
    family: Annotated[str, typer.Argument(help="Model family: gpt (and others as supported).")],
    out: Annotated[Path, typer.Option("--out", help="Folder to create.")],
    layout: Annotated[str, typer.Option("--layout", help="Layout, e.g. tp2pp2, tp1pp4vpp2, tp2pp1ep2.")] = "tp1pp1",
    layers: Optional[int] = typer.Option(None, help="Number of layers (default 8)."),
    hidden: Optional[int] = typer.Option(None, help="Hidden size (default 64)."),
    heads: Optional[int] = typer.Option(None, help="Attention heads (default 8)."),
    groups: Optional[int] = typer.Option(None, help="Query groups for GQA (default = heads)."),
    ffn: Optional[int] = typer.Option(None, help="FFN hidden size (default 128)."),
    vocab: Optional[int] = typer.Option(None, help="True vocabulary size (default 128)."),
    swiglu: bool = typer.Option(False, "--swiglu", help="Gated MLP (GLU fc1)."),
    tied: Optional[bool] = typer.Option(None, "--tied/--untied", help="Tie embedding and output weights "
                                        "(default: untied; BERT tied, as Megatron-LM)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    experts: Optional[int] = typer.Option(None, help="Number of experts (MoE; default 8)."),
    moe_ffn: Optional[int] = typer.Option(None, "--moe-ffn", help="Expert FFN hidden size (MoE; default 64)."),
    grouped: bool = typer.Option(False, "--grouped", help="TEGroupedMLP expert keys (MoE; default SequentialMLP)."),
    shared_ffn: Optional[int] = typer.Option(None, "--shared-ffn", help="Shared expert FFN hidden size (MoE)."),
    bias: Optional[bool] = typer.Option(None, "--bias/--no-bias", help="Linear biases (default: on; off for MoE)."),
    binary_head: Optional[bool] = typer.Option(None, "--binary-head/--no-binary-head",
                                               help="BERT pooler and binary head (default: on)."),
    tokentypes: Optional[int] = typer.Option(None, help="BERT token types (default: 2 with the binary head, else 0)."),
    encoder_layers: Optional[int] = typer.Option(None, "--encoder-layers", help="T5 encoder layers (default: --layers)."),
    position: Optional[str] = typer.Option(None, help="T5 positions: learned_absolute (default), relative or rope."),
    pattern: Optional[str] = typer.Option(None, help="Mamba hybrid layer pattern: M mamba, * attention, - MLP, "
                                          "E MoE, | stage boundary (default: M*M- repeated)."),
    mamba_heads: Optional[int] = typer.Option(None, "--mamba-heads", help="Mamba heads (default 8)."),
    mamba_groups: Optional[int] = typer.Option(None, "--mamba-groups", help="Mamba groups (default 8)."),
    mamba_state: Optional[int] = typer.Option(None, "--mamba-state", help="Mamba state size (default 16)."),
    mamba_head_dim: Optional[int] = typer.Option(None, "--mamba-head-dim", help="Mamba head dim (default 8)."),
    seed: int = typer.Option(1234, help="Random seed of the values."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="Optimizer state: none, adam or distributed "
                                            "(default: distributed when the layout has DP > 1, else adam)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder."),
    fmt: str = typer.Option("legacy", "--format", help="Checkpoint format: legacy or torch_dist."),
    optim_sharding: Optional[str] = typer.Option(None, "--optim-sharding", help="torch_dist target: distributed-optimizer "
                                                 "state as dp_reshardable (default, as Megatron-LM saves) or fully_reshardable."),
    json_out: JsonOpt = False,
):
    """Write a small random checkpoint in Megatron's legacy (or torch_dist) format."""
    extra = {}
    if fmt == "torch_dist":
        from ckptctl.formats.torch_dist import example as make
        extra["optim_sharding"] = optim_sharding
    elif fmt == "legacy":
        from ckptctl.example import example as make
    else:
        raise BadInput(f"--format: expected legacy or torch_dist, got {fmt!r}")

    res = make(family, parse_layout(layout), out,
               {"layers": layers, "hidden": hidden, "heads": heads, "groups": groups, "ffn": ffn, "vocab": vocab,
                "swiglu": swiglu, "tied": tied, "dtype": dtype, "experts": experts,
                "moe_ffn": moe_ffn, "grouped": grouped or None, "shared_ffn": shared_ffn, "bias": bias,
                "binary_head": binary_head, "tokentypes": tokentypes, "encoder_layers": encoder_layers,
                "position": position, "pattern": pattern, "mamba_heads": mamba_heads, "mamba_groups": mamba_groups,
                "mamba_state": mamba_state, "mamba_head_dim": mamba_head_dim}, seed=seed, overwrite=overwrite, optimizer=optimizer,
               **extra)
    if json_out:
        output.emit_json(res)
    else:
        output.out.print(f"wrote {res['family']} example, layout {res['layout']}: {res['files']} rank files, "
                         f"{output.human_bytes(res['bytes'])} -> {res['out']}")


@app.command(epilog="Examples:\n\n  ckptctl convert src dst --to tp4pp1\n\n"
                    "  ckptctl convert src store.zarr            (source phase only)\n\n"
                    "  ckptctl convert store.zarr dst --to tp1pp2 (target phase only)")
def convert(
    src: Annotated[Path, typer.Argument(help="Source checkpoint (legacy folder or a ckptctl .zarr store).")],
    dst: Annotated[Path, typer.Argument(help="Destination folder (or STORE.zarr).")],
    to: Annotated[Optional[str], typer.Option("--to", help="Target layout, e.g. tp4pp2.")] = None,
    tp: Optional[int] = typer.Option(None, "--tp"), pp: Optional[int] = typer.Option(None, "--pp"),
    vpp: Optional[int] = typer.Option(None, "--vpp"), ep: Optional[int] = typer.Option(None, "--ep"),
    etp: Optional[int] = typer.Option(None, "--etp"), dp: Optional[int] = typer.Option(None, "--dp"),
    nproc: NprocOpt = None,
    store: Optional[Path] = typer.Option(None, "--store", help="Where to put the Zarr pivot (kept)."),
    keep_store: bool = typer.Option(False, "--keep-store", help="Keep the store as DST.zarr."),
    true_vocab: VocabOpt = None,
    rng: str = typer.Option("auto", "--rng", help="RNG state: auto, carry, replicate or drop."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing destination."),
    no_optimizer: bool = typer.Option(False, "--no-optimizer", help="Drop optimizer state instead of converting it."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="RSS budget per worker, e.g. 2G, 512M (default 2G)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Nodes of a multi-node job (run the same command on each)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's rank (node 0 commits the output)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Node 0's address (multi-node)."),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="A free port on node 0 (multi-node)."),
    to_format: Optional[str] = typer.Option(None, "--to-format", help="legacy or torch_dist (default: the source's format)."),
    optim_sharding: Optional[str] = typer.Option(None, "--optim-sharding", help="torch_dist target: distributed-optimizer "
                                                 "state as dp_reshardable (default, as Megatron-LM saves) or fully_reshardable."),
    json_out: JsonOpt = False,
):
    """Convert a checkpoint to another parallel layout (through torchrun workers and a Zarr store)."""
    from ckptctl.convert import convert as run
    from ckptctl.reshard.launch import Nodes
    from ckptctl.reshard.stream import parse_size

    target = _layout(to, tp, pp, vpp, ep, etp, dp)
    with output.progress(not json_out) as prog:
        rep = run(src, dst, target, store=store, keep_store=keep_store, nproc=nproc, true_vocab=true_vocab,
                  rng=rng, overwrite=overwrite, progress=prog, optimizer=not no_optimizer,
                  max_memory=parse_size(max_memory), nodes=Nodes(nnodes, node_rank, master_addr, master_port),
                  to_format=to_format, optim_sharding=optim_sharding)
    if json_out:
        output.emit_json(rep.to_json())
        return
    gbps = rep.bytes / rep.seconds / 1e9 if rep.seconds else 0
    output.out.print(f"converted {rep.family} {rep.source_layout} -> {rep.target_layout or 'store'}: "
                     f"{rep.files_in} -> {rep.files_out} rank files, {output.human_bytes(rep.bytes)} in "
                     f"{rep.seconds:.2f} s ({gbps:.3f} GB/s, {rep.workers} workers) -> {rep.dst}")
    for k, v in rep.policies.items():
        output.out.print(f"  {k}: {v}", highlight=False)
    for note in rep.notes:
        output.out.print(f"  note: {note}", highlight=False)


@app.command(epilog="Examples:\n\n  ckptctl verify src dst\n\n  ckptctl verify src dst --json")
def verify(
    a: Annotated[Path, typer.Argument(help="First checkpoint.")],
    b: Annotated[Path, typer.Argument(help="Second checkpoint (any layout).")],
    strict: bool = typer.Option(False, "--strict", help="Fail on allowed differences too (vocab padding ...)."),
    true_vocab: VocabOpt = None,
    all_rows: bool = typer.Option(False, "--all", help="List every tensor, not only the differing ones."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="RSS budget, e.g. 2G, 512M (default 2G): "
                                             "tensors are compared in boxes that fit it."),
    json_out: JsonOpt = False,
):
    """Compare two checkpoints, in any layouts, byte for byte. Exit 0 equal, 1 different."""
    from ckptctl.reshard.stream import parse_size
    from ckptctl.verify import verify as run

    rep = run(a, b, true_vocab, max_memory=parse_size(max_memory))
    failed = bool(rep.differences) or (strict and bool(rep.allowed and any(x["key"] != "rng_state" and x["key"] != "_extra_state" for x in rep.allowed)))
    if json_out:
        output.emit_json(rep.to_json())
    else:
        rows = [[r["key"], r["dtype"], "x".join(map(str, r["shape"])), r["status"]] for r in rep.table
                if all_rows or r["status"] != "equal"]
        if rows:
            output.table(f"verify {rep.layout_a} vs {rep.layout_b}", ["tensor", "dtype", "shape", "status"], rows)
        for d in rep.differences:
            where = f" at {d.first_nd_index} (a={d.a_hex}, b={d.b_hex})" if d.first_nd_index is not None else ""
            output.out.print(f"[red]DIFF[/] {d.key}: {d.reason}" + (f", {d.count} elements" if d.count else "")
                             + where + (f" [{d.where}]" if d.where else ""), highlight=False)
        for x in rep.allowed:
            output.out.print(f"[yellow]note[/] {x['key']}: {x['reason']}", highlight=False)
        verdict = "[red]DIFFERENT[/]" if failed else "[green]EQUAL[/]"
        output.out.print(f"{verdict}: {rep.equal}/{rep.tensors} tensors byte-identical, "
                         f"{output.human_bytes(rep.bytes_compared)} compared in {rep.seconds:.2f} s", highlight=False)
    raise typer.Exit(1 if failed else 0)


@app.command(epilog="Examples:\n\n  ckptctl matrix --model gpt\n\n  ckptctl matrix --model all --json\n\n"
                    "  ckptctl matrix --pairs tp2pp4:tp4pp2,tp1pp1:tp2pp2")
def matrix(
    model: str = typer.Option("gpt", "--model", help="Family, or 'all'."),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="Comma-separated SRC:DST layouts (default: Megatron's test pairs)."),
    no_optimizer: bool = typer.Option(False, "--no-optimizer", help="Examples without optimizer state (default: "
                                      "Adam, or the distributed optimizer when DP > 1, converted and verified)."),
    nproc: NprocOpt = None,
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where to keep the checkpoints (default: temporary)."),
    json_out: JsonOpt = False,
):
    """Sweep layout pairs: make a source, convert, verify; print a table. Exit 1 if any pair fails."""
    from ckptctl.matrix import run_matrix

    with output.progress(not json_out) as prog:
        rows = run_matrix(model, pairs, nproc, workdir, prog, optimizer=not no_optimizer)
    if json_out:
        output.emit_json({"pairs": rows, "ok": all(r["result"] == "pass" for r in rows)})
    else:
        output.table(f"ckptctl matrix --model {model}", ["family", "pair", "result", "seconds", "bytes", "GB/s", "detail"],
                     [[r["family"], r["pair"], ("[green]pass[/]" if r["result"] == "pass" else "[red]FAIL[/]"),
                       f"{r['seconds']:.2f}", output.human_bytes(r["bytes"]), f"{r['gbps']:.3f}",
                       r.get("detail", "") or r.get("note", "")]
                      for r in rows])
    if not all(r["result"] == "pass" for r in rows):
        raise typer.Exit(1)


def main() -> None:
    debug = "--debug" in sys.argv or os.environ.get("CKPTCTL_DEBUG")
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        rc = app(standalone_mode=False)  # click returns Exit codes instead of raising in this mode
        sys.exit(rc if isinstance(rc, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        output.error("aborted")
        sys.exit(3)
    except CkptctlError as e:
        output.error(str(e), None if debug else "set CKPTCTL_DEBUG=1 or pass --debug for a traceback")
        if debug:
            traceback.print_exc()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        output.error("interrupted")
        sys.exit(3)
    except Exception as e:  # noqa: BLE001 - an internal error is exit 3 with one line
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):   # typer's (vendored click) usage errors
            output.error(e.format_message())
            sys.exit(2)
        output.error(f"internal error: {type(e).__name__}: {e}", "set CKPTCTL_DEBUG=1 for a traceback")
        if debug:
            traceback.print_exc()
        sys.exit(3)
