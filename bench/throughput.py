#!/usr/bin/env python
"""Training-step throughput: tokens/s, TFLOP/s and MFU of forward + backward + AdamW step.

Up to five variants of one model size are built in the same process and timed *interleaved*:
each repeat runs every variant for ``--iters / --repeats`` steps, in alternating order
(A B C D, then D C B A, ...), so slow drifts of the machine hit every variant alike.

    ours-preln       GPTModel, NormFormer switches off (plain Pre-LN)
    ours-normformer  GPTModel with the NormFormer switches given (all four when none is given)
    ref-preln        bench/reference_gpt.py, plain PyTorch, same architecture, same FLOPs
    ref-normformer   the same with the NormFormer operations
    ds-normformer    (--deepspeed) the full DeepSpeed engine that pretrain_gpt.py builds

Reported: the median ms/iter of each variant, NormFormer's step-time overhead (median over repeats
of the paired per-repeat ratio, paper: +2-6 %), and ours / reference tokens/s; both also from the
fastest step of each variant ("best"), the steadier estimate when other jobs share the machine. The batch is one
fixed random batch (data loading is not measured); FLOPs come from
``megatron_normformer.training.metrics.flops_per_iteration``.

    python bench/throughput.py --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256
    python bench/throughput.py --model-size 125M --seq-length 512 --micro-batch-size 1 --threads 2
    python bench/throughput.py --model-size 1.3B --seq-length 2048 --micro-batch-size 4 --bf16   # GPU
    python bench/throughput.py ... --tensor-model-parallel-size 2   # ours on 2 processes (gloo/nccl)
    python bench/throughput.py ... --profile                        # torch.profiler tables
    python bench/throughput.py ... --json                           # JSON instead of the table
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.reference_gpt import ReferenceGPT  # noqa: E402
from megatron_normformer.config import MODEL_SIZE_PRESETS, ModelConfig  # noqa: E402
from megatron_normformer.training.metrics import flops_per_iteration, peak_tflops_per_device  # noqa: E402
from megatron_normformer.training.step import DeepSpeedBackend, PlainBackend, train_step  # noqa: E402

NORMFORMER_OPS = ("scale_attn", "scale_fc", "scale_heads", "scale_resids")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model-size", choices=sorted(MODEL_SIZE_PRESETS), help="preset; explicit flags override it")
    m.add_argument("--num-layers", type=int)
    m.add_argument("--hidden-size", type=int)
    m.add_argument("--num-attention-heads", type=int)
    m.add_argument("--ffn-hidden-size", type=int)
    m.add_argument("--vocab-size", type=int, default=51200,
                   help="51,200 (the paper's) needs no padding, so ours and the reference do the same FLOPs")
    m.add_argument("--activation-fn", default="gelu", choices=("gelu", "relu", "relu_squared"))
    m.add_argument("--position-embedding-type", default="sinusoidal", choices=("sinusoidal", "learned"))
    m.add_argument("--hidden-dropout", type=float, default=0.1)
    m.add_argument("--attention-dropout", type=float, default=0.1)
    for op in NORMFORMER_OPS:
        m.add_argument("--" + op.replace("_", "-"), action="store_true",
                       help="NormFormer operation of the normformer variants (all four when none is given)")
    r = p.add_argument_group("run")
    r.add_argument("--micro-batch-size", type=int, default=4)
    r.add_argument("--seq-length", type=int, default=256)
    r.add_argument("--iters", type=int, default=20, help="timed steps per variant (split over repeats)")
    r.add_argument("--warmup-iters", type=int, default=3, help="untimed steps per variant first")
    r.add_argument("--repeats", type=int, default=5, help="interleaved rounds (alternating order)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU); default: all cores (os.cpu_count())")
    r.add_argument("--variants", default="ours-preln,ours-normformer,ref-preln,ref-normformer",
                   help="comma-separated subset of ours-preln, ours-normformer, ref-preln, ref-normformer")
    r.add_argument("--deepspeed", action="store_true", help="also time the DeepSpeed engine (ds-normformer)")
    r.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="run our variants on this many processes (spawned); the reference stays 1 process "
                        "and is timed afterwards, so no ours/reference ratio is reported")
    r.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (time.process_time, all its "
                        "threads), which time lent to other jobs does not inflate: for overhead "
                        "comparisons on a shared CPU machine, with --threads 1")
    r.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only; SDPA picks flash attention)")
    r.add_argument("--peak-flops-per-device", type=float, default=None, help="peak TFLOP/s for MFU")
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--profile", action="store_true", help="print torch.profiler tables of ours vs reference")
    r.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    r.add_argument("--output", help="also write the JSON results to this file")
    return p


# -- configuration -----------------------------------------------------------------------------

def model_configs(args) -> Dict[str, ModelConfig]:
    """The Pre-LN and NormFormer configs of the requested size."""
    preset = MODEL_SIZE_PRESETS[args.model_size] if args.model_size else None
    layers = args.num_layers or (preset.num_layers if preset else 4)
    hidden = args.hidden_size or (preset.hidden_size if preset else 256)
    heads = args.num_attention_heads or (preset.num_attention_heads if preset else 4)
    ops = {op: getattr(args, op) for op in NORMFORMER_OPS}
    if not any(ops.values()):
        ops = {op: True for op in NORMFORMER_OPS}
    common = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                  ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.vocab_size,
                  max_position_embeddings=max(args.seq_length, 2),
                  position_embedding_type=args.position_embedding_type, activation_fn=args.activation_fn,
                  hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout)
    return {"preln": ModelConfig(**common).validate(args.tensor_model_parallel_size),
            "normformer": ModelConfig(**common, **ops).validate(args.tensor_model_parallel_size)}


def device_of(args) -> torch.device:
    if args.bf16 and not torch.cuda.is_available():
        raise SystemExit("error: --bf16 needs a GPU (on CPU the benchmark runs in fp32)")
    if args.clock == "cpu" and torch.cuda.is_available():
        raise SystemExit("error: --clock cpu times CPU work only; on a GPU use --clock wall")
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


# -- steps -------------------------------------------------------------------------------------

def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer, with Megatron's weight-decay groups (as the trainer builds it)."""
    from megatron_normformer.training.engine import param_groups

    return torch.optim.AdamW(param_groups(model, 0.01, False), lr=lr, betas=(0.9, 0.98), eps=1e-8)


