"""Time one captured training step of the book's model under different kernel choices (CUDA only).

Variants: cuDNN's LSTM vs PyTorch's native LSTM cell loop, each in float32 and under bf16 autocast, all
captured as CUDA graphs (the fast path). Reports microseconds per step and tokens/s; use it to decide what
the trainer's fast path should pick on a new card.

    python bench/step_variants.py --batch-size 32 --num-steps 35
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from deeprnn.model import RNNLM
from deeprnn.training.step import clip_grad_norm_


def time_variant(cudnn: bool, autocast: bool, batch: int, steps: int, hidden: int, layers: int, iters: int) -> float:
    """Median microseconds per captured step."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = RNNLM(28, "lstm", hidden, layers).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=2.0, fused=True)
    x = torch.randint(0, 28, (batch, steps), device=dev)
    y = torch.randint(0, 28, (batch, steps), device=dev)
    state = model.begin_state(batch, dev)
    params = list(model.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            logits, new = model(x, state)
            loss = F.cross_entropy(logits.float(), y.T.reshape(-1))
        loss.backward()
        clip_grad_norm_([p.grad for p in params], 1.0)
        opt.step()
        for s, n in zip(state, new):
            s.copy_(n.detach())

    with torch.backends.cudnn.flags(enabled=cudnn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Print a table of the variants."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-steps", type=int, default=35)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--iters", type=int, default=200)
    a = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("| LSTM kernels | precision | us/step | tokens/s |")
    print("| --- | --- | --- | --- |")
    for cudnn in (True, False):
        for autocast in (False, True):
            try:
                us = time_variant(cudnn, autocast, a.batch_size, a.num_steps, a.hidden, a.layers, a.iters)
                tps = f"{a.batch_size * a.num_steps / us * 1e6:,.0f}"
            except Exception as exc:  # a variant the platform refuses is a result too
                us, tps = float("nan"), f"failed: {type(exc).__name__}: {str(exc)[:80]}"
            print(
                f"| {'cuDNN' if cudnn else 'native'} | {'bf16 autocast' if autocast else 'fp32'} | {us:,.0f} | {tps} |"
            )


if __name__ == "__main__":
    main()
