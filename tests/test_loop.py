"""The shared training loop on a toy stage: accumulation, DDP, exact resume, signals, guards, locks.

The toy stage has two phases like stage 1: ``fit`` trains a linear regressor whose loss also flows
through a small ``critic`` (as the generator loss flows through the discriminator), and ``critic``
trains the critic on the detached predictions left in the step's scratch space.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sendvae.errors import UserError
from sendvae.train.checkpoint import list_checkpoints, load_checkpoint, load_latest
from sendvae.train.data_order import InfiniteSampler
from sendvae.train.loop import LoopConfig, NonFiniteError, train
from sendvae.train.stage import Phase, Stage, StepContext

TESTS = Path(__file__).resolve().parent


class ToyData(torch.utils.data.Dataset):
    """``y = x . (1, 2, 3, 4) + 0.5`` for 64 fixed Gaussian x."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.arange(1.0, 5.0) + 0.5

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i)}


class ToyStage:
    """A regressor (phase ``fit``) and a critic (phase ``critic``) sharing the step's scratch dict."""

    def __init__(self, noise: float = 0.0, critic_start: int = 0, nan_from: int = -1, nan_until: int = -1,
                 sleep: float = 0.0, lr: float = 0.2) -> None:
        torch.manual_seed(0)
        self.net, self.critic = nn.Linear(4, 1), nn.Linear(1, 1)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.01)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=lr, weight_decay=0.01)
        self.noise, self.critic_start, self.sleep = noise, critic_start, sleep
        self.nan_range = (nan_from, nan_until)

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "critic": self.critic}

    def ema_modules(self) -> list[str]:
        return ["net"]

    def phases(self) -> list[Phase]:
        return [Phase("fit", self.opt, ("net",), self.fit_loss),
                Phase("critic", self.critic_opt, ("critic",), self.critic_loss, start_images=self.critic_start)]

    def fit_loss(self, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        if self.sleep:
            time.sleep(self.sleep)
        pred = ctx.module("net")(batch["x"]).squeeze(-1)
        if self.noise:
            pred = pred + self.noise * torch.randn(pred.shape, generator=ctx.generator, device=ctx.device)
        ctx.scratch["pred"] = pred.detach()
        mse = (pred.float() - batch["y"]).square().mean()
        loss = mse + 1e-3 * ctx.module("critic")(pred[:, None]).mean()
        if self.nan_range[0] <= ctx.images_seen < self.nan_range[1]:
            loss = loss * float("nan")
        return loss, {"mse": mse.detach()}

    def critic_loss(self, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        out = ctx.module("critic")(ctx.scratch["pred"][:, None]).squeeze(-1)
        return (out.float() - batch["y"]).square().mean(), {}


def cfg(**kw) -> LoopConfig:
    base = dict(total_images=256, batch_size=8, num_workers=0, log_every=64, checkpoint_every=128, device="cpu",
                ema_decay=0.9, seed=3)
    base.update(kw)
    return LoopConfig(**base)


def weights(stage: ToyStage) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v.detach().clone() for m, mod in stage.modules().items() for k, v in mod.state_dict().items()}


SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, {tests!r})
from test_loop import ToyData, ToyStage, weights
from sendvae.train.loop import LoopConfig, train
from safetensors.torch import save_file
args = json.loads(sys.argv[1])
stage = ToyStage(**args["stage"])
summary = train(stage, ToyData(), LoopConfig(**args["cfg"]), args["run"])
import torch.distributed as dist
if int(__import__("os").environ.get("RANK", "0")) == 0:
    save_file(weights(stage), args["out"])
    print("SUMMARY " + json.dumps(summary), flush=True)
