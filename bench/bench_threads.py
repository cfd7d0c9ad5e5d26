"""Benchmark: the CPU thread / OpenMP wait policy, on idle cores and with another process busy.

torch's OpenMP threads spin while they wait for work (libgomp's default); when another process
shares the cores, a spinning thread takes the time slice the working thread needs, and small ops
stall (the tests measured 30x; issue 12 measured a training step 12.7x slower with 2 threads on a
busy 2-core machine). The ``sendvae`` command sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set
it (:func:`sendvae.cli.main`); this benchmark measures what that buys and costs.

Each setting runs in a fresh child process (the OpenMP runtime reads the policy once, at start):
the tiny shapes VAE (``tiny-f4c4``, 32 px, batch 32) trains ``--steps`` steps at the precision
``auto`` chooses on this machine, and the child prints its images/s. The settings alternate over
``--rounds`` rounds, the best round counts; "busy" runs one pure-Python busy loop beside the child
(a stand-in for a second job on the laptop). Printed: images/s per setting, and each setting's rate
relative to torch's defaults (2 threads, no policy) in the same load condition.

Run: ``.venv/bin/python bench/bench_threads.py [--steps 8] [--rounds 3]``. Never run it beside the
tests or another benchmark: the "idle" rows would not be idle.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SETTINGS = [  # (label, torch threads, OMP_WAIT_POLICY or None for the runtime's default)
    ("2 threads, default wait", 2, None),
    ("2 threads, PASSIVE", 2, "PASSIVE"),
    ("1 thread, default wait", 1, None),
    ("1 thread, PASSIVE", 1, "PASSIVE"),
]


def child(steps: int, threads: int) -> None:
    """Train the tiny VAE for ``steps`` steps (after 2 warm-up steps) and print images/s."""
    import torch

    from sendvae.hardware import autocast, resolve_precision
    from sendvae.models.vae import build_vae

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    precision = resolve_precision("auto", "cpu").precision
    vae = build_vae("tiny-f4c4", resolution=32)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4, fused=True)
    x = torch.rand(32, 3, 32, 32) * 2 - 1

    def step() -> None:
        with autocast(precision, "cpu"):
            reconstruction = vae.decode(vae.encode(x).sample())
        loss = (reconstruction.float() - x).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(f"{precision} {steps * x.shape[0] / (time.perf_counter() - start):.3f}")


def run_setting(threads: int, policy: str | None, steps: int) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--child", str(steps), str(threads)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[-2], float(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per child")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best counts")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from sendvae.hardware import describe_cpu

    print(f"CPU: {describe_cpu()['cpu_model']}, {os.cpu_count()} logical cores; tiny-f4c4 step, batch 32")
    best: dict[tuple[str, str], float] = {}
    precision = "?"
    for load in ("idle", "busy"):
        for _ in range(args.rounds):
            for label, threads, policy in SETTINGS:
                hog = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None)
                try:
                    precision, rate = run_setting(threads, policy, args.steps)
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                best[load, label] = max(best.get((load, label), 0.0), rate)
    print(f"precision (auto): {precision}")
    for load in ("idle", "busy"):
        reference = best[load, SETTINGS[0][0]]
        for label, _, _ in SETTINGS:
            rate = best[load, label]
            print(f"{load:4s}  {label:24s} {rate:7.1f} img/s   {rate / reference:5.2f}x torch's default")


if __name__ == "__main__":
    main()
