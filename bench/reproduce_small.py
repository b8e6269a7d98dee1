#!/usr/bin/env python
"""The paper's comparison in miniature: Pre-LN vs NormFormer, each at its own best peak LR.

The paper (Table 1) picks each model's peak learning rate from a sweep, then compares validation
perplexity against training compute (Figure 2, the green star where NormFormer first matches the
baseline's best), and reports NormFormer as stable at higher peak LRs than the baseline (Table 4).
This script does the same at a small scale, for the causal LM (``--task gpt``, pretrain_gpt.py)
or the masked LM (``--task bert``, pretrain_bert.py):

1. **Sweep**: every peak LR of ``--lrs`` for both models, with the first seed.
2. **Seeds**: each model's ``--top`` best LRs of the sweep (lowest final validation loss) again
   with every seed of ``--seeds``; each model's best LR is then the one of those with the lowest
   mean final loss.
3. **Report**: each model at its own best LR (mean +- std over seeds), the paired difference
   NormFormer - Pre-LN per seed with a Student-t interval, the green star on the mean curves and
   per seed, and the final loss of every (model, LR, seed) run.

Every run is ``pretrain_gpt.py`` / ``pretrain_bert.py`` in a subprocess (the real framework), with
the paper's recipe scaled down: Adam (0.9, 0.98), eps 1e-8, weight decay 0.01, no clipping,
linear warm-up over ``--warmup-fraction`` of the run then linear decay to 0, no dropout. Runs have
a fixed number of iterations (``--iters PRELN NORMFORMER``, so the load of the machine does not
change what is trained); giving NormFormer fewer steps in proportion to its longer step makes the
comparison one at equal compute, as the paper's. The compute axis is iterations x ``--step-ms``
(or, without it, each model's median logged ms/iter over its runs).

A run that stops with a non-zero exit and an error line about a non-finite loss, or whose
metrics hold a NaN / infinity, or whose final validation loss is more than a nat above
ln(vocabulary) (far worse than a uniform guess: the loss blew up), is a *diverged* point: it
ranks last in the LR choice and is marked on the figure. Any other failure stops the sweep with the run's log named.

Writes ``OUT/reproduce_small.json`` (every run's final loss and curve, the choices, the
statistics), ``OUT/reproduce_small.png`` (final loss vs peak LR for both models; validation loss
vs compute at each model's best LR with the green star) and ``OUT/runs/*`` (each run's metrics,
log and status). ``--resume`` reuses every run that finished with the same command.

    python bench/reproduce_small.py --task gpt --resume        # demo corpus (make demo)
    python bench/reproduce_small.py --task bert --resume       # masked LM, demo sentences
    python bench/reproduce_small.py --quick --mock-data --vocab-size 256   # the machinery, < 1 min
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
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
NAMES = {"preln": "Pre-LN", "normformer": "NormFormer"}
SCRIPTS = {"gpt": "pretrain_gpt.py", "bert": "pretrain_bert.py"}
TASK_NAMES = {"gpt": "causal LM", "bert": "masked LM"}
# The trainer's error line for a non-finite loss (training/loop.py), whatever its exact wording.
NON_FINITE = re.compile(r"\b(nan|inf|infinity|non-?finite|not finite)\b", re.IGNORECASE)
QUICK = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
         "--micro-batch-size", "2", "--iters", "12", "12", "--lrs", "1e-3", "1e-2", "3e-2",
         "--seeds", "2", "--top", "1", "--evals", "2", "--eval-iters", "1", "--step-ms", "10", "11"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(SCRIPTS), default="gpt",
                   help="gpt: causal LM (pretrain_gpt.py, demo documents); bert: masked LM "
                        "(pretrain_bert.py, demo sentences)")
    add_data_args(p, mock=True)
    m = add_model_shape_args(p, "model and recipe")
    m.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout")
    m.add_argument("--init-scheme", choices=["fairseq", "megatron"], default=None,
                   help="passed to the trainer (default: its own, fairseq for the causal LM and "
                        "megatron for the masked LM)")
    m.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 6e-3, 1e-2, 2e-2, 4e-2],
                   help="the peak LRs swept for both models (default 1e-3 3e-3 6e-3 1e-2 2e-2 4e-2)")
    m.add_argument("--top", type=int, default=2, help="LRs per model that are run with every seed")
    m.add_argument("--warmup-fraction", type=float, default=0.05, help="warm-up steps / run steps")
    r = p.add_argument_group("runs")
    r.add_argument("--iters", type=int, nargs=2, metavar=("PRELN", "NORMFORMER"), default=[500, 480],
                   help="iterations of each model (default 500 480: equal compute at NormFormer's "
                        "+4.3 %% step time measured at the default shape on 2 AMD EPYC cores)")
    r.add_argument("--step-ms", type=float, nargs=2, metavar=("PRELN", "NORMFORMER"), default=None,
                   help="ms/iter of each model for the compute axis (default: the median logged "
                        "ms/iter of each model's runs)")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--evals", type=int, default=10, help="validation points per run")
    r.add_argument("--eval-iters", type=int, default=16, help="batches per validation")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    r.add_argument("--parallel-runs", type=int, default=1, help="runs at once")
    r.add_argument("--quick", action="store_true",
                   help="a 1 x 32 model, 12 steps, 3 LRs, 2 seeds: the machinery in well under a "
                        "minute (with --mock-data --vocab-size N, or any data)")
    r.add_argument("--resume", action="store_true",
                   help="reuse the runs in --output-dir that finished with the same command")
    r.add_argument("--output-dir", default=None, help="default runs/reproduce_small/TASK (git-ignored)")
    return p


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # the quick shape first, so that flags given explicitly still win
        args = parser.parse_args(QUICK + argv)
    if args.seeds < 1 or args.top < 1 or min(args.iters) < 1 or args.evals < 1:
        parser.error("--seeds, --top, --iters and --evals must be positive")
    args.lrs = sorted(set(args.lrs))
    args.top = min(args.top, len(args.lrs))
    args.output_dir = args.output_dir or os.path.join(ROOT, "runs", "reproduce_small", args.task)
    return args, argv


# -- statistics --------------------------------------------------------------------------------

def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t distribution with ``df`` degrees of freedom
    (bisection on its CDF, integrated by Simpson's rule: no SciPy needed)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        pdf = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * sum(pdf[1:-1:2]) + 2 * sum(pdf[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_std(values: Sequence[float]):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Dict:
    """a - b per pair: mean, std and the two-sided Student-t interval of the mean (None with
    fewer than two pairs)."""
    d = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(d)
    half = t_quantile(0.5 + level / 2, len(d) - 1) * std / math.sqrt(len(d)) if len(d) > 1 else None
    return dict(per_seed=d, mean=mean, std=std, level=level,
                interval=None if half is None else [mean - half, mean + half])


# -- one run -----------------------------------------------------------------------------------

def classify(returncode: int, log_text: str, records: List[Dict], iters: int, vocab: int) -> Dict:
    """What a finished run is: ``ok``, ``diverged`` (with the reason), or ``failed``.

    Diverged: a non-zero exit whose ``error:`` line names a non-finite loss; any NaN / infinity in
    the metrics; or a final validation loss more than a nat above ln(vocab), the loss of a uniform
    guess (the loss blew up).
    """
    if returncode != 0:
        # "pretrain_gpt.py: error: ...", or "error: ..." in logs of older versions
        errors = [line for line in log_text.splitlines()
                  if line.startswith("error") or ": error: " in line]
        if any(NON_FINITE.search(line) for line in errors):
            return dict(state="diverged", reason=errors[-1].strip())
        return dict(state="failed", reason=(errors or ["exit code %d" % returncode])[-1].strip())
    for r in records:
        for key in ("lm_loss", "val_loss"):
            if key in r and not math.isfinite(r[key]):
                return dict(state="diverged", reason=f"{key} {r[key]} at iteration {r['iteration']}")
    final = [r["val_loss"] for r in records if r.get("iteration") == iters and "val_loss" in r]
    if not final:
        return dict(state="failed", reason=f"no validation loss at iteration {iters}")
    if final[-1] > math.log(vocab) + 1:
        return dict(state="diverged",
                    reason=f"final validation loss {final[-1]:.3f} > ln(vocab) + 1 = {math.log(vocab) + 1:.3f}")
    return dict(state="ok", reason="")


def run_command(args, variant: str, lr: float, seed: int, iters: int, data: List[str],
                metrics: str) -> List[str]:
    eval_interval = max(1, iters // args.evals)
    cmd = [os.path.join(ROOT, SCRIPTS[args.task]),
           "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
           "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length),
           "--max-position-embeddings", str(args.seq_length),
           "--hidden-dropout", str(args.dropout), "--attention-dropout", str(args.dropout),
           "--micro-batch-size", str(args.micro_batch_size), "--train-iters", str(iters),
           "--lr", str(lr), "--min-lr", "0",
           "--lr-warmup-iters", str(max(1, round(args.warmup_fraction * iters))),
           "--lr-decay-style", "linear", "--adam-beta1", "0.9", "--adam-beta2", "0.98",
           "--adam-eps", "1e-8", "--weight-decay", "0.01", "--clip-grad", "0", "--seed", str(seed),
           "--num-workers", "0", "--log-interval", str(eval_interval),
           "--eval-interval", str(eval_interval), "--eval-iters", str(args.eval_iters),
           "--metrics-file", metrics] + data
    cmd += ["--init-scheme", args.init_scheme] if args.init_scheme else []
    return cmd + (NORMFORMER_FLAGS if variant == "normformer" else [])


def read_records(path: str) -> List[Dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_one(args, variant: str, lr: float, seed: int, iters: int, data: List[str], vocab: int) -> Dict:
    """One run (or its saved result with --resume): its status, final loss and validation curve."""
    stem = os.path.join(args.output_dir, "runs", f"{variant}_lr{lr:g}_seed{seed}")
    metrics, status_path = stem + ".jsonl", stem + ".status.json"
    cmd = run_command(args, variant, lr, seed, iters, data, metrics)
    if args.resume and os.path.exists(status_path):
        with open(status_path) as f:
            status = json.load(f)
        if status["command"] == cmd and status["state"] != "failed":
            return run_result(status, read_records(metrics), iters)
    for path in (metrics, status_path):
        if os.path.exists(path):
            os.remove(path)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    from megatron_normformer.testing import free_port

    env["MASTER_PORT"] = str(free_port())  # runs side by side each need their own rendezvous
    started = time.time()
    with open(stem + ".log", "w") as log:
        proc = subprocess.run([sys.executable] + cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    with open(stem + ".log") as f:
        log_text = f.read()
    records = read_records(metrics)
    status = dict(classify(proc.returncode, log_text, records, iters, vocab), command=cmd,
                  variant=variant, lr=lr, seed=seed, iters=iters, exit=proc.returncode,
                  elapsed_s=time.time() - started)
    with open(status_path, "w") as f:
        json.dump(status, f, indent=1)
    if status["state"] == "failed":
        raise RuntimeError(f"{NAMES[variant]} lr {lr:g} seed {seed} failed ({status['reason']}); see {stem}.log")
    print(f"  {NAMES[variant]:10s} lr {lr:<6g} seed {seed}: {status['state']}"
          + (f" ({status['reason']})" if status["reason"] else "")
          + f", {status['elapsed_s']:.0f} s", flush=True)
    return run_result(status, records, iters)


def run_result(status: Dict, records: List[Dict], iters: int) -> Dict:
    val = {r["iteration"]: r for r in records if "val_loss" in r}
    its = sorted(val)
    ms = [r["ms_per_iter"] for r in records if "ms_per_iter" in r and r["iteration"] > its[0]] if its else []
    final = val[iters]["val_loss"] if status["state"] == "ok" else None
    out = dict(variant=status["variant"], lr=status["lr"], seed=status["seed"], state=status["state"],
               reason=status["reason"], elapsed_s=status["elapsed_s"], final_loss=final,
               iterations=its, val_loss=[val[i]["val_loss"] for i in its],
               median_ms_per_iter=statistics.median(ms) if ms else None)
    if final is not None and "val_mlm_accuracy" in val[iters]:
        out["final_mlm_accuracy"] = val[iters]["val_mlm_accuracy"]
    return out


# -- choices and summary -----------------------------------------------------------------------

def loss_key(runs: Sequence[Dict]) -> float:
    """The mean final loss of runs; a diverged run makes it infinite (ranks last)."""
    return math.inf if any(r["final_loss"] is None for r in runs) else statistics.fmean(r["final_loss"] for r in runs)


def top_lrs(sweep: Dict[float, Sequence[Dict]], k: int) -> List[float]:
    """The ``k`` LRs with the lowest mean final loss (ties: the lower LR first)."""
    return sorted(sweep, key=lambda lr: (loss_key(sweep[lr]), lr))[:k]


def green_star(base_x: Sequence[float], base_y: Sequence[float], nf_x: Sequence[float],
               nf_y: Sequence[float]) -> Optional[Dict]:
    """The first NormFormer point whose loss (or ppl) is at or below Pre-LN's lowest (paper Fig. 2).

    Returns its compute, its value (``ppl``), Pre-LN's best and the compute at which Pre-LN reached
    it, ``fraction_of_baseline_run`` = NormFormer's compute / Pre-LN's whole run (the paper's
    "needing only 60 % as much compute") and ``savings`` = 1 - (NormFormer's compute / Pre-LN's
    compute at its best), which differ when Pre-LN's best is not its last point; None if never.
    """
    best_i = min(range(len(base_y)), key=lambda i: base_y[i])
    best = base_y[best_i]
    for x, y in zip(nf_x, nf_y):
        if y <= best:
            return dict(compute=x, ppl=y, baseline_best_ppl=best, baseline_best_compute=base_x[best_i],
                        fraction_of_baseline_run=x / base_x[-1], savings=1.0 - x / base_x[best_i])
    return None


def summarize(runs: Sequence[Dict], iters: Dict[str, int], step_ms: Optional[Dict[str, float]],
              top: int) -> Dict:
    """Everything the report says, from the run results alone (so it can be tested on made-up runs).

    Each model's best LR is, among the LRs that have the most seeds (its ``top`` from the sweep),
    the one with the lowest mean final loss; the paired differences pair seed with seed.
    """
    by = {v: {} for v in VARIANTS}
    for r in runs:
        by[r["variant"]].setdefault(r["lr"], []).append(r)
    for v in VARIANTS:
        for lr in by[v]:
            by[v][lr].sort(key=lambda r: r["seed"])
    if step_ms is None:  # the models' own logged step times, over all their finished runs
        step_ms = {v: statistics.median([r["median_ms_per_iter"] for rs in by[v].values() for r in rs
                                         if r["median_ms_per_iter"] is not None] or [1.0])
                   for v in VARIANTS}
    out = dict(step_ms=step_ms, iterations=iters, lr_sweep={}, best_lr={}, top_lrs={},
               lr_sweep_reaches_past_best={})
    for v in VARIANTS:
        out["lr_sweep"][v] = [dict(lr=lr, seeds=[r["seed"] for r in rs], states=[r["state"] for r in rs],
                                   final_loss=[r["final_loss"] for r in rs],
                                   mean=None if loss_key(rs) == math.inf else loss_key(rs),
                                   std=None if loss_key(rs) == math.inf else mean_std([r["final_loss"] for r in rs])[1])
                              for lr, rs in sorted(by[v].items())]
        most = max(len(rs) for rs in by[v].values())
        seeded = {lr: rs for lr, rs in by[v].items() if len(rs) == most}
        out["top_lrs"][v] = top_lrs(seeded, top)
        out["best_lr"][v] = out["top_lrs"][v][0]
        lrs = sorted(by[v])  # an LR below and one above the best were tried
        out["lr_sweep_reaches_past_best"][v] = 0 < lrs.index(out["best_lr"][v]) < len(lrs) - 1
    best = {v: by[v][out["best_lr"][v]] for v in VARIANTS}
    for v in VARIANTS:
        finals = [r["final_loss"] for r in best[v] if r["final_loss"] is not None]
        mean, std = mean_std(finals) if finals else (None, None)
        curves = [r for r in best[v] if r["state"] == "ok"]
        n = min((len(r["val_loss"]) for r in curves), default=0)
        its = curves[0]["iterations"][:n] if curves else []
        out[v] = dict(lr=out["best_lr"][v], seeds=[r["seed"] for r in best[v]], final_loss=finals,
                      final_loss_mean=mean, final_loss_std=std,
                      final_ppl_mean=None if mean is None else math.exp(mean),
                      iterations=its, compute_s=[i * step_ms[v] / 1000 for i in its],
                      val_loss_mean=[statistics.fmean(r["val_loss"][i] for r in curves) for i in range(n)],
                      val_loss_std=[mean_std([r["val_loss"][i] for r in curves])[1] for i in range(n)])
        acc = [r["final_mlm_accuracy"] for r in best[v] if "final_mlm_accuracy" in r]
        if acc:
            out[v]["final_mlm_accuracy_mean"], out[v]["final_mlm_accuracy_std"] = mean_std(acc)
    pairs = {s: {v: r for v in VARIANTS for r in best[v] if r["seed"] == s}
             for s in sorted({r["seed"] for v in VARIANTS for r in best[v]})}
    pairs = {s: p for s, p in pairs.items()
             if len(p) == 2 and all(r["final_loss"] is not None for r in p.values())}
    out["paired_seeds"] = sorted(pairs)
    if pairs:
        out["diff_loss"] = paired([pairs[s]["normformer"]["final_loss"] for s in pairs],
                                  [pairs[s]["preln"]["final_loss"] for s in pairs])
    b, nf = out["preln"], out["normformer"]
    out["green_star"] = (green_star(b["compute_s"], b["val_loss_mean"], nf["compute_s"], nf["val_loss_mean"])
                         if b["val_loss_mean"] and nf["val_loss_mean"] else None)
    out["green_star_per_seed"] = {
        s: green_star([i * step_ms["preln"] / 1000 for i in p["preln"]["iterations"]], p["preln"]["val_loss"],
                      [i * step_ms["normformer"] / 1000 for i in p["normformer"]["iterations"]],
                      p["normformer"]["val_loss"]) for s, p in pairs.items()}
    return out


# -- figure and report -------------------------------------------------------------------------

def plot(summary: Dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    colors = {"preln": "tab:blue", "normformer": "tab:orange"}
    finite = [x for v in VARIANTS for p in summary["lr_sweep"][v] for x in p["final_loss"] if x is not None]
    top = max(finite) + 0.1 * (max(finite) - min(finite) + 0.1) if finite else 1.0
    for v in VARIANTS:
        sweep, c = summary["lr_sweep"][v], colors[v]
        ok = [p for p in sweep if p["mean"] is not None]
        ax.errorbar([p["lr"] for p in ok], [p["mean"] for p in ok], yerr=[p["std"] for p in ok], color=c,
                    marker="o", capsize=3, label=f"{NAMES[v]} (best {summary['best_lr'][v]:g})")
        for p in sweep:
            ys = [x for x in p["final_loss"] if x is not None]
            ax.plot([p["lr"]] * len(ys), ys, ".", color=c, alpha=0.4)
            n_div = sum(x is None for x in p["final_loss"])
            if n_div:
                ax.plot([p["lr"]], [top], marker="x", color=c, markersize=11, mew=2, linestyle="none")
                ax.annotate(f"{n_div} diverged", (p["lr"], top), textcoords="offset points",
                            xytext=(0, 6 if v == "preln" else -12), ha="center", fontsize=7, color=c)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title("final loss vs peak LR (mean ± std over seeds; x = diverged)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for v in VARIANTS:
        s = summary[v]
        x, y, e = s["compute_s"], s["val_loss_mean"], s["val_loss_std"]
        if not y:
            continue
        bx.plot(x, y, color=colors[v], label=f"{NAMES[v]} at {s['lr']:g} (final {s['final_loss_mean']:.3f} "
                                             f"± {s['final_loss_std']:.3f})")
        bx.fill_between(x, [a - b for a, b in zip(y, e)], [a + b for a, b in zip(y, e)], color=colors[v], alpha=0.2)
    star = summary["green_star"]
    if star:
        bx.plot([star["compute"]], [star["ppl"]], marker="*", color="green", markersize=16, linestyle="none",
                label=f"matches Pre-LN's best at {100 * star['fraction_of_baseline_run']:.0f}% of its compute")
    bx.set_xlabel("training compute (s at the step time)")
    bx.set_ylabel("validation loss (nats)")
    bx.set_title("each model at its own best LR", fontsize=9)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(r: Dict) -> str:
    s = r["summary"]
    acc = "final_mlm_accuracy_mean" in s["preln"]
    lines = [f"{TASK_NAMES[r['task']]}, {r['model']['num_layers']} x {r['model']['hidden_size']}, "
             f"{r['iterations']['preln']} / {r['iterations']['normformer']} iterations, seeds "
             f"{', '.join(map(str, r['seeds']))}; {r['machine']}, {r['threads_per_run']} thread(s) per run, "
             f"{r['parallel_runs']} run(s) at once; {r['runs']} runs, {r['elapsed_s'] / 60:.1f} min "
             f"({r['run_seconds'] / 60:.1f} min of runs)",
             "", "| peak LR | " + " | ".join(f"{NAMES[v]} final val loss" for v in VARIANTS) + " |",
             "|---:|---:|---:|"]
    table = {v: {p["lr"]: p for p in s["lr_sweep"][v]} for v in VARIANTS}
    for lr in sorted(set(table["preln"]) | set(table["normformer"])):
        cells = []
        for v in VARIANTS:
            p = table[v].get(lr)
            if p is None:
                cells.append("")
                continue
            div = sum(x is None for x in p["final_loss"])
            ok = [x for x in p["final_loss"] if x is not None]
            if div:
                cell = f"diverged ({div} of {len(p['final_loss'])})" + (f"; others {', '.join(f'{x:.3f}' for x in ok)}" if ok else "")
            elif len(ok) > 1:
                cell = f"{p['mean']:.3f} ± {p['std']:.3f} ({len(ok)} seeds)"
            else:
                cell = f"{ok[0]:.3f}"
            cells.append(f"**{cell}**" if lr == s["best_lr"][v] else cell)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    lines.append("")
    for v in VARIANTS:
        b = s[v]
        if b["final_loss_mean"] is None:
            lines.append(f"- {NAMES[v]}: every run diverged")
            continue
        extra = (f", MLM accuracy {100 * b['final_mlm_accuracy_mean']:.1f} ± {100 * b['final_mlm_accuracy_std']:.1f} %"
                 if acc else "")
        edge = "" if s["lr_sweep_reaches_past_best"][v] else " (the best LR is at the edge of the grid)"
        lines.append(f"- {NAMES[v]} at its best LR {b['lr']:g}{edge}: final val loss {b['final_loss_mean']:.3f} ± "
                     f"{b['final_loss_std']:.3f} (ppl {b['final_ppl_mean']:.1f}; seeds "
                     f"{', '.join(f'{x:.3f}' for x in b['final_loss'])}){extra}")
    d = s.get("diff_loss")
    if d:
        ci = (f", {100 * d['level']:.0f} % t-interval [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]"
              if d["interval"] else "")
        lines.append(f"- NormFormer - Pre-LN final val loss, paired by seed: {d['mean']:+.3f} ± {d['std']:.3f}{ci} "
                     f"(per seed {', '.join(f'{x:+.3f}' for x in d['per_seed'])})")
    star = s["green_star"]
    if star:
        lines.append(f"- green star (mean curves): NormFormer reaches Pre-LN's best {star['baseline_best_ppl']:.3f} "
                     f"at {star['compute']:.1f} s = {100 * star['fraction_of_baseline_run']:.0f} % of Pre-LN's run "
                     f"(paper: 60 % CLM, 57 % MLM)")
    else:
        lines.append("- green star: NormFormer's mean curve never reaches Pre-LN's best")
    per = [f"{100 * g['fraction_of_baseline_run']:.0f} %" if g else "never" for g in s["green_star_per_seed"].values()]
    lines.append(f"- green star per seed (% of Pre-LN's run): {', '.join(per)}")
    lines.append(f"- compute axis: {s['step_ms']['preln']:.1f} / {s['step_ms']['normformer']:.1f} ms per iteration "
                 f"({r['step_ms_source']}); logged medians {r['logged_ms']['preln']:.1f} / "
                 f"{r['logged_ms']['normformer']:.1f} ms")
    return "\n".join(lines)


# -- the sweep ---------------------------------------------------------------------------------

def run(argv=None) -> Dict:
    args, argv = parse_args(argv)
    os.makedirs(os.path.join(args.output_dir, "runs"), exist_ok=True)
    data = data_flags(args, sentences=args.task == "bert")
    vocab = vocab_size(args)
    iters = dict(zip(VARIANTS, args.iters))
    seeds = [1234 + i for i in range(args.seeds)]
    started = time.time()

    def batch(jobs):
        with ThreadPoolExecutor(max_workers=max(1, args.parallel_runs)) as pool:
            futures = [pool.submit(train_one, args, v, lr, s, iters[v], data, vocab) for v, lr, s in jobs]
            return [f.result() for f in futures]

    print(f"sweep: {len(args.lrs)} LRs x 2 models, seed {seeds[0]}", flush=True)
    runs = batch([(v, lr, seeds[0]) for lr in args.lrs for v in VARIANTS])
    first = {v: {r["lr"]: [r] for r in runs if r["variant"] == v} for v in VARIANTS}
    chosen = {v: top_lrs(first[v], args.top) for v in VARIANTS}
    print(f"seeds {seeds[1:]} at " + "; ".join(f"{NAMES[v]} {', '.join(f'{lr:g}' for lr in chosen[v])}"
                                                for v in VARIANTS), flush=True)
    runs += batch([(v, lr, s) for s in seeds[1:] for v in VARIANTS for lr in chosen[v]])
    summary = summarize(runs, iters, dict(zip(VARIANTS, args.step_ms)) if args.step_ms else None, args.top)
    from bench.throughput import machine

    logged = {v: statistics.median([r["median_ms_per_iter"] for r in runs if r["variant"] == v
                                    and r["median_ms_per_iter"] is not None] or [0.0]) for v in VARIANTS}
    result = dict(command=" ".join(["bench/reproduce_small.py"] + argv), task=args.task, machine=machine(),
                  threads_per_run=args.threads, parallel_runs=args.parallel_runs, iterations=iters,
                  lrs=args.lrs, top=args.top, seeds=seeds, vocab_size=vocab,
                  step_ms_source="--step-ms" if args.step_ms else "median logged ms/iter of the runs",
                  logged_ms=logged, runs=len(runs), run_seconds=sum(r["elapsed_s"] for r in runs),
                  model=dict(num_layers=args.num_layers, hidden_size=args.hidden_size,
                             num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                             micro_batch_size=args.micro_batch_size, dropout=args.dropout,
                             init_scheme=args.init_scheme,
                             warmup_fraction=args.warmup_fraction),
                  summary=summary, all_runs=runs, elapsed_s=time.time() - started)
    title = (f"{TASK_NAMES[args.task]}, {args.num_layers} x {args.hidden_size}, {iters['preln']} / "
             f"{iters['normformer']} steps, {args.seeds} seed(s) at each model's top {args.top} LRs")
    plot(summary, os.path.join(args.output_dir, "reproduce_small.png"), title)
    with open(os.path.join(args.output_dir, "reproduce_small.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(report(result), flush=True)
    return result


if __name__ == "__main__":
    run()
