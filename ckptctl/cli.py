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
from ckptctl.paths import require_checkpoint

from ckptctl import cli_style  # noqa: E402  (help without type tags on flags; before commands are built)

app = typer.Typer(add_completion=True, no_args_is_help=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Reshard Megatron checkpoints between parallel layouts, bitwise, and prove it.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (errors too: "
                                       '{"ok": false, "error": ..., "exit_code": ...}).')]
NprocOpt = Annotated[Optional[int], typer.Option("--nproc", help="Worker processes on this node (default: cores, "
                                                 "at most 8; never more than rank files; 0 = run in this process).")]
VocabOpt = Annotated[Optional[int], typer.Option("--true-vocab-size", help="True (unpadded) vocabulary size, when "
                                                 "the checkpoint's args.vocab_size is None: needed to re-pad for a new TP.")]


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", "-V", help="Print the version and exit.", is_eager=True),
    debug: bool = typer.Option(False, "--debug", help="Tracebacks on errors (also CKPTCTL_DEBUG=1); accepted "
                               "anywhere on the command line."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no text results, only errors "
                               "(--json output is still printed); accepted anywhere on the command line."),
):
    """Reshard Megatron checkpoints between parallel layouts, bitwise, and prove it.

    Start with `ckptctl inspect CKPT`, plan with `ckptctl convert SRC DST --to L --dry-run`.
    """
    if version:
        output.say(f"ckptctl {cli_style.version()}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


def _layout(text: Optional[str], tp=None, pp=None, vpp=None, ep=None, etp=None, dp=None) -> Optional[Layout]:
    """--to plus the --tp/--pp/... parts: a part given both ways must agree (exit 2 otherwise)."""
    if text is None and all(v is None for v in (tp, pp, vpp, ep, etp, dp)):
        return None
    if text is not None and not text.strip():   # `--to ''` (an unset shell variable) is not tp1pp1
        raise BadInput("--to: empty layout; give one such as tp2pp2")
    flags = {"tp": tp, "pp": pp, "vpp": vpp, "ep": ep, "etp": etp, "dp": dp}
    if text:
        parse_layout(text)   # malformed text is refused first, naming the expected form
        given = cli_style.layout_parts(text)
        for k, v in flags.items():
            if v is not None and k in given and given[k] != v:
                raise BadInput(f"--to {text} gives {k}{given[k]} but --{k} {v}: give each part once")
    return parse_layout(text or "", **flags)


@app.command(epilog="Examples:\n\n  ckptctl example gpt --layout tp2pp2 --out src\n\n"
                    "  ckptctl example gpt --layout tp1pp4vpp2 --swiglu --groups 2 --out src")
def example(
    family: Annotated[str, typer.Argument(help=f"Model family: {cli_style.families()}.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to create.")],
    layout: Annotated[str, typer.Option("--layout", help="Layout, e.g. tp2pp2, tp1pp4vpp2, tp2pp1ep2.")] = "tp1pp1",
    layers: Optional[int] = typer.Option(None, help="Number of layers (default 8)."),
    hidden: Optional[int] = typer.Option(None, help="Hidden size (default 64)."),
    heads: Optional[int] = typer.Option(None, help="Attention heads (default 8)."),
    groups: Optional[int] = typer.Option(None, help="Query groups for GQA (default = heads)."),
    ffn: Optional[int] = typer.Option(None, help="FFN hidden size (default 128)."),
    vocab: Optional[int] = typer.Option(None, help="True vocabulary size (default 128)."),
    swiglu: bool = typer.Option(False, "--swiglu/--no-swiglu", help="Gated MLP (GLU fc1)."),
    tied: Optional[bool] = typer.Option(None, "--tied/--untied", help="Tie embedding and output weights "
                                        "(default: untied; BERT tied, as Megatron-LM)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    experts: Optional[int] = typer.Option(None, help="Number of experts (MoE; default 8)."),
    moe_ffn: Optional[int] = typer.Option(None, "--moe-ffn", help="Expert FFN hidden size (MoE; default 64)."),
    grouped: bool = typer.Option(False, "--grouped/--sequential", help="TEGroupedMLP expert keys (MoE; default SequentialMLP)."),
    shared_ffn: Optional[int] = typer.Option(None, "--shared-ffn", help="Shared expert FFN hidden size (MoE)."),
    bias: Optional[bool] = typer.Option(None, "--bias/--no-bias", help="Linear biases (default: on; off for MoE)."),
    binary_head: Optional[bool] = typer.Option(None, "--binary-head/--no-binary-head",
                                               help="BERT pooler and binary head (default: on)."),
    tokentypes: Optional[int] = typer.Option(None, help="BERT token types (default: 2 with the binary head, else 0)."),
    encoder_layers: Optional[int] = typer.Option(None, "--encoder-layers", help="T5 encoder layers (default: --layers)."),
    position: Optional[str] = typer.Option(None, help="Positions: learned_absolute (default) or rope; T5 also relative."),
    norm: Optional[str] = typer.Option(None, "--norm", help="Normalization: LayerNorm (default) or RMSNorm."),
    qkv_bias: Optional[bool] = typer.Option(None, "--qkv-bias/--no-qkv-bias", help="Biases on QKV only "
                                            "(Megatron's --add-qkv-bias, Qwen2-style; default: as --bias)."),
    shared_gate: bool = typer.Option(False, "--shared-gate/--no-shared-gate", help="Sigmoid gate on the shared "
                                     "expert (MoE; Megatron's --moe-shared-expert-gate)."),
    mla: bool = typer.Option(False, "--mla/--no-mla", help="Multi-latent attention, DeepSeek-V3 style (local spec, "
                             "small LoRA ranks, q/kv layernorms)."),
    mtp: Optional[int] = typer.Option(None, "--mtp", help="Multi-token prediction layers (GPT, MoE)."),
    dense_layers: Optional[int] = typer.Option(None, "--dense-layers", help="First k layers dense, the rest MoE "
                                               "(MoE; DeepSeek-V3's first-k dense)."),
    expert_bias: bool = typer.Option(False, "--expert-bias/--no-expert-bias", help="Router expert bias "
                                     "(MoE; aux-loss-free balancing, sigmoid scores)."),
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
    fmt: str = typer.Option("legacy", "--format", help="Checkpoint format: legacy (Megatron's `torch`) or torch_dist."),
    optim_sharding: Optional[str] = typer.Option(None, "--optim-sharding", help="torch_dist target: distributed-optimizer "
                                                 "state as dp_reshardable (default, as Megatron-LM saves) or fully_reshardable."),
    json_out: JsonOpt = False,
):
    """Write a small random checkpoint in Megatron's legacy (or torch_dist) format."""
    from ckptctl.example import example as make
    from ckptctl.formats import registry
    from ckptctl.models import get_family
    get_family(family)   # an unknown family is refused naming the known ones, before anything is written
    fmt = registry.get(registry.canonical(fmt)).name   # an unknown format is refused naming the choices

    res = make(family, parse_layout(layout), out,
               {"layers": layers, "hidden": hidden, "heads": heads, "groups": groups, "ffn": ffn, "vocab": vocab,
                "swiglu": swiglu, "tied": tied, "dtype": dtype, "experts": experts,
                "moe_ffn": moe_ffn, "grouped": grouped or None, "shared_ffn": shared_ffn, "bias": bias,
                "binary_head": binary_head, "tokentypes": tokentypes, "encoder_layers": encoder_layers,
                "position": position, "norm": norm, "qkv_bias": qkv_bias, "shared_gate": shared_gate or None,
                "mla": mla or None, "mtp": mtp, "dense_layers": dense_layers, "expert_bias": expert_bias or None, "pattern": pattern, "mamba_heads": mamba_heads, "mamba_groups": mamba_groups,
                "mamba_state": mamba_state, "mamba_head_dim": mamba_head_dim}, seed=seed, overwrite=overwrite, optimizer=optimizer,
               fmt=fmt, optim_sharding=optim_sharding)
    if json_out:
        output.emit_json(res)
    else:
        # The size on disk, as `ckptctl inspect` and `du` report it (weights, optimizer state and the rest).
        on_disk = sum(p.stat().st_size for p in Path(res["out"]).rglob("*") if p.is_file())
        output.say(f"wrote {res['family']} example, layout {res['layout']}: {res['files']} rank files, "
                   f"{output.human_bytes(on_disk)} on disk -> {res['out']}")


@app.command(epilog="Examples:\n\n  ckptctl convert src dst --to tp4pp1\n\n"
                    "  ckptctl convert src store.zarr            (source phase only)\n\n"
                    "  ckptctl convert store.zarr dst --to tp1pp2 (target phase only)")
def convert(
    src: Annotated[Path, typer.Argument(help="Source checkpoint (legacy folder or a ckptctl .zarr store).")],
    dst: Annotated[Path, typer.Argument(help="Destination folder (or STORE.zarr).")],
    to: Annotated[Optional[str], typer.Option("--to", help="Target layout, parts in any order: tp4pp2, pp2tp4, "
                                              "tp2pp2vpp2, tp4dp2pp1, tp2pp1ep4etp1 (absent parts 1; ETP = TP).")] = None,
    tp: Optional[int] = typer.Option(None, "--tp", help="Target tensor-parallel size (or the tp part of --to)."),
    pp: Optional[int] = typer.Option(None, "--pp", help="Target pipeline-parallel size."),
    vpp: Optional[int] = typer.Option(None, "--vpp", help="Target virtual pipeline stages per PP rank."),
    ep: Optional[int] = typer.Option(None, "--ep", help="Target expert-parallel size (MoE)."),
    etp: Optional[int] = typer.Option(None, "--etp", help="Target expert tensor-parallel size (MoE; default = TP)."),
    dp: Optional[int] = typer.Option(None, "--dp", help="Target data-parallel size (sets the distributed optimizer's "
                                     "shards; default: the least the layout allows)."),
    nproc: NprocOpt = None,
    store: Optional[Path] = typer.Option(None, "--store", help="Where to put the Zarr pivot (kept)."),
    keep_store: bool = typer.Option(False, "--keep-store", help="Keep the store as DST.zarr."),
    true_vocab: VocabOpt = None,
    rng: str = typer.Option("auto", "--rng", help="RNG state: auto, carry, replicate or drop."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing destination."),
    no_optimizer: bool = typer.Option(False, "--no-optimizer", help="Drop optimizer state instead of converting it."),
    fresh_optimizer: Optional[str] = typer.Option(None, "--fresh-optimizer", help="Hugging Face source: KIND[,lr=...]: a fresh optimizer state (docs/hf.md)."),
    moe_grouped_gemm: bool = typer.Option(False, "--moe-grouped-gemm", help="Hugging Face MoE source: write TE grouped-GEMM expert keys."),
    allow_divergent_replicas: bool = typer.Option(False, "--allow-divergent-replicas", help="Where copies of a "
                                                  "replicated tensor differ between rank files, take the first "
                                                  "file's copy instead of refusing."),
    resume: bool = typer.Option(False, "--resume", help="Continue a convert of this destination that was killed: "
                                "keep the store arrays and rank files it finished (checksummed), redo the rest."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="RSS budget per worker, e.g. 2G, 512M (default 2G)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Nodes of a multi-node job (run the same command on each)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's rank (node 0 commits the output)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Node 0's address (multi-node)."),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="A free port on node 0 (multi-node)."),
    to_format: Optional[str] = typer.Option(None, "--to-format", help="legacy (Megatron's --ckpt-format torch; `torch` "
                                            "is accepted), torch_dist or hf (Hugging Face safetensors; no --to) "
                                            "(default: the source's format; legacy from an hf source given --to)."),
    format_option: Optional[list[str]] = typer.Option(None, "--format-option", help="A target format's option "
                                                      "KEY=VALUE, repeatable (hf: shard_size=5GB, dtype=bfloat16, "
                                                      "arch=mistral, bos_token_id=1, eos_token_id=2)."),
    optim_sharding: Optional[str] = typer.Option(None, "--optim-sharding", help="torch_dist target: distributed-optimizer "
                                                 "state as dp_reshardable (default, as Megatron-LM saves) or fully_reshardable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan (files, bytes per "
                                 "filesystem against free space, workers, memory, what happens to each piece of "
                                 "state); write nothing."),
    first_layers: Optional[int] = typer.Option(None, "--decoder-first-pipeline-num-layers", help="Target: layers on "
                                               "the first pipeline stage (as Megatron-LM's option; 0 = unset). "
                                               "Default: the source's split when it fits the target."),
    last_layers: Optional[int] = typer.Option(None, "--decoder-last-pipeline-num-layers", help="Target: layers on "
                                              "the last pipeline stage (0 = unset)."),
    pp_layout: Optional[str] = typer.Option(None, "--pipeline-model-parallel-layout", help="Target: Megatron's "
                                            "explicit stage layout, e.g. 'Et*3|(tttt|)*14,ttL' (E, t, L; '|' "
                                            "between the PP*VPP stages)."),
    digest: bool = typer.Option(False, "--digest", help="Also write the source's digest to DST/ckptctl-digest.json "
                                "(one more read of the source); `ckptctl digest DST` then compares with it."),
    json_out: JsonOpt = False,
):
    """Convert a checkpoint to another parallel layout (through worker processes and a Zarr store)."""
    from ckptctl.guard import refuse_under_launcher
    refuse_under_launcher(nnodes)   # before the heavy imports: under torchrun/srun every copy refuses within a second
    require_checkpoint(src)
    from ckptctl.convert import convert as run
    from ckptctl.reshard.launch import Nodes
    from ckptctl.reshard.stream import parse_size
    from ckptctl.pipeline import with_options
    target = with_options(_layout(to, tp, pp, vpp, ep, etp, dp), first_layers, last_layers, pp_layout)
    with output.progress(not json_out and not dry_run) as prog:
        rep = run(src, dst, target, store=store, keep_store=keep_store, nproc=nproc, true_vocab=true_vocab,
                  rng=rng, overwrite=overwrite, progress=prog, optimizer=not no_optimizer,
                  max_memory=parse_size(max_memory), nodes=Nodes(nnodes, node_rank, master_addr, master_port),
                  to_format=to_format, optim_sharding=optim_sharding, dry_run=dry_run,
                  allow_divergent_replicas=allow_divergent_replicas, resume=resume, fresh_optimizer=fresh_optimizer,
                  moe_grouped_gemm=moe_grouped_gemm,
                  format_options=cli_style.key_values(format_option, "--format-option"))
    if dry_run:
        from ckptctl import dryrun
        output.emit_json(rep) if json_out else dryrun.render(rep, output.say)
        if not rep["ok"]:
            raise typer.Exit(2)
        return
    if digest and node_rank == 0:   # after the commit: a failed convert costs no digest
        from ckptctl.digest_record import record_source
        with output.progress(not json_out) as prog:
            record_source(src, dst, rep, true_vocab, parse_size(max_memory), nproc, prog)
    from ckptctl.convert_summary import render, to_json
    if json_out:
        output.emit_json(to_json(rep))
        return
    render(rep, output.say)


@app.command(epilog="Examples:\n\n  ckptctl verify src dst\n\n  ckptctl verify src dst --json")
def verify(
    a: Annotated[Path, typer.Argument(help="First checkpoint.")],
    b: Annotated[Path, typer.Argument(help="Second checkpoint (any layout).")],
    strict: bool = typer.Option(False, "--strict", help="Fail on allowed differences too (vocab padding rows, "
                                "rewritten args); the verdict names them."),
    weights_only: bool = typer.Option(False, "--weights-only", help="Compare model weights only, not optimizer or "
                                      "training state (e.g. a copy converted with --no-optimizer)."),
    true_vocab: VocabOpt = None,
    all_rows: bool = typer.Option(False, "--all", help="List every tensor, not only the differing ones."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="RSS budget, e.g. 2G, 512M (default 2G): "
                                             "tensors are compared in boxes that fit it (per worker)."),
    nproc: int = typer.Option(1, "--nproc", help="Workers comparing global tensors in parallel (forked; each "
                              "gathers its share from both checkpoints, the report is the same)."),
    by_digest: bool = typer.Option(False, "--digest", help="Compare layout-free digests first (ckptctl digest, "
                                   "--nproc workers per side): equal ends it; else the byte comparison names what "
                                   "differs. Not with --strict (the digest leaves vocab padding rows out)."),
    json_out: JsonOpt = False,
):
    """Compare two checkpoints, in any layouts, byte for byte. Exit 0 equal, 1 different."""
    require_checkpoint(a)
    require_checkpoint(b)
    from ckptctl.reshard.stream import parse_size
    from ckptctl.verify import verify as run
    from ckptctl import verify_report
    if by_digest and not strict:   # equal digests end it; else the byte comparison below names what differs
        from ckptctl.digest_cmd import verify_first
        if verify_first(a, b, true_vocab, parse_size(max_memory), nproc, weights_only, json_out):
            raise typer.Exit(0)

    with output.progress(not json_out) as prog:
        rep = run(a, b, true_vocab, max_memory=parse_size(max_memory), weights_only=weights_only, progress=prog,
                  nproc=nproc)
    failed, line = verify_report.verdict(rep, strict)
    verify_report.add_locations(rep, a, b, true_vocab)
    if json_out:
        d = rep.to_json()
        d["ok"], d["verdict"], d["differ_by_kind"] = not failed, line, verify_report.counts(rep)
        d["wall_seconds"] = round(output.wall_seconds(), 3)
        for dj, diff in zip(d["differences"], rep.differences):
            dj["kind"] = verify_report.kind_of(diff)
            dj["where_a"], dj["where_b"] = getattr(diff, "where_a", None), getattr(diff, "where_b", None)
        output.emit_json(d)
    elif not output.QUIET:
        rows = [[r["key"], r["dtype"], "x".join(map(str, r["shape"])), r["status"]] for r in rep.table
                if all_rows or r["status"] != "equal"]
        if rows:
            output.table(f"verify {rep.layout_a} vs {rep.layout_b}", ["tensor", "dtype", "shape", "status"], rows)
        for d in rep.differences:
            where = f" at {d.first_nd_index} (a={d.a_hex}, b={d.b_hex})" if d.first_nd_index is not None else ""
            output.out.print(f"[red]DIFF[/] {d.key}: {d.reason}" + (f", {d.count} elements" if d.count else "")
                             + where + (f" [{d.where}]" if d.where else ""), highlight=False)
            for side in ("a", "b"):
                w = getattr(d, f"where_{side}", None)
                if w:
                    output.say(f"     {side}: {w['file']} {w['tensor']} element {w['local_index']} "
                               f"(byte {w['byte_offset']} of that tensor)")
        for x in rep.allowed:
            output.out.print(f"[yellow]note[/] {x['key']}: {x['reason']}", highlight=False)
        color = "red" if failed else "green"
        word, rest = line.split(":", 1) if ":" in line else (line, "")
        output.out.print(f"[{color}]{word}[/]:{rest}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(1 if failed else 0)


@app.command(epilog="Examples:\n\n  ckptctl digest src\n\n  ckptctl digest dst --nproc 16 --json\n\n"
                    "  ckptctl digest dst --check src-digest.json")
def digest(
    ckpt: Annotated[Path, typer.Argument(help="A checkpoint folder (legacy or torch_dist) or a ckptctl .zarr store.")],
    nproc: NprocOpt = None,
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="RSS budget per worker, e.g. 2G (default 2G)."),
    true_vocab: VocabOpt = None,
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the digest as a JSON record to this file."),
    check: Optional[Path] = typer.Option(None, "--check", help="Compare with a digest record (a file, or a folder "
                                         "holding ckptctl-digest.json); exit 1 naming what differs. A record "
                                         "inside CKPT (convert --digest) is always compared."),
    all_rows: bool = typer.Option(False, "--all", help="List every tensor's hash."),
    json_out: JsonOpt = False,
):
    """Fingerprint the model and optimizer state, independent of layout and format. Exit 1 on a mismatch."""
    require_checkpoint(ckpt)
    from ckptctl import digest_cmd
    raise typer.Exit(digest_cmd.run(ckpt, nproc, max_memory, true_vocab, out, check, all_rows, json_out))


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
        output.table(f"ckptctl matrix --model {model}", ["family", "pair", "result", "seconds", "bytes", "speed", "detail"],
                     [[r["family"], r["pair"], ("[green]pass[/]" if r["result"] == "pass" else "[red]FAIL[/]"),
                       f"{r['seconds']:.2f}", output.human_bytes(r["bytes"]), output.rate(r["bytes"], r["seconds"]),
                       r.get("detail", "") or r.get("note", "")]
                      for r in rows])
    if not all(r["result"] == "pass" for r in rows):
        raise typer.Exit(1)


@app.command("plan", epilog="Examples:\n\n  ckptctl plan examples/deepseek-v3-671b.json --from tp8pp16ep64etp1 "
                            "--to tp4pp8ep32etp1 --decoder-first-pipeline-num-layers 7 --decoder-last-pipeline-num-layers 6"
                            "\n\n  ckptctl plan model.yaml --from tp2pp2 --to tp4pp1 --nodes 4 --workers 8 --gbps 1.5 --json")
def plan_cmd(
    config: Annotated[Path, typer.Argument(help="Model config: a JSON or YAML file of Megatron-LM args "
                                           "(num_layers, hidden_size, num_attention_heads, vocab_size, bf16, ...).")],
    src: str = typer.Option(..., "--from", help="Source layout, e.g. tp8pp16ep64etp1."),
    to: str = typer.Option(..., "--to", help="Target layout, e.g. tp4pp8ep32etp1."),
    first: Optional[int] = typer.Option(None, "--decoder-first-pipeline-num-layers", help="Target's first-stage layers (0 = unset)."),
    last: Optional[int] = typer.Option(None, "--decoder-last-pipeline-num-layers", help="Target's last-stage layers (0 = unset)."),
    pp_layout: Optional[str] = typer.Option(None, "--pipeline-model-parallel-layout", help="Target's explicit stage layout."),
    no_optimizer: bool = typer.Option(False, "--no-optimizer", help="Plan the weights only."),
    nodes: int = typer.Option(1, "--nodes", help="Nodes of the projected run."),
    workers: int = typer.Option(8, "--workers", help="Workers per node of the projected run."),
    gbps: Optional[float] = typer.Option(None, "--gbps", help="Per-worker throughput in GB/s (read + write); "
                                         "default: measured here (a write + fsync + read probe)."),
    node_gbps: Optional[float] = typer.Option(None, "--node-gbps", help="Per-node cap in GB/s (filesystem or NIC)."),
    measure_dir: Optional[str] = typer.Option(None, "--measure-dir", help="Folder for the throughput probe (default: temp)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Per-worker memory budget, as convert's (default 2G)."),
    json_out: JsonOpt = False,
):
    """Plan a conversion from a model config, with no checkpoint: files, arrays, bytes, memory, time."""
    from ckptctl import plan_cmd as pc
    from ckptctl.pipeline import with_options
    budget = None
    if max_memory is not None:
        from ckptctl.reshard.stream import parse_size
        budget = parse_size(max_memory)
    d = pc.run(config, parse_layout(src), with_options(parse_layout(to), first, last, pp_layout),
               with_optimizer=not no_optimizer, nodes=nodes, workers=workers, gbps=gbps, node_gbps=node_gbps,
               measure_dir=measure_dir, max_memory=budget)
    if json_out:
        output.emit_json(d)
    else:
        pc.render(d, output.say)


@app.command(epilog="Examples:\n\n  ckptctl inspect src\n\n  ckptctl inspect src --json\n\n  ckptctl inspect dst.zarr")
def inspect(
    ckpt: Annotated[Path, typer.Argument(help="A checkpoint folder (legacy `torch` or torch_dist) or a ckptctl .zarr store.")],
    true_vocab: VocabOpt = None,
    json_out: JsonOpt = False,
):
    """Show what a checkpoint holds, from its metadata (no tensor is read).

    Family, format, layout and world size, iteration, model config, optimizer kind and sharding,
    training state, tensors and bytes per kind.
    """
    require_checkpoint(ckpt)
    from ckptctl import inspect_cmd
    d = inspect_cmd.describe(ckpt, true_vocab)
    if json_out:
        output.emit_json(d)
    else:
        inspect_cmd.render(d, output.say)


def main() -> None:
    debug = "--debug" in sys.argv or os.environ.get("CKPTCTL_DEBUG")
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    output.QUIET = False
    for q in ("--quiet", "-q"):   # global flags, accepted anywhere on the line (documented in --help)
        if q in sys.argv[1:]:
            sys.argv.remove(q)
            output.QUIET = True
    output.JSON_MODE = "--json" in sys.argv[1:]
    from ckptctl.guard import Interrupted, install_signal_handlers, restore_signal_handlers
    prev = install_signal_handlers()   # SIGINT/SIGTERM/SIGHUP -> Interrupted: workers stopped, work folder removed
    try:
        rc = app(standalone_mode=False)  # click returns Exit codes instead of raising in this mode
        sys.exit(rc if isinstance(rc, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        output.error("aborted", exit_code=3)
        sys.exit(3)
    except Interrupted as e:   # one line; exit 128 + the signal's number, as shells report it
        output.error(str(e), exit_code=e.exit_code)
        sys.exit(e.exit_code)
    except CkptctlError as e:
        output.error(str(e), None if debug else "set CKPTCTL_DEBUG=1 or pass --debug for a traceback", e.exit_code)
        if debug:
            traceback.print_exc()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        output.error("interrupted", exit_code=3)
        sys.exit(3)
    except Exception as e:  # noqa: BLE001 - an internal error is exit 3 with one line
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):   # typer's (vendored click) usage errors
            output.error(e.format_message(), exit_code=2)
            sys.exit(2)
        output.error(f"internal error: {type(e).__name__}: {e}", "set CKPTCTL_DEBUG=1 for a traceback", 3)
        if debug:
            traceback.print_exc()
        sys.exit(3)
    finally:
        restore_signal_handlers(prev)   # main() called in-process (tests) leaves the caller's handlers