"""


def write_script(tmp_path: Path) -> Path:
    path = tmp_path / "toy_train.py"
    path.write_text(SCRIPT.format(tests=str(TESTS)))
    return path


def script_args(run: Path, out: Path, stage: dict, **config) -> str:
    return json.dumps({"run": str(run), "out": str(out), "stage": stage, "cfg": cfg(**config).__dict__})


def summary_of(stdout: str) -> dict:
    line = [ln for ln in stdout.splitlines() if ln.startswith("SUMMARY ")][-1]
    return json.loads(line[len("SUMMARY "):])


def test_toy_stage_satisfies_protocol_and_losses_fall(tmp_path: Path) -> None:
    stage = ToyStage()
    assert isinstance(stage, Stage)
    summary = train(stage, ToyData(), cfg(total_images=512, log_every=64), tmp_path / "run")
    assert summary["status"] == "finished" and summary["images_seen"] == 512 and summary["steps"] == 64
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["images"] for r in records] == list(range(64, 513, 64))
    assert records[-1]["fit/mse"] < 0.05 * records[0]["fit/mse"]
    assert records[-1]["critic/loss"] < records[0]["critic/loss"]
    assert all(r["images_per_s"] > 0 for r in records)
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["world_size"] == 1 and "sendvae" in env
    assert "total_images: 512" in (tmp_path / "run" / "config.yaml").read_text()
    assert not (tmp_path / "run" / ".lock").exists()
    # The final checkpoint is complete and its optimiser state loads with weights_only=True.
    final = load_checkpoint(Path(summary["checkpoint"]))
    assert final.images_seen == 512 and final.state["step"] == 64
    optim = torch.load(final.path / "optim.fit.pt", weights_only=True)
    assert set(optim) == {"state", "param_groups"}
    saved = load_file(str(final.path / "model.net.safetensors"))
    torch.testing.assert_close(saved["weight"], stage.net.weight.detach(), rtol=0, atol=0)


def test_ema_follows_its_equation(tmp_path: Path) -> None:
    """With decay d and one step, ema = d * initial + (1 - d) * trained (checked from the checkpoint)."""
    stage = ToyStage()
    initial = stage.net.weight.detach().clone()
    train(stage, ToyData(), cfg(total_images=8, ema_decay=0.75), tmp_path / "run")
    ema = load_latest(tmp_path / "run" / "checkpoints").tensors("ema.net")["weight"]
    torch.testing.assert_close(ema, 0.75 * initial + 0.25 * stage.net.weight.detach())


def test_gradient_accumulation_matches_full_batch(tmp_path: Path) -> None:
    """Batch 8 as one micro-batch of 8 or as 2 micro-batches of 4 gives the same training."""
    full, split = ToyStage(), ToyStage()
    train(full, ToyData(), cfg(total_images=128, micro_batch=8), tmp_path / "full")
    train(split, ToyData(), cfg(total_images=128, micro_batch=4), tmp_path / "split")
    for key, value in weights(full).items():
        torch.testing.assert_close(weights(split)[key], value, rtol=0, atol=1e-6)


def test_second_phase_starts_late_and_first_phase_leaves_its_module_alone(tmp_path: Path) -> None:
    """The fit loss flows through the critic, yet the critic only changes once its phase starts."""
    stage = ToyStage(critic_start=10_000)
    before = {k: v.clone() for k, v in stage.critic.state_dict().items()}
    train(stage, ToyData(), cfg(total_images=64), tmp_path / "run")
    for key, value in stage.critic.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.grad is None for p in stage.critic.parameters())
    moved = ToyStage()
    train(moved, ToyData(), cfg(total_images=64), tmp_path / "run2")
    assert not torch.equal(moved.critic.weight, before["weight"])


def test_sampler_shards_and_resumes_the_global_order() -> None:
    full = InfiniteSampler(10, seed=5)
    stream = list(islice(full, 40))
    for epoch in range(4):  # one permutation per epoch
        assert sorted(stream[10 * epoch:10 * epoch + 10]) == list(range(10))
    assert stream[:10] != stream[10:20]
    ranks = [list(islice(InfiniteSampler(10, rank=r, world=2, seed=5), 20)) for r in range(2)]
    assert ranks[0] == stream[0::2] and ranks[1] == stream[1::2]
    resumed = list(islice(InfiniteSampler(10, rank=1, world=2, seed=5, start=14), 13))
    assert resumed == stream[15::2][:13]


def test_nonfinite_steps_are_skipped_then_training_continues(tmp_path: Path) -> None:
    stage = ToyStage(nan_from=32, nan_until=56)  # 3 steps of 8 images
    summary = train(stage, ToyData(), cfg(total_images=128, max_nonfinite=4, log_every=8), tmp_path / "run")
    assert summary["status"] == "finished" and summary["nonfinite_skipped"] == 3
    assert all(torch.isfinite(p).all() for p in stage.net.parameters())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in records if r["images"] in (32, 40, 56)] == [0, 1, 3]


def test_nonfinite_guard_stops_after_max_in_a_row(tmp_path: Path) -> None:
    stage = ToyStage(nan_from=16, nan_until=10_000)
    with pytest.raises(NonFiniteError, match=r"5 steps in a row had a non-finite.*max_nonfinite=5"):
        train(stage, ToyData(), cfg(total_images=1024, max_nonfinite=5, checkpoint_every=8), tmp_path / "run")
    latest = load_latest(tmp_path / "run" / "checkpoints")
    assert latest.images_seen == 48  # the skipped steps leave the weights as they were after 16 images
    torch.testing.assert_close(latest.tensors("model.net")["weight"], stage.net.weight.detach(), rtol=0, atol=0)


def test_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    run.mkdir()
    import socket
    (run / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(UserError, match=rf"in use by process {os.getpid()}.*\.lock"):
        train(ToyStage(), ToyData(), cfg(total_images=8), run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING):
        assert train(ToyStage(), ToyData(), cfg(total_images=8), run)["status"] == "finished"
    assert "stale lock" in caplog.text and not (run / ".lock").exists()


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, caplog) -> None:
    """Corrupt the newest checkpoint: resume warns, uses the one before, and still ends bitwise equal."""
    reference = ToyStage(noise=0.1)
    train(reference, ToyData(), cfg(total_images=256, checkpoint_every=64), tmp_path / "ref")
    run = tmp_path / "run"
    train(ToyStage(noise=0.1), ToyData(), cfg(total_images=192, checkpoint_every=64), run)
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert newest.name.endswith("192")
    data = bytearray((newest / "model.net.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (newest / "model.net.safetensors").write_bytes(bytes(data))
    resumed = ToyStage(noise=0.1)
    with caplog.at_level(logging.WARNING):
        train(resumed, ToyData(), cfg(total_images=256, checkpoint_every=64), run)
    assert f"checkpoint {newest} is damaged" in caplog.text and "ckpt-000000000128" in caplog.text
    for key, value in weights(reference).items():
        assert torch.equal(weights(resumed)[key], value), key


def test_all_checkpoints_damaged_is_an_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(ToyStage(), ToyData(), cfg(total_images=16, checkpoint_every=8), run)
    for ckpt in list_checkpoints(run / "checkpoints"):
        (ckpt / "state.json").write_text("{broken")
    with pytest.raises(UserError, match="no valid checkpoint.*all are damaged"):
        train(ToyStage(), ToyData(), cfg(total_images=32), run)


def test_keeps_last_k_checkpoints_and_latest_pointer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(ToyStage(), ToyData(), cfg(total_images=80, checkpoint_every=16, keep_last=2), run)
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert names == ["ckpt-000000000064", "ckpt-000000000080"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "ckpt-000000000080"


def test_resume_after_sigkill_matches_uninterrupted(tmp_path: Path) -> None:
    """SIGKILL a training process after its first checkpoint; resuming ends bitwise equal (fp32, CPU)."""
    script = write_script(tmp_path)
    stage = {"noise": 0.1, "sleep": 0.02}
    config = dict(total_images=480, checkpoint_every=96, num_workers=1)
    ref = subprocess.run([sys.executable, str(script), script_args(tmp_path / "ref", tmp_path / "ref.st", stage,
                                                                    **config)],
                         capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    args = [sys.executable, str(script), script_args(run, tmp_path / "run.st", stage, **config)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert load_latest(run / "checkpoints").images_seen < 480
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    ref_w, run_w = load_file(str(tmp_path / "ref.st")), load_file(str(tmp_path / "run.st"))
    for key, value in ref_w.items():
        assert torch.equal(run_w[key], value), key
    assert torch.equal(load_latest(run / "checkpoints").tensors("ema.net")["weight"],
                       load_latest(tmp_path / "ref" / "checkpoints").tensors("ema.net")["weight"])
    # Metric lines the killed run wrote after its checkpoint were dropped, not duplicated.
    images = [json.loads(line)["images"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    reference = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    assert images == [json.loads(line)["images"] for line in reference]


def test_sigterm_writes_a_checkpoint_and_exits_zero(tmp_path: Path) -> None:
    script = write_script(tmp_path)
    run = tmp_path / "run"
    args = [sys.executable, str(script), script_args(run, tmp_path / "w.st", {"sleep": 0.02},
                                                     total_images=100_000, checkpoint_every=80, log_every=8)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    summary = summary_of(stdout)
    assert summary["status"] == "interrupted" and 0 < summary["images_seen"] < 100_000
    latest = load_latest(run / "checkpoints")
    assert latest.images_seen == summary["images_seen"] and latest.images_seen % 8 == 0
    assert "SIGTERM" in stderr and not (run / ".lock").exists()


def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes x 2 micro-batches of 2 equals 1 process with batch 8.

    Tolerance 1e-5: all-reducing and averaging gradients changes float32 rounding only.
    """
    script = write_script(tmp_path)
    one = subprocess.run([sys.executable, str(script), script_args(tmp_path / "one", tmp_path / "one.st", {},
                                                                    total_images=160)],
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), script_args(tmp_path / "two", tmp_path / "two.st", {}, total_images=160,
                                                   micro_batch=2)],
                         capture_output=True, text=True, timeout=180, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "environment.json").read_text())["world_size"] == 2
    w1, w2 = load_file(str(tmp_path / "one.st")), load_file(str(tmp_path / "two.st"))
    initial = weights(ToyStage())
    for key, value in w1.items():
        assert not torch.equal(value, initial[key])  # it trained
        torch.testing.assert_close(w2[key], value, rtol=0, atol=1e-5)


def test_resuming_with_a_changed_model_names_the_checkpoint_and_module(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(ToyStage(), ToyData(), cfg(total_images=16), run)
    changed = ToyStage()
    changed.critic = nn.Linear(1, 2)
    changed.critic_opt = torch.optim.AdamW(changed.critic.parameters())
    with pytest.raises(UserError, match=r"ckpt-000000000016: model.critic does not fit this run's module 'critic'"):
        train(changed, ToyData(), cfg(total_images=32), run)


def test_progress_bar_shows_unless_tqdm_disable_is_set(tmp_path: Path, capsys, monkeypatch) -> None:
    """`sendvae demo --quiet` sets TQDM_DISABLE=1; the loop's bar passes disable= and must still obey it."""
    train(ToyStage(), ToyData(), cfg(total_images=16), tmp_path / "loud")
    assert "train:" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    train(ToyStage(), ToyData(), cfg(total_images=16), tmp_path / "quiet")
    assert "train:" not in capsys.readouterr().err
