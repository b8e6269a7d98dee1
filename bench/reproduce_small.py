#!/usr/bin/env python
"""The paper's Figure 2 in miniature: Pre-LN vs NormFormer at equal compute, over several seeds.

Both variants are trained with ``pretrain_gpt.py`` (subprocesses, ``--metrics-file``), so the real
framework is measured. The recipe is the paper's, scaled down: Adam (0.9, 0.98), eps 1e-8, weight
decay 0.01, no clipping, linear warm-up then linear decay to 0, and NormFormer at 3x the baseline
learning rate (Table 1 at 125M: 3e-3 vs 1e-3).

Equal compute means equal wall-clock, as in the paper ("an equal amount of GPU time"). Each
variant's step time is first measured interleaved in one process (bench/throughput.py), then each
run gets ``--max-seconds / step time`` iterations, so its LR schedule ends exactly at the budget,
and NormFormer, being slower per step, gets fewer steps. The x axis is iterations x that measured
step time (so noise from other processes during the runs does not move the curves); the FLOPs
(training/metrics.py) and the wall-clock the runs actually logged are recorded too.

Writes ``OUT/reproduce_small.png`` (validation perplexity vs compute, mean +- std over seeds, the
"green star" where NormFormer first matches Pre-LN's best) and ``OUT/reproduce_small.json``.

    python bench/reproduce_small.py                        # demo corpus (make demo), 3 seeds, 10-15 min
    python bench/reproduce_small.py --seeds 5 --max-seconds 600 --num-layers 6 --hidden-size 256 \\
        --data-path PREFIX --tokenizer-type GPT2BPETokenizer --vocab-file V --merge-file M
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.data_args import add_data_args, add_model_shape_args, data_flags, vocab_size  # noqa: E402

NORMFORMER_FLAGS = ["--scale-attn", "--scale-fc", "--scale-heads", "--scale-resids"]
VARIANTS = ("preln", "normformer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p, mock=True)
    m = add_model_shape_args(p, "model and recipe")
    m.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout")
    m.add_argument("--lr-baseline", type=float, nargs="+", default=[1e-3, 3e-3],
                   help="Pre-LN peak LR(s); with several, each is run for every seed and the one "
                        "with the lowest mean final perplexity is compared (default 1e-3 3e-3: "
                        "the paper tuned both models' LRs, Table 1)")
    m.add_argument("--lr-normformer", type=float, nargs="+", default=[1e-3, 3e-3],
                   help="NormFormer peak LR(s), chosen the same way (default 1e-3 3e-3)")
    m.add_argument("--warmup-fraction", type=float, default=0.05, help="warm-up steps / run steps")
    r = p.add_argument_group("budget")
    r.add_argument("--max-seconds", type=float, default=100.0,
                   help="training wall-clock of every run (equal compute); default 100")
    r.add_argument("--iters", type=int, nargs=2, metavar=("PRELN", "NORMFORMER"), default=None,
                   help="give each variant this many iterations instead of --max-seconds / step time "
                        "(the compute axis still uses the step times)")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--evals", type=int, default=16, help="validation points per run")
    r.add_argument("--eval-iters", type=int, default=4, help="batches per validation")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    r.add_argument("--parallel-runs", type=int, default=2,
                   help="runs at once (default 2: each seed's Pre-LN and NormFormer side by side)")
    r.add_argument("--step-ms", type=float, nargs=2, metavar=("PRELN", "NORMFORMER"), default=None,
                   help="skip the step-time measurement and use these ms/iter")
    r.add_argument("--resume", action="store_true",
                   help="reuse the runs in --output-dir that already finished (same flags): an "
                        "interrupted sweep continues where it stopped")
    r.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "reproduce_small"),
                   help="default runs/reproduce_small (git-ignored)")
    return p


# -- compute matching ("green star") -----------------------------------------------------------

def green_star(base_x: Sequence[float], base_y: Sequence[float], nf_x: Sequence[float],
               nf_y: Sequence[float]) -> Optional[Dict]:
    """The first NormFormer point whose ppl is at or below Pre-LN's lowest ppl (paper Fig. 2).

    Returns its compute, its ppl, Pre-LN's best ppl and the compute at which Pre-LN reached it,
    ``fraction_of_baseline_run`` = NormFormer's compute / Pre-LN's whole run (the paper's "needing
    only 60 % as much compute") and ``savings`` = 1 - (NormFormer's compute / Pre-LN's compute at
    its best), which differ when Pre-LN's best is not its last point; None if never.
    """
    best_i = min(range(len(base_y)), key=lambda i: base_y[i])
    best = base_y[best_i]
    for x, y in zip(nf_x, nf_y):
        if y <= best:
            return dict(compute=x, ppl=y, baseline_best_ppl=best, baseline_best_compute=base_x[best_i],
                        fraction_of_baseline_run=x / base_x[-1], savings=1.0 - x / base_x[best_i])
    return None


# -- runs --------------------------------------------------------------------------------------

def model_flags(args) -> List[str]:
    return ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length),
            "--max-position-embeddings", str(args.seq_length),
            "--hidden-dropout", str(args.dropout), "--attention-dropout", str(args.dropout)]


def measure_step_ms(args, vocab: int, data: List[str]) -> Dict[str, float]:
    """ms/iter of each variant under pretrain_gpt.py.

    The NormFormer / Pre-LN ratio is measured interleaved in one process (bench/throughput.py),
    which cancels machine noise; the absolute scale is the median logged step time of a short
    calibration run of each variant, launched side by side exactly as the real runs are, so it
    includes the DeepSpeed engine, the data loader and the load of the neighbouring run.
    """
    from bench.throughput import run as throughput

    with ThreadPoolExecutor(max_workers=max(1, args.parallel_runs)) as pool:
        futures = {v: pool.submit(train_one, args, v, 1, 40, data, "calibrate_") for v in VARIANTS}
        logged = {v: [r["ms_per_iter"] for r in f.result() if "ms_per_iter" in r][1:] for v, f in futures.items()}

    out = throughput(["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
                      "--num-attention-heads", str(args.num_attention_heads),
                      "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
                      "--vocab-size", str(vocab), "--hidden-dropout", str(args.dropout),
                      "--attention-dropout", str(args.dropout), "--threads", str(args.threads),
                      "--variants", "ours-preln,ours-normformer",
                      "--iters", "24", "--repeats", "12", "--warmup-iters", "3"] + NORMFORMER_FLAGS)
    preln = statistics.median(logged["preln"])
    return {"preln": preln, "normformer": preln * (1 + out["overhead_pct"] / 100),
            "calibration_logged": {v: statistics.median(x) for v, x in logged.items()},
            "overhead_pct_interleaved": out["overhead_pct"]}


def train_one(args, variant: str, seed: int, iters: int, data: List[str], tag: str = "",
              lr: Optional[float] = None) -> List[Dict]:
    """One pretrain_gpt.py run; returns its metrics-file records (no evaluation when ``tag``).
    ``lr``: the peak LR (default: the variant's first ``--lr-*``)."""
    os.makedirs(os.path.join(args.output_dir, "runs"), exist_ok=True)
    if lr is None:
        lr = (args.lr_normformer if variant == "normformer" else args.lr_baseline)[0]
    stem = os.path.join(args.output_dir, "runs", f"{tag}{variant}_lr{lr:g}_seed{seed}")
    metrics = stem + ".jsonl"
    if os.path.exists(metrics):
        if args.resume and not tag:
            with open(metrics) as f:
                records = [json.loads(line) for line in f if line.strip()]
            if any(r.get("iteration") == iters and "val_ppl" in r for r in records):
                return records
        os.remove(metrics)
    eval_interval = max(1, iters // args.evals) if not tag else 5
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py")] + model_flags(args) + data + [
        "--micro-batch-size", str(args.micro_batch_size), "--train-iters", str(iters),
        "--lr", str(lr), "--min-lr", "0", "--lr-warmup-iters", str(max(1, round(args.warmup_fraction * iters))),
        "--lr-decay-style", "linear", "--adam-beta1", "0.9", "--adam-beta2", "0.98", "--adam-eps", "1e-8",
        "--weight-decay", "0.01", "--clip-grad", "0", "--seed", str(seed), "--num-workers", "0",
        "--log-interval", str(eval_interval), "--eval-interval", str(eval_interval),
        "--eval-iters", "0" if tag else str(args.eval_iters), "--metrics-file", metrics]
    cmd += NORMFORMER_FLAGS if variant == "normformer" else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    from megatron_normformer.testing import free_port

    env["MASTER_PORT"] = str(free_port())  # runs side by side each need their own rendezvous
    with open(stem + ".log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed (exit {proc.returncode}); see {stem}.log")
    with open(metrics) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve(records: List[Dict], step_ms: float, flops_per_iter: float) -> Dict:
    """Validation ppl against compute; the wall-clock actually logged as well."""
    train = [r for r in records if "lm_loss" in r]
    val = {r["iteration"]: r["val_ppl"] for r in records if "val_ppl" in r}
    logged_s, last, measured = 0.0, 0, {}
    for r in train:  # ms_per_iter is the mean over the iterations since the previous line
        logged_s += r["ms_per_iter"] / 1000 * (r["iteration"] - last)
        last = r["iteration"]
        measured[last] = logged_s
    its = sorted(val)
    return dict(iterations=its, ppl=[val[i] for i in its],
                compute_s=[i * step_ms / 1000 for i in its],
                flops=[i * flops_per_iter for i in its],
                measured_s=[measured.get(i) for i in its])


def mean_std(values: Sequence[float]):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(curves: Dict[str, List[Dict]]) -> Dict:
    out = {}
    for v in VARIANTS:
        runs = curves[v]
        n = min(len(c["ppl"]) for c in runs)  # same iterations for every seed of a variant
        out[v] = dict(compute_s=runs[0]["compute_s"][:n], flops=runs[0]["flops"][:n],
                      ppl_mean=[mean_std([c["ppl"][i] for c in runs])[0] for i in range(n)],
                      ppl_std=[mean_std([c["ppl"][i] for c in runs])[1] for i in range(n)],
                      final_ppl=[c["ppl"][-1] for c in runs], best_ppl=[min(c["ppl"]) for c in runs])
        out[v]["final_ppl_mean"], out[v]["final_ppl_std"] = mean_std(out[v]["final_ppl"])
    diffs = [n - b for n, b in zip(out["normformer"]["final_ppl"], out["preln"]["final_ppl"])]
    out["final_ppl_diff"] = dict(per_seed=diffs, mean=mean_std(diffs)[0], std=mean_std(diffs)[1])
    b, nf = out["preln"], out["normformer"]
    out["green_star"] = green_star(b["compute_s"], b["ppl_mean"], nf["compute_s"], nf["ppl_mean"])
    out["green_star_per_seed"] = [green_star(cb["compute_s"], cb["ppl"], cn["compute_s"], cn["ppl"])
                                  for cb, cn in zip(curves["preln"], curves["normformer"])]
    return out


def plot(summary: Dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for v, color, label in (("preln", "tab:blue", "Pre-LN"), ("normformer", "tab:orange", "NormFormer")):
        s = summary[v]
        x, y, e = s["compute_s"], s["ppl_mean"], s["ppl_std"]
        ax.plot(x, y, color=color, label=f"{label} (final {s['final_ppl_mean']:.1f} ± {s['final_ppl_std']:.1f})")
        ax.fill_between(x, [a - b for a, b in zip(y, e)], [a + b for a, b in zip(y, e)], color=color, alpha=0.2)
    star = summary["green_star"]
    if star:
        ax.plot([star["compute"]], [star["ppl"]], marker="*", color="green", markersize=16, linestyle="none",
                label=f"matches Pre-LN's best at {100 * star['fraction_of_baseline_run']:.0f}% of Pre-LN's compute")
    ax.set_yscale("log")
    ax.set_xlabel("training compute (wall-clock seconds at the measured step time)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(argv=None) -> Dict:
    args = build_parser().parse_args(argv)
    if args.seeds < 1 or args.max_seconds <= 0:
        raise SystemExit("error: --seeds and --max-seconds must be positive")
    os.makedirs(args.output_dir, exist_ok=True)
    data = data_flags(args)
    vocab = vocab_size(args)
    started = time.time()
    if args.step_ms:
        step_ms = dict(zip(VARIANTS, args.step_ms))
    else:
        step_ms = measure_step_ms(args, vocab, data)
    if args.iters:
        iters = dict(zip(VARIANTS, args.iters))
    else:
        iters = {v: max(2, int(args.max_seconds * 1000 / step_ms[v])) for v in VARIANTS}
    print(f"step time: Pre-LN {step_ms['preln']:.1f} ms, NormFormer {step_ms['normformer']:.1f} ms "
          f"-> {iters['preln']} vs {iters['normformer']} iterations", flush=True)

    from megatron_normformer.config import ModelConfig
    from megatron_normformer.training.metrics import flops_per_iteration

    flops = {}
    for v in VARIANTS:
        nf = v == "normformer"
        cfg = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                          num_attention_heads=args.num_attention_heads, vocab_size=vocab,
                          scale_attn=nf, scale_fc=nf, scale_heads=nf, scale_resids=nf)
        flops[v] = flops_per_iteration(cfg, args.micro_batch_size, args.seq_length, cfg.padded_vocab_size(1))

    lrs = {"preln": args.lr_baseline, "normformer": args.lr_normformer}
    jobs = [(v, lr, 1234 + s) for s in range(args.seeds) for v in VARIANTS for lr in lrs[v]]
    with ThreadPoolExecutor(max_workers=max(1, args.parallel_runs)) as pool:
        futures = {job: pool.submit(train_one, args, job[0], job[2], iters[job[0]], data, lr=job[1])
                   for job in jobs}
        records = {job: f.result() for job, f in futures.items()}
    sweep = {v: {lr: [curve(records[(v, lr, s)], step_ms[v], flops[v])
                      for (vv, ll, s) in jobs if (vv, ll) == (v, lr)] for lr in lrs[v]} for v in VARIANTS}
    # Each variant at its own best peak LR (lowest mean final perplexity over the seeds).
    best_lr = {v: min(lrs[v], key=lambda lr: statistics.fmean(c["ppl"][-1] for c in sweep[v][lr]))
               for v in VARIANTS}
    curves = {v: sweep[v][best_lr[v]] for v in VARIANTS}
    summary = summarize(curves)
    summary["lr_sweep"] = {v: {f"{lr:g}": dict(zip(("final_ppl_mean", "final_ppl_std"),
                                                   mean_std([c["ppl"][-1] for c in sweep[v][lr]])))
                               for lr in lrs[v]} for v in VARIANTS}
    result = dict(command=" ".join([os.path.basename(sys.argv[0])] + list(argv if argv is not None else sys.argv[1:])),
                  machine=_machine(), threads_per_run=args.threads, parallel_runs=args.parallel_runs,
                  max_seconds=args.max_seconds, step_ms=step_ms, iterations=iters, flops_per_iter=flops,
                  lr=best_lr, lrs_tried=lrs,
                  seeds=sorted({s for (v, lr, s) in jobs}), vocab_size=vocab,
                  model=dict(num_layers=args.num_layers, hidden_size=args.hidden_size,
                             num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                             micro_batch_size=args.micro_batch_size, dropout=args.dropout),
                  curves=curves, summary=summary, elapsed_s=time.time() - started)
    png = os.path.join(args.output_dir, "reproduce_small.png")
    title = (f"{args.num_layers}x{args.hidden_size}, {args.seeds} seed(s), {iters['preln']} / "
             f"{iters['normformer']} steps, best LR {best_lr['preln']:g} / {best_lr['normformer']:g}")
    plot(summary, png, title)
    with open(os.path.join(args.output_dir, "reproduce_small.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(report(result), flush=True)
    return result


def _machine() -> str:
    from bench.throughput import machine

    return machine()


def report(r: Dict) -> str:
    s = r["summary"]
    lines = [f"machine: {r['machine']}, {r['threads_per_run']} thread(s) per run, {r['parallel_runs']} runs at once",
             f"equal compute: {r['iterations']['preln']} Pre-LN / {r['iterations']['normformer']} NormFormer "
             f"iterations (step {r['step_ms']['preln']:.1f} / {r['step_ms']['normformer']:.1f} ms)"]
    for v, name in (("preln", "Pre-LN"), ("normformer", "NormFormer")):
        tried = ", ".join(f"{lr}: {x['final_ppl_mean']:.2f} ± {x['final_ppl_std']:.2f}"
                          for lr, x in s["lr_sweep"][v].items())
        lines.append(f"{name:10s} LR sweep, final val ppl (mean ± std): {tried} -> best {r['lr'][v]:g}")
    for v, name in (("preln", "Pre-LN"), ("normformer", "NormFormer")):
        per_seed = ", ".join(f"{p:.2f}" for p in s[v]["final_ppl"])
        lines.append(f"{name:10s} final val ppl {s[v]['final_ppl_mean']:.2f} ± {s[v]['final_ppl_std']:.2f} "
                     f"(seeds: {per_seed}); total {r['iterations'][v] * r['flops_per_iter'][v] / 1e12:.2f} TFLOP")
    d = s["final_ppl_diff"]
    lines.append(f"NormFormer - Pre-LN final ppl: {d['mean']:+.2f} ± {d['std']:.2f} "
                 f"(per seed: {', '.join(f'{x:+.2f}' for x in d['per_seed'])})")
    star = s["green_star"]
    if star:
        lines.append(f"green star (mean curves): NormFormer reaches Pre-LN's best ppl {star['baseline_best_ppl']:.2f} "
                     f"at {star['compute']:.1f} s = {100 * star['fraction_of_baseline_run']:.0f}% of Pre-LN's run "
                     f"(paper, CLM: 60%); Pre-LN first reached it at {star['baseline_best_compute']:.1f} s "
                     f"({100 * star['savings']:+.0f}% compute saved against that point)")
    else:
        lines.append("green star: NormFormer never reached Pre-LN's best ppl on the mean curves")
    per = [f"{100 * g['fraction_of_baseline_run']:.0f}% ({100 * g['savings']:+.0f}%)" if g else "never"
           for g in s["green_star_per_seed"]]
    lines.append(f"green star per seed, % of Pre-LN's run (saved against Pre-LN's best point): {', '.join(per)}")
    return "\n".join(lines)


if __name__ == "__main__":
    run()
