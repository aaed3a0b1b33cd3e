"""Training throughput: the DeepSpeed trainer (1 worker, ZeRO-0 and ZeRO-2) against a plain
single-process PyTorch loop, same GPT, same batches, same optimizer, in one run.

Variants run in interleaved rounds and each keeps its best round (other load on a shared
machine only ever slows a round down). Both sides time only training steps: batch sampling,
forward, backward, clipping to the global norm, the AdamW update over the same parameter
groups, and the EWA update of the constant+EWA schedule; the trainer's periodic evaluations
are excluded from its tokens/s (``RunResult.tokens_per_s``), its telemetry bookkeeping is not.

Where ZeRO-2 on one CPU worker spends its time against the plain loop (default shape, ms per
step, best of 12 interleaved rounds of 10 steps, timers around DeepSpeed's own methods):
forward 16.3 vs 16.4; backward 32.8 vs 31.3, of which 0.3 in DeepSpeed's per-parameter
gradient hooks and 1.0 in its reduction epilogue (flatten the bucket, all-reduce it, copy it
back into the gradients: the all-reduce is over one process here, the copies are not free);
optimizer step 3.2 vs 2.6 (clip, AdamW, zero_grad), of which 1.1 for the global norm (one
norm per parameter, then a collective), 1.1 for AdamW on the flat fp32 partition (faster than
AdamW over separate tensors, 2.0) and about 1.0 for the rest: flattening the gradients into
that partition, scaling them, copying the updated weights back into the model. Two settings
the trainer builds took most of what ZeRO-2 lost before: ``contiguous_gradients`` off on the
CPU (one gradient copy less in every hook, 1.2 to 1.7 ms of backward) and parameter groups
with equal hyperparameters merged (one flat partition instead of three, about 0.8 ms of
optimizer step). Back to back on the same shared machine, the settings before gave
ratio_zero2 = 0.895 and 0.795, these 0.962 and 0.929.

    .venv/bin/python benchmarks/train_throughput.py [--steps 40] [--d-model 128] ...

The last line is machine-readable: ``ratio_zero0=<float> ratio_zero2=<float>`` (DeepSpeed
tokens/s divided by plain PyTorch tokens/s; goal ≥ 0.9). On a CUDA machine it also prints the
model FLOPs utilisation, with 6·N·tokens + 12·n_layer·d_model·seq_len·tokens FLOPs per
training step (Kaplan et al. 2020; attention included) against the GPU's peak given by
``--peak-tflops``, by default an H100 SXM's dense peak in the run's ``--precision``: 67
TFLOP/s in fp32 (no tensor cores), 989 in bf16.

``--precision bf16`` trains the DeepSpeed variants through the trainer's ``precision: bf16``
(bf16 module parameters, fp32 master weights in the optimizer) and runs the plain loop under
``torch.autocast`` in bf16 with fp32 weights, the way a PyTorch user writes mixed precision.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.config import TrainConfig  # noqa: E402
from trainer.data import TokenCorpus, batch_generator, build_corpus  # noqa: E402
from trainer.engine import merge_equal_groups  # noqa: E402
from trainer.model import GPT, GPTConfig  # noqa: E402
from trainer.schedule import lr_multiplier  # noqa: E402
from trainer.telemetry import NullTelemetry  # noqa: E402
from trainer.train import train  # noqa: E402

logger = logging.getLogger("train_throughput")


def make_corpus(directory: Path) -> Path:
    """A small offline byte-level corpus (random words), enough for throughput."""
    rng = random.Random(0)
    words = "time transfer critical batch size learning rate scaling law tokens".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(16)) for _ in range(20000))
    (directory / "text.txt").write_text(text)
    build_corpus([str(directory / "text.txt")], directory / "corpus")
    return directory / "corpus"


#: dense peaks of an H100 SXM, TFLOP/s, by precision (NVIDIA's data sheet, without sparsity)
PEAK_TFLOPS = {"fp32": 67.0, "bf16": 989.4}


def plain_pytorch(config: TrainConfig, device: str) -> float:
    """tokens/s of a textbook loop: no DeepSpeed, no process group. It does what the trainer
    does every step for the same run: the same parameter groups and AdamW, clipping, and the
    EWA update of the constant+EWA schedule."""
    torch.manual_seed(config.seed)
    corpus = TokenCorpus(config.corpus_dir)
    model = GPT(
        GPTConfig(**{"seq_len": config.seq_len, "vocab_size": corpus.vocab_size, **config.model})
    ).to(device)
    opt = config.optimizer
    groups = merge_equal_groups(model.optimizer_groups(config.learning_rate, opt.weight_decay))
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        betas=(opt.beta1, opt.beta2),
        eps=opt.eps,
        weight_decay=opt.weight_decay,
    )
    params = list(model.parameters())
    use_ewa = config.schedule.name == "constant_ewa"
    ewa = [torch.zeros_like(p) for p in params] if use_ewa else []
    n_seq = config.batch_size_tokens // config.seq_len
    total = config.steps
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    _sync(device)
    start = time.perf_counter()
    for step in range(total):
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * lr_multiplier(step, total, config.schedule)
        x, y = corpus.batch(
            "train", n_seq, config.seq_len, batch_generator(config.seed, step, 0, 0)
        )
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        loss.backward()
        if opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if use_ewa:  # ξ ← τ·ξ + (1 − τ)·θ, as the trainer does after every step
            with torch.no_grad():
                torch._foreach_lerp_(
                    ewa, [p.detach() for p in params], 1.0 - config.schedule.ewa_decay
                )
        float(loss.detach())  # the trainer reads the loss every step too
    _sync(device)
    return total * config.batch_size_tokens / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-sequences", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved repetitions")
    parser.add_argument("--precision", choices=sorted(PEAK_TFLOPS), default="fp32")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="GPU peak for MFU (default: an H100 SXM's dense peak in --precision, "
        "67 TFLOP/s in fp32, 989 in bf16)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(Path(tmp))
        shape = {"n_layer": args.n_layer, "n_head": args.n_head, "d_model": args.d_model}
        raw = {
            "task": "gpt",
            "corpus_dir": str(corpus),
            "seq_len": args.seq_len,
            "model": shape,
            "learning_rate": 3e-3,
            "batch_size_tokens": args.batch_sequences * args.seq_len,
            "n_tokens": args.steps * args.batch_sequences * args.seq_len,
            "threads_per_worker": args.threads,
            "eval": {"batches": 1},
            "precision": args.precision,
        }
        config = TrainConfig.from_dict(raw)
        # warm-up of the allocator and kernels, then interleaved rounds so that load from
        # other processes hits every variant alike; each variant keeps its best round
        plain_pytorch(
            TrainConfig.from_dict({**raw, "n_tokens": raw["batch_size_tokens"] * 5}), device
        )
        rounds: dict[str, list[float]] = {"plain": [], "zero0": [], "zero2": []}
        for _ in range(args.rounds):
            rounds["plain"].append(plain_pytorch(config, device))
            for stage in (0, 2):
                run = train({**raw, "zero_stage": stage}, telemetry=NullTelemetry())
                rounds[f"zero{stage}"].append(run.tokens_per_s)
                n_params = run.n_params
        results = {name: max(values) for name, values in rounds.items()}
    print(
        f"GPT n_layer={args.n_layer} d_model={args.d_model} seq_len={args.seq_len} "
        f"batch={args.batch_sequences * args.seq_len} tokens, N={n_params}, {args.steps} steps, "
        f"best of {args.rounds} interleaved rounds, device={device}, precision={args.precision}"
    )
    for name, value in results.items():
        each = ", ".join(f"{v:,.0f}" for v in rounds[name])
        print(f"{name:6s} tokens/s = {value:,.0f}  (rounds: {each})")
    if device == "cuda":
        peak = args.peak_tflops or PEAK_TFLOPS[args.precision]
        flops_per_token = 6 * n_params + 12 * args.n_layer * args.d_model * args.seq_len
        for name, value in results.items():
            mfu = value * flops_per_token / (peak * 1e12)
            print(f"{name:6s} MFU = {100 * mfu:.2f} % of {peak:g} TFLOP/s ({args.precision} peak)")
    r0 = results["zero0"] / results["plain"]
    r2 = results["zero2"] / results["plain"]
    if not (math.isfinite(r0) and math.isfinite(r2)):
        return 1
    print(f"ratio_zero0={r0:.3f} ratio_zero2={r2:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
