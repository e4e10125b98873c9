"""The markdown table of benchmarks/rehearse.py's results (the runs, verify, the 671B projections)."""
from __future__ import annotations

# Pai-Megatron-Patch's published figure (DeepSeek-V3-671B, HF -> mcore weights, 4 nodes x 8 GPUs)
PUBLISHED = {"what": "Pai-Megatron-Patch, DeepSeek-V3-671B HF -> mcore, weights only, 4 nodes x 8 GPUs",
             "seconds": 5 * 60 + 22}


def table(res: dict) -> str:
    g = res["generated"]
    lines = [f"### Multi-node rehearsal: {g['bytes'] / 1e9:.2f} GB GPT with distributed-optimizer state "
             f"({g['options']['layers']} layers, hidden {g['options']['hidden']}), {res['src']} -> {res['dst']}, "
             f"{res['cpus']} cores, one host (node groups on 127.0.0.1)", "",
             "| node groups x workers | wall s | convert phases s | fixed s | GB moved | GB/s total | GB/s per node "
             "| GB/s per worker (mean) | GB/s per worker (plan --gbps) | speed-up (phases) | efficiency "
             "| peak RSS, one process |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['groups']} x {r['workers_per_group']} | {r['wall_s']:.1f} | {r['phases_s']:.1f} | "
                     f"{r['fixed_s']:.1f} | {r['moved_bytes'] / 1e9:.1f} | {r['gbps_total']:.2f} | "
                     f"{r['gbps_per_node']:.2f} | {r['gbps_per_worker_mean']:.3f} | {r['gbps_per_worker']:.3f} | "
                     f"{r.get('speedup', float('nan')):.2f} | {r.get('efficiency', float('nan')):.2f} | "
                     f"{r.get('peak_rss_max', 0) / 2**20:.0f} MiB |")
    if res.get("verify"):
        v = res["verify"]
        lines += ["", f"verify (--nproc {v['nproc']}): {v['result']}, {v['seconds']:.1f} s"]
    for key, label in (("projection", "measured"), ("projection_conservative", "slowest multi-group")):
        p = res.get(key)
        if p:
            lines += ["", f"Projection ({label} rate {p['gbps_per_worker']:.3f} GB/s per worker): 671B with optimizer "
                      f"state ({p['store_bytes'] / 1e12:.2f} TB) on {p['nodes']} nodes x {p['workers_per_node']} "
                      f"workers: **{p['seconds']:.0f} s ({p['seconds'] / 60:.1f} min)** = {p['fixed_s']:.0f} s fixed + "
                      f"{p['phases_s']:.0f} s moving {p['moved_bytes'] / 1e12:.1f} TB (needs "
                      f"{p['aggregate_gbps_needed']:.0f} GB/s aggregate, {p['per_node_gbps_needed']:.2f} GB/s "
                      "per node, from the shared filesystem)"]
            lines.append(f"  `{p['command']}`")
    if res.get("projections_by_workers"):
        lines += ["", "| 671B + optimizer state on N nodes x W workers, at the measured rate | projected s | "
                  "min | GB/s per node needed |", "|---|---|---|---|"]
        for p in res["projections_by_workers"]:
            lines.append(f"| {p['nodes']} x {p['workers_per_node']} at {p['gbps_per_worker']:.3f} GB/s per worker | "
                         f"{p['seconds']:.0f} | {p['seconds'] / 60:.1f} | {p['per_node_gbps_needed']:.2f} |")
    lines += ["", f"Published: {PUBLISHED['what']}: {PUBLISHED['seconds']} s "
              f"({PUBLISHED['seconds'] // 60} min {PUBLISHED['seconds'] % 60} s)"]
    return "\n".join(lines)