def _loss(model, batch):
    tokens, labels = batch
    return model(tokens, labels).mean(), {}


def plain_step(model, optimizer, tokens, labels, autocast) -> Callable[[], None]:
    """The training step (``training/step.py``) on a plain model and torch optimizer."""
    backend = PlainBackend(model, optimizer, _loss, autocast)
    return lambda: train_step(backend, [(tokens, labels)], 1)


def random_batch(cfg: ModelConfig, args, device):
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=gen)
    return data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)


def autocast_of(args, device):
    if args.bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_ours(cfg: ModelConfig, pstate, args, device):
    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.random import seed_everything

    seed_everything(args.seed, pstate.tp_rank, 0)  # the TP dropout stream, as the trainer does
    model = GPTModel(cfg, pstate, seed=args.seed, device=device)
    model.train()
    return model, adamw(model, args.lr)


def build_reference(cfg: ModelConfig, args, device):
    torch.manual_seed(args.seed)
    model = ReferenceGPT(cfg).to(device)
    model.train()
    return model, adamw(model, args.lr)


def build_deepspeed(cfg: ModelConfig, args):
    """pretrain_gpt.py's own engine (ZeRO-0, mock data flags), driven step by step."""
    from megatron_normformer.arguments import build_pretrain_parser
    from megatron_normformer.parallel.state import ParallelState, initialize_distributed
    from megatron_normformer.training.engine import build_engine
    from megatron_normformer.training.tasks import get_task
    from megatron_normformer.training.pretrain import layout, resolve

    argv = ["--num-layers", str(cfg.num_layers), "--hidden-size", str(cfg.hidden_size),
            "--num-attention-heads", str(cfg.num_attention_heads),
            "--ffn-hidden-size", str(cfg.ffn_hidden_size), "--vocab-size", str(cfg.vocab_size),
            "--seq-length", str(args.seq_length), "--max-position-embeddings", str(cfg.max_position_embeddings),
            "--micro-batch-size", str(args.micro_batch_size), "--train-iters", "1000000",
            "--mock-data", "--lr", str(args.lr), "--seed", str(args.seed),
            "--activation-fn", cfg.activation_fn, "--position-embedding-type", cfg.position_embedding_type,
            "--hidden-dropout", str(cfg.hidden_dropout), "--attention-dropout", str(cfg.attention_dropout)]
    argv += ["--" + op.replace("_", "-") for op in NORMFORMER_OPS if getattr(cfg, op)]
    if args.bf16:
        argv.append("--bf16")
    _, run, user, explicit = resolve(build_pretrain_parser(), argv)
    if "WORLD_SIZE" not in os.environ:  # a world of one: any free port, not the default 29500
        from megatron_normformer.testing import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
    initialize_distributed()
    ds, _, _ = layout(run, user, explicit, 1)
    return build_engine(run, ParallelState(1, 1), ds, get_task("gpt")).deepspeed


