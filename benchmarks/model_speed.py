"""Forward and training-step time of the ``compact`` and ``paper`` configurations on this machine's CPU.

The table "What `compact` trades" in docs/learned.md was measured with this script. Random single-channel
inputs (the network's time does not depend on the content), median of 5 forward calls and of 3 training
steps (forward, backward on the sum of theta, Adam step; the NCC loss adds little) after one warm-up call.

usage: python benchmarks/model_speed.py [THREADS ...]   (default: 1 2)
"""

import sys
import time

import torch

from bench.learning.model import build_model, count_parameters


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def main(threads: list[int]) -> None:
    torch.manual_seed(0)
    for n in threads:
        torch.set_num_threads(n)
        for name in ("compact", "paper"):
            model = build_model(name)
            opt = torch.optim.Adam(model.parameters(), 1e-4)
            for size in (224, 448):
                a, b = torch.rand(1, 1, size, size), torch.rand(1, 1, size, size)
                model.eval()
                with torch.inference_mode():
                    model(a, b)
                    forward = median_ms(lambda: model(a, b), 5)  # noqa: B023
                model.train()

                def step():
                    model(a, b).sum().backward()  # noqa: B023
                    opt.step()  # noqa: B023
                    opt.zero_grad()  # noqa: B023

                train = median_ms(step, 3)
                print(f"threads {n}  {name:8s} {count_parameters(model):>11,d} parameters  {size} px  "
                      f"forward {forward:7.1f} ms  training step {train:7.1f} ms")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 2])
