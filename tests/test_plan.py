"""`nanopipe plan` and the batch arithmetic the training stages run with (nanopipe.sizing), against
nanochat's classic scripts (790f3be: base_train.py, mid_train.py, chat_sft.py; device batches from
speedrun.sh, README "d26" and run1000.sh)."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from nanopipe import sizing
from nanopipe.config import ConfigError, load_config
from nanopipe.model import GPT
from nanopipe.plan import model_config, plan, render
from nanopipe.train.chat_sft import chat_batch

# nanochat's device batch per depth (base_train and mid_train; 80 GB GPUs) and chat_sft.py's 4 rows.
NANOCHAT_DEVICE_BATCH = {"d20": 32, "d26": 16, "d32": 8}
NANOCHAT_SFT_DEVICE_BATCH, NANOCHAT_SFT_EXAMPLES, NANOCHAT_TOTAL_BATCH, NANOCHAT_SEQ = 4, 32, 524_288, 2048
TORCHRUN_STAGES = ("base_train", "base_eval", "mid_train", "sft", "rl", "chat_eval")


def on_gpus(preset: str, gpus: int):
    return load_config(preset, [f"{s}.nproc_per_node={gpus}" for s in TORCHRUN_STAGES])


def test_d20_plan_is_the_speedrun():
    p = plan(load_config("d20"))
    b = p["stages"]["base_train"]
    assert p["model"]["params"] == 560_988_160  # nanochat's "Number of parameters" at depth 20, vocab 65,536
    assert (b["tokens_per_step"], b["steps"], b["tokens"]) == (524_288, 21_400, 11_219_763_200)
    assert b["data_passes"] <= 1 and b["fits"] and p["gpu"] == "h100-80gb" and b["world"] == 8
    assert 2.5 * 3600 < b["seconds"] < 5 * 3600 and p["total"]["cost_usd"] > 0  # at 40% MFU on 8 x H100
    text = render(p)
    assert "560,988,160 parameters" in text and "21,400" in text and "524,288" in text and "0.91 (est.)" in text


@pytest.mark.parametrize("preset", ["d20", "d26", "d32"])
def test_parameter_count_is_the_models(preset):
    mcfg = model_config(load_config(preset))
    with torch.device("meta"):
        model = GPT(mcfg)
    assert sizing.num_params(mcfg) == sum(p.numel() for p in model.parameters())
    # nanochat's count: embedding + lm_head (65,536 x 64d each) + 12 (64d)^2 per layer
    d, c = mcfg.n_layer, mcfg.n_embd
    assert sizing.num_params(mcfg) == 2 * 65_536 * c + 12 * c * c * d and c == 64 * d
    assert sizing.flops_per_token(mcfg) == model.estimate_flops()


@pytest.mark.parametrize("preset", ["d20", "d26", "d32"])
@pytest.mark.parametrize("gpus", [8, 1])
def test_batches_and_steps_equal_nanochats(preset, gpus):
    cfg = on_gpus(preset, gpus)
    p = plan(cfg, mid_tokens=50_000_000, sft_conversations=21_400)
    B = NANOCHAT_DEVICE_BATCH[preset]
    base, mid, sft = (p["stages"][s] for s in ("base_train", "mid_train", "sft"))
    # base_train.py / mid_train.py: grad_accum_steps = total_batch_size // (device_batch_size * max_seq_len * world)
    accum = NANOCHAT_TOTAL_BATCH // (B * NANOCHAT_SEQ * gpus)
    for s in (base, mid):
        assert (s["device_batch_size"], s["grad_accum"], s["tokens_per_step"]) == (B, accum, NANOCHAT_TOTAL_BATCH)
        assert s["device_batch_size"] * s["grad_accum"] * s["world"] * NANOCHAT_SEQ == NANOCHAT_TOTAL_BATCH
    # nanochat's base horizon: 20 tokens per parameter at 524,288 a step; mid: one epoch of its tokens
    assert base["steps"] == 20 * p["model"]["params"] // NANOCHAT_TOTAL_BATCH
    assert mid["steps"] == 50_000_000 // NANOCHAT_TOTAL_BATCH
    # chat_sft.py: grad_accum_steps = target_examples_per_step // (device_batch_size * world);
    # num_iterations = len(train_ds) // target_examples_per_step
    sft_accum = NANOCHAT_SFT_EXAMPLES // (NANOCHAT_SFT_DEVICE_BATCH * gpus)
    assert (sft["device_batch_size"], sft["grad_accum"]) == (NANOCHAT_SFT_DEVICE_BATCH, sft_accum)
    assert sft["steps"] == 21_400 // NANOCHAT_SFT_EXAMPLES and sft["examples_per_step"] == 32
    # the training stages compute the same (chat_sft.chat_batch is what mid_train and sft run)
    d = SimpleNamespace(world_size=gpus, device=torch.device("cuda"))
    mcfg = model_config(cfg)
    assert chat_batch(d, "mid_train", cfg.mid_train, mcfg, NANOCHAT_SEQ, True, print) == (B, accum)
    assert chat_batch(d, "sft", cfg.sft, mcfg, NANOCHAT_SEQ, True, print) == (NANOCHAT_SFT_DEVICE_BATCH, sft_accum)


@pytest.mark.parametrize("override, needle", [
    ("sft.nproc_per_node=3", "sft.target_examples_per_step (32) must be a multiple of sft.device_batch_size x ranks (4 x 3) = 12"),
    ("base_train.nproc_per_node=3", "base_train.total_batch_size (524,288) must be a multiple of"),
    ("mid_train.device_batch_size=24", "mid_train.total_batch_size (524,288) must be a multiple of"),
])
def test_a_batch_that_does_not_divide_fails_at_load_naming_the_fields(override, needle):
    with pytest.raises(ConfigError, match="invalid config") as e:
        load_config("d20", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_auto_device_batch_fits_a_24gb_card_and_keeps_the_step():
    cfg = load_config("d20", ["base_train.device_batch_size=auto"])
    p = plan(cfg, gpus=1, gpu="4090")
    b = p["stages"]["base_train"]
    assert b["auto"] and b["fits"] and b["memory"]["total"] <= p["memory_budget_bytes"]
    assert b["device_batch_size"] * b["grad_accum"] * 2048 == 524_288  # the step is kept through accumulation
    # the largest that fits: twice the rows would not
    assert sizing.train_memory(model_config(cfg), 2 * b["device_batch_size"], 2048, 2, True)["total"] > p["memory_budget_bytes"]
    assert b["steps"] == 21_400 and b["seconds"] > 24 * 3600  # one 4090: days, not hours
    # the stages that do not fit at their fixed device batch are named, with what to set
    assert "does not fit a 4090" in render(p) and "--set mid_train.device_batch_size=auto" in render(p)


def test_auto_fails_clearly_when_nothing_fits():
    with pytest.raises(sizing.SizingError, match=r"base_train.device_batch_size=auto: even 1 row\(s\) need about .* GiB"):
        plan(load_config("d32", ["base_train.device_batch_size=auto"]), gpus=1, gpu="v100")


def test_plan_cli_table_and_json():
    run = lambda *a: subprocess.run([sys.executable, "-m", "nanopipe", "plan", *a], capture_output=True, text=True,
                                    timeout=120)
    p = run("--preset", "d20", "--json")
    assert p.returncode == 0, p.stderr
    j = json.loads(p.stdout)
    assert j["model"]["params"] == 560_988_160 and j["stages"]["base_train"]["steps"] == 21_400
    p = run("--preset", "d20", "--gpus", "1", "--gpu", "4090", "--set", "base_train.device_batch_size=auto")
    assert p.returncode == 0 and " (auto)" in p.stdout and "GPU-hours" in p.stdout, p.stderr
    p = run("--preset", "d20", "--gpu", "tpu")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "unknown GPU 'tpu'" in p.stderr


def test_tiny_plan_runs_on_cpu_without_a_price():
    p = plan(load_config("tiny"))
    b = p["stages"]["base_train"]
    assert b["device"] == "cpu" and b["seconds"] is None and b["data_passes"] < 1
    assert (b["device_batch_size"], b["grad_accum"]) == (8, 2)
    assert "tiny" in render(p)


def test_training_resolves_auto_as_the_plan_does(monkeypatch):
    """train.common.pick_device_batch on a (pretend) 24 GB 4090 picks what `plan --gpu 4090` shows."""
    from nanopipe.train.common import Dist, pick_device_batch

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=24 * sizing.GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 4090")
    cfg = load_config("d20", ["base_train.device_batch_size=auto"])
    mcfg, lines = model_config(cfg), []
    need = lambda b: sizing.train_memory(mcfg, b, 2048, 2, True)["total"]
    B = pick_device_batch(Dist(0, 0, 1, torch.device("cuda", 0)), "base_train", "auto",
                          sizing.divisors(524_288 // 2048), need, lines.append)
    assert B == plan(cfg, gpus=1, gpu="4090")["stages"]["base_train"]["device_batch_size"] == 8
    assert lines == [f"[base_train] device_batch_size=auto: 8 rows (estimated peak {need(8) / sizing.GiB:.2f} GiB of "
                     "20.6 GiB usable on NVIDIA GeForce RTX 4090 (24 GiB))"]