def deepspeed_step(engine, tokens, labels) -> Callable[[], None]:
    """The trainer's training step (``training/step.py``) on pretrain_gpt.py's engine."""
    backend = DeepSpeedBackend(engine, _loss)
    return lambda: train_step(backend, [(tokens, labels)], 1)


# -- timing ------------------------------------------------------------------------------------

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(steps: Dict[str, Callable[[], None]], iters: int, warmup: int, repeats: int,
                     device, clock: str = "wall") -> Dict[str, List[List[float]]]:
    """ms of every timed step, per variant and per repeat; orders alternate between repeats."""
    now = CLOCKS[clock]
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    per_repeat = max(1, iters // repeats)
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            row = []
            for _ in range(per_repeat):
                t0 = now()
                steps[name]()
                _sync(device)
                row.append(1000 * (now() - t0))
            times[name].append(row)
    return times


def summarize(rows: List[List[float]], flops: float, tokens: int, peak) -> Dict:
    flat = [t for row in rows for t in row]
    ms = statistics.median(flat)
    tflops = flops / (ms / 1000) / 1e12
    return dict(ms_per_iter=ms, ms_per_iter_min=min(flat), ms_per_iter_max=max(flat),
                tokens_per_sec=tokens / (ms / 1000), tflops_per_device=tflops,
                mfu=None if peak is None else tflops / peak, steps=len(flat))


def _best(rows: List[List[float]]) -> float:
    """The fastest step: the least-disturbed estimate on a shared machine (as timeit advises)."""
    return min(t for row in rows for t in row)


def paired_ratio(a: List[List[float]], b: List[List[float]]) -> Dict:
    """Median over repeats of median(a_r) / median(b_r), with the spread over repeats."""
    ratios = sorted(statistics.median(x) / statistics.median(y) for x, y in zip(a, b))
    return dict(median=statistics.median(ratios), min=ratios[0], max=ratios[-1], per_repeat=ratios)


# -- the benchmark -----------------------------------------------------------------------------

def _threads(args) -> int:
    return args.threads or os.cpu_count() or 1


def _measure_ours_tp(args) -> Dict[str, List[List[float]]]:
    """Ours on ``--tensor-model-parallel-size`` spawned processes; rank 0's step times."""
    from megatron_normformer.parallel.state import ParallelState

    torch.set_num_threads(max(1, _threads(args) // args.tensor_model_parallel_size))
    device = torch.device("cpu")  # GPU TP runs go through torchrun and pretrain_gpt.py
    pstate = ParallelState(args.tensor_model_parallel_size, 1)
    cfgs = model_configs(args)
    steps = {}
    for kind in ("preln", "normformer"):
        if f"ours-{kind}" in args.variant_list:
            model, opt = build_ours(cfgs[kind], pstate, args, device)
            steps[f"ours-{kind}"] = plain_step(model, opt, *random_batch(cfgs[kind], args, device),
                                               contextlib.nullcontext)
    return time_interleaved(steps, args.iters, args.warmup_iters, args.repeats, device, args.clock)


def run(argv=None) -> Dict:
    """Parse ``argv``, run the benchmark, return the results (also printed)."""
    args = build_parser().parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = set(args.variant_list) - {"ours-preln", "ours-normformer", "ref-preln", "ref-normformer"}
    if bad:
        raise SystemExit(f"error: --variants: unknown {sorted(bad)}")
    if args.repeats < 1 or args.iters < 1:
        raise SystemExit("error: --iters and --repeats must be positive")
    device = device_of(args)
    threads = _threads(args)
    torch.set_num_threads(threads)
    cfgs = model_configs(args)
    tp = args.tensor_model_parallel_size
    autocast = autocast_of(args, device)

    times: Dict[str, List[List[float]]] = {}
    if tp > 1:
        from megatron_normformer.testing import spawn

        ours = [v for v in args.variant_list if v.startswith("ours-")]
        if ours:
            times.update(spawn(_measure_ours_tp, tp, args)[0])
        torch.set_num_threads(threads)
    steps: Dict[str, Callable[[], None]] = {}
    params: Dict[str, int] = {}
    for name in args.variant_list:
        kind = name.split("-", 1)[1]
        cfg = cfgs[kind]
        if name.startswith("ours-"):
            if tp > 1:
                continue
            from megatron_normformer.parallel.state import SingleProcessState

            model, opt = build_ours(cfg, SingleProcessState(), args, device)
        else:
            model, opt = build_reference(cfg, args, device)
        params[name] = sum(p.numel() for p in model.parameters())
        steps[name] = plain_step(model, opt, *random_batch(cfg, args, device), autocast)
    if args.deepspeed:
        if tp > 1:
            raise SystemExit("error: --deepspeed is timed at --tensor-model-parallel-size 1 only")
        engine = build_deepspeed(cfgs["normformer"], args)
        steps["ds-normformer"] = deepspeed_step(engine, *random_batch(cfgs["normformer"], args, device))
    times.update(time_interleaved(steps, args.iters, args.warmup_iters, args.repeats, device, args.clock))

    tokens = args.micro_batch_size * args.seq_length
    peak = peak_tflops_per_device(args.peak_flops_per_device, args.bf16)
    results = {}
    for name, rows in times.items():
        cfg = cfgs["preln" if name.endswith("preln") else "normformer"]
        flops = flops_per_iteration(cfg, args.micro_batch_size, args.seq_length, cfg.padded_vocab_size(tp))
        results[name] = dict(summarize(rows, flops / tp, tokens, peak), params=params.get(name))
        results[name]["tokens_per_sec"] /= tp if name.startswith("ours-") else 1  # per device

    out = dict(machine=machine(), device=device.type, threads=threads, clock=args.clock, torch=torch.__version__,
               tensor_model_parallel_size=tp, precision="bf16 autocast" if args.bf16 else "fp32",
               micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
               model={"preln": cfgs["preln"].to_dict(), "normformer": cfgs["normformer"].to_dict()},
               flops_per_iter={k: flops_per_iteration(c, args.micro_batch_size, args.seq_length,
                                                      c.padded_vocab_size(tp)) for k, c in cfgs.items()},
               results=results, overhead_pct=None, overhead_pct_reference=None,
               ratio_vs_reference={})
    if "ours-preln" in times and "ours-normformer" in times:
        r = paired_ratio(times["ours-normformer"], times["ours-preln"])
        out["overhead_pct"] = 100 * (r["median"] - 1)
        out["overhead_pct_range"] = [100 * (r["min"] - 1), 100 * (r["max"] - 1)]
        out["overhead_pct_best"] = 100 * (_best(times["ours-normformer"]) / _best(times["ours-preln"]) - 1)
    if "ref-preln" in times and "ref-normformer" in times:
        out["overhead_pct_reference"] = 100 * (paired_ratio(times["ref-normformer"], times["ref-preln"])["median"] - 1)
    for kind in ("preln", "normformer"):  # only when timed interleaved in this process (TP = 1)
        if tp == 1 and f"ours-{kind}" in times and f"ref-{kind}" in times:
            # tokens/s ratio = reference ms / our ms (per step of the same batch)
            r = paired_ratio(times[f"ref-{kind}"], times[f"ours-{kind}"])
            out["ratio_vs_reference"][kind] = dict(median=r["median"], min=r["min"], max=r["max"],
                                                   best=_best(times[f"ref-{kind}"]) / _best(times[f"ours-{kind}"]))
    if "ds-normformer" in times and "ours-normformer" in times:
        out["deepspeed_vs_plain_normformer"] = paired_ratio(times["ours-normformer"], times["ds-normformer"])["median"]

    if args.profile:
        out["profile"] = profile(steps, device)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1) if args.json else format_table(out, args), flush=True)
    return out


def profile(steps: Dict[str, Callable[[], None]], device, top: int = 15) -> Dict[str, str]:
    """torch.profiler's per-operator table (self CPU time) of 3 steps of each variant."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = {}
    for name, step in steps.items():
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                step()
            _sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tables[name] = prof.key_averages().table(sort_by=key, row_limit=top)
        print(f"\n== profile: {name} (3 steps) ==\n{tables[name]}", flush=True)
    return tables


def format_table(out: Dict, args) -> str:
    nf = out["model"]["normformer"]
    ops = "+".join(op for op in NORMFORMER_OPS if nf[op])
    lines = [f"machine: {out['machine']} | device {out['device']} | torch {out['torch']} | "
             f"threads {out['threads']} | {out['precision']} | TP {out['tensor_model_parallel_size']} | "
             f"{out['clock']} clock",
             f"model: {nf['num_layers']} layers x {nf['hidden_size']} (heads {nf['num_attention_heads']}, "
             f"ffn {nf['ffn_hidden_size']}, vocab {nf['vocab_size']}), micro batch "
             f"{out['micro_batch_size']} x seq {out['seq_length']}, NormFormer = {ops}",
             "",
             f"| variant | params | ms/iter (median) | tokens/s | TFLOP/s | MFU |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in out["results"].items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        params = "" if r["params"] is None else f"{r['params']:,}"
        lines.append(f"| {name} | {params} | {r['ms_per_iter']:.1f} | {r['tokens_per_sec']:,.0f} | "
                     f"{r['tflops_per_device']:.3f} | {mfu} |")
    lines.append("")
    if out["overhead_pct"] is not None:
        lo, hi = out["overhead_pct_range"]
        lines.append(f"NormFormer step-time overhead (ours): {out['overhead_pct']:+.1f}% "
                     f"(per-repeat range {lo:+.1f}% .. {hi:+.1f}%; fastest steps {out['overhead_pct_best']:+.1f}%; "
                     "paper +2-6%, target <= 3%)")
    if out["overhead_pct_reference"] is not None:
        lines.append(f"NormFormer step-time overhead (reference): {out['overhead_pct_reference']:+.1f}%")
    for kind, r in out["ratio_vs_reference"].items():
        lines.append(f"ours / reference tokens/s ({kind}): {r['median']:.3f} "
                     f"(per-repeat {r['min']:.3f} .. {r['max']:.3f}; fastest steps {r['best']:.3f}; target >= 0.95)")
    if "deepspeed_vs_plain_normformer" in out:
        lines.append(f"DeepSpeed engine / plain AdamW tokens/s (normformer): "
                     f"{out['deepspeed_vs_plain_normformer']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    run()
