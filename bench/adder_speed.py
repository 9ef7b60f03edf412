"""Forward + backward time of AdderConv2d against nn.Conv2d of the same shape.

16 -> 16 channels, 3x3, stride 1, padding 1, 32x32 input, batch 64, in one run
(warm-up, then the median of several interleaved repeats; torch's default
thread count).
Target: the adder layer within 20x of the convolution. The naive
unfold-and-broadcast adder is timed once for context.

    python bench/adder_speed.py            # print the times
    python bench/adder_speed.py --check    # also exit 1 when the target is missed
    python bench/adder_speed.py --out bench/results/adder_speed.md   # also write the results file
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_header

from qcompiler.nn.adder import AdderConv2d  # noqa: E402

TARGET_RATIO = 20.0


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time (seconds) of each step after ``warmup`` untimed rounds.

    The steps alternate within each round, so a load change on a shared machine
    hits all of them alike instead of skewing the ratio.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fwd_bwd(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: list[torch.Tensor]) -> Callable[[], None]:
    """One forward + backward with a fixed upstream gradient; clears the grads first."""
    grad_out = None

    def step() -> None:
        nonlocal grad_out
        x.grad = None
        for p in params:
            p.grad = None
        y = layer(x)
        if grad_out is None:
            grad_out = torch.randn_like(y)
        y.backward(grad_out)

    return step


def naive_adder(x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """Unfold, then broadcast ``(B, C_out, K, L)`` at once: the slow baseline."""
    b, _, h, w = x.shape
    patches = F.unfold(x, weight.shape[2:], padding=padding)  # B, K, L
    y = -(patches.unsqueeze(1) - weight.view(weight.shape[0], -1, 1)).abs().sum(2)
    return y.view(b, weight.shape[0], h, w)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 unless adder/conv <= {TARGET_RATIO:g}x")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per layer (median reported)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also write the output, headed by the command and machine, to this file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    batch, channels, size = args.batch, 16, 32
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    adder = AdderConv2d(channels, channels, 3, padding=1)

    steps = {"conv": fwd_bwd(conv, x, [conv.weight]), "adder": fwd_bwd(adder, x, [adder.weight])}
    medians = time_interleaved(steps, warmup=2, repeats=args.repeats)
    conv_s, adder_s = medians["conv"], medians["adder"]
    weight = adder.weight.detach().clone().requires_grad_()
    naive_s = time_interleaved({"naive": fwd_bwd(lambda t: naive_adder(t, weight, 1), x, [weight])}, warmup=0, repeats=1)["naive"]

    ratio = adder_s / conv_s
    ok = ratio <= TARGET_RATIO
    text = "\n".join([
        f"shape: batch {batch}, {channels}->{channels} 3x3, stride 1, padding 1, {size}x{size}; threads {torch.get_num_threads()}",
        f"nn.Conv2d   fwd+bwd: {conv_s * 1e3:8.1f} ms",
        f"AdderConv2d fwd+bwd: {adder_s * 1e3:8.1f} ms   ratio {ratio:6.2f}x   (target <= {TARGET_RATIO:g}x)",
        f"naive adder fwd+bwd: {naive_s * 1e3:8.1f} ms   ratio {naive_s / conv_s:6.2f}x   (one repeat, for context)",
        "target met" if ok else "TARGET MISSED",
    ])
    print(text)
    if args.out is not None:
        import results_header

        results_header.write(args.out, "AdderConv2d against nn.Conv2d, forward + backward (bench/adder_speed.py)",
                             f"Median of {args.repeats} interleaved repeats after 2 warm-up rounds.\n\n```\n{text}\n```")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
