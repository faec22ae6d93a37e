"""The training loop: accumulation, exact resume, atomic checkpoints, options, devices, dropout,
AdEMAMix, bad input."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastopt
import fastopt.train as T
from fastopt.train import checkpoint, config, loop
from fastopt.train.data import Corpus, unigram_cross_entropy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    # 48 KiB of real Python source: small enough for fast tests, varied enough to learn from
    src = Path(loop.__file__).read_bytes() + Path(torch.__file__).read_bytes() * 4
    f = tmp_path_factory.mktemp("data") / "corpus.txt"
    f.write_bytes(src[: 48 * 1024])
    return f


def tiny(corpus_file, out, *extra):
    return [
        "--data",
        str(corpus_file),
        "--out",
        str(out),
        "--d-model",
        "32",
        "--n-layers",
        "2",
        "--n-heads",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--no-progress",
        "--no-plot",
        *extra,
    ]


def records(out):
    return T.read_metrics(Path(out) / T.METRICS)


# ---- gradient accumulation -----------------------------------------------------------------


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
@pytest.mark.parametrize("optimizer", ["torch-adamw", "adamw"])
def test_accumulation_matches_one_big_batch(corpus_file, optimizer, monkeypatch):
    """k micro-batches of b sequences give the gradient and loss of one batch of k*b."""
    k, b = 3, 2
    corpus = Corpus(corpus_file)
    full_x, full_y = corpus.train_batch(torch.Generator().manual_seed(1), k * b, 32)

    def run_with(batch_size, accum):
        argv = tiny(
            corpus_file,
            "unused",
            "--optimizer",
            optimizer,
            "--max-grad-norm",
            "0",
            "--batch-size",
            str(batch_size),
            "--accum-steps",
            str(accum),
        )
        cfg = T.parse_args(argv)
        run = T.Run(cfg, corpus, seed=0)
        chunks = iter(zip(full_x.split(batch_size), full_y.split(batch_size), strict=True))
        monkeypatch.setattr(corpus, "train_batch", lambda g, bs, sl: next(chunks))
        grads = {}

        def capture(closure=None):
            grads.update({n: p.grad.clone() for n, p in run.model.named_parameters()})

        run.optimizer.step = capture
        rec = run.train_step()
        return rec, grads

    rec_acc, g_acc = run_with(b, k)
    rec_one, g_one = run_with(k * b, 1)
    assert rec_acc["micro_batches"] == k and rec_one["micro_batches"] == 1
    assert rec_acc["loss"] == pytest.approx(rec_one["loss"], rel=1e-6)
    assert rec_acc["grad_norm"] == pytest.approx(rec_one["grad_norm"], rel=1e-5)
    for name in g_one:
        torch.testing.assert_close(g_acc[name], g_one[name], rtol=1e-5, atol=1e-7, msg=name)


# ---- exact resume --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer,extra",
    [
        (
            "torch-adamw",
            ["--accum-steps", "2", "--lawa-every", "3", "--lawa-window", "2"],
        ),
        (
            "adamw",
            [
                "--accum-steps",
                "2",
                "--lawa-every",
                "3",
                "--lawa-window",
                "2",
                "--seq-len-warmup",
                "6",
            ],
        ),
        ("lion", ["--precision", "fp16", "--schedule", "linear"]),
        ("adamw", ["--dropout", "0.2"]),  # dropout draws from torch's RNG: the checkpoint has it
        ("ademamix", ["--accum-steps", "2", "--max-grad-norm", "0.5"]),
    ],
)
def test_stop_and_resume_is_bit_identical(corpus_file, tmp_path, optimizer, extra):
    common = ["--steps", "12", "--optimizer", optimizer, *extra]
    T.main(tiny(corpus_file, tmp_path / "whole", *common))
    T.main(tiny(corpus_file, tmp_path / "split", *common, "--stop-after", "6"))
    first = records(tmp_path / "split")
    assert max(r["step"] for r in first) == 6
    T.main(tiny(corpus_file, tmp_path / "split", *common, "--resume"))

    def key(r):
        return {k: r.get(k) for k in ("step", "loss", "lr", "grad_norm", "val_loss", "seq_len")}

    whole, split = records(tmp_path / "whole"), records(tmp_path / "split")
    assert len(whole) == len(split) == 12 + 3  # 12 steps, evals at 4, 8, 12
    assert [key(r) for r in whole] == [key(r) for r in split]  # floats compared exactly
    a = torch.load(tmp_path / "whole" / T.CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "split" / T.CHECKPOINT, weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


# ---- atomic checkpoints --------------------------------------------------------------------


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, {"step": 1, "w": torch.arange(1000.0)})

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip file")  # what a partial torch.save leaves behind
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    got = checkpoint.load_checkpoint(path)
    assert got["step"] == 1 and torch.equal(got["w"], torch.arange(1000.0))


def test_process_killed_during_save_keeps_previous_checkpoint(tmp_path):
    """A real SIGKILL in the middle of writing the new checkpoint."""
    script = textwrap.dedent(
        f"""
        import os, pathlib, signal, torch
        from fastopt.train import checkpoint as C
        path = pathlib.Path({str(tmp_path / "ckpt.pt")!r})
        C.save_checkpoint(path, {{"step": 1, "w": torch.arange(10.0)}})
        real_save = torch.save
        def dying_save(obj, f):
            real_save(obj, f)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # after the bytes, before the rename
        C.torch.save = dying_save
        C.save_checkpoint(path, {{"step": 2, "w": torch.zeros(10)}})
        """
    )
    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert (tmp_path / "ckpt.pt.tmp").exists()  # the killed save got as far as the tmp file
    got = checkpoint.load_checkpoint(tmp_path / "ckpt.pt")
    assert got["step"] == 1 and torch.equal(got["w"], torch.arange(10.0))


# ---- options -------------------------------------------------------------------------------


def test_every_issue_option_is_on_the_command_line():
    help_text = T.build_parser().format_help()
    for opt in (
        "--steps",
        "--out",
        "--resume",
        "--stop-after",
        "--seed",
        "--data",
        "--optimizer",
        "--backend",
        "--lr",
        "--schedule",
        "--warmup-steps",
        "--min-lr-ratio",
        "--batch-size",
        "--accum-steps",
        "--max-grad-norm",
        "--precision",
        "--seq-len",
        "--seq-len-warmup",
        "--eval-every",
        "--patience",
        "--lawa-every",
        "--lawa-window",
        "--batch-ramp",
        "--restarts",
        "--restart-steps",
        "--compile",
        "--device",
        "--dropout",
        "--beta3",
        "--alpha",
        "--ademamix-warmup",
    ):
        assert opt in help_text, opt


def test_seq_len_warmup_and_batch_ramp(corpus_file, tmp_path):
    T.main(
        tiny(
            corpus_file,
            tmp_path,
            "--steps",
            "8",
            "--seq-len-warmup",
            "4",
            "--accum-steps",
            "4",
            "--batch-ramp",
            "4",
            "--batch-size",
            "2",
        )
    )
    steps = [r for r in records(tmp_path) if "loss" in r]
    # seq len from 32/8 (floored at 8) towards 32 in multiples of 8; micro-batches ceil(4*(1/4 + 3/4*s/4))
    assert [r["seq_len"] for r in steps] == [8, 8, 16, 24, 32, 32, 32, 32]
    assert [r["micro_batches"] for r in steps] == [1, 2, 3, 4, 4, 4, 4, 4]
    assert [r["tokens"] for r in steps][:3] == [
        1 * 2 * 8,
        16 + 2 * 2 * 8,
        48 + 3 * 2 * 16,
    ]


def test_patience_stops_early(corpus_file, tmp_path):
    # an lr far below fp32 resolution leaves the weights, hence the val loss, unchanged
    summary = T.train(
        T.parse_args(
            tiny(
                corpus_file,
                tmp_path,
                "--steps",
                "40",
                "--eval-every",
                "2",
                "--patience",
                "2",
                "--lr",
                "1e-30",
            )
        )
    )
    assert summary["stopped_early"] and summary["step"] == 6  # best at 2, no better at 4 and 6


def test_random_restarts_continue_from_the_best_candidate(corpus_file, tmp_path):
    summary = T.train(
        T.parse_args(
            tiny(
                corpus_file,
                tmp_path,
                "--steps",
                "6",
                "--restarts",
                "3",
                "--restart-steps",
                "3",
            )
        )
    )
    recs = records(tmp_path)
    cand_val = {r["candidate"]: r["val_loss"] for r in recs if "candidate" in r and "val_loss" in r}
    assert sorted(cand_val) == [0, 1, 2]
    winner = min(cand_val, key=cand_val.get)
    ckpt = torch.load(tmp_path / T.CHECKPOINT, weights_only=True)
    assert ckpt["seed"] == winner and summary["step"] == 6
    main_steps = [r["step"] for r in recs if "loss" in r and "candidate" not in r]
    assert main_steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("optimizer", ["torch-adamw", "adamw"])
def test_fp16_with_grad_scaler_trains(corpus_file, tmp_path, optimizer):
    cfg = T.parse_args(tiny(corpus_file, tmp_path, "--precision", "fp16", "--optimizer", optimizer))
    run = T.Run(cfg, Corpus(corpus_file), seed=0)
    recs = [run.train_step() for _ in range(6)]
    assert isinstance(run.scaler, torch.amp.GradScaler)
    applied = [r for r in recs if not r["skipped"]]
    assert len(applied) >= 4 and all(torch.isfinite(torch.tensor(r["grad_norm"])) for r in applied)
    # the schedule advanced once per applied step only
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(
        cfg.peak_lr() * run.scheduler.factor(len(applied))
    )


def test_bf16_keeps_bf16_params_with_fp32_masters(corpus_file, tmp_path):
    cfg = T.parse_args(tiny(corpus_file, tmp_path, "--steps", "3", "--precision", "bf16"))
    run = T.Run(cfg, Corpus(corpus_file), seed=0)
    losses = [run.train_step()["loss"] for _ in range(3)]
    p = next(run.model.parameters())
    assert p.dtype == torch.bfloat16
    assert run.optimizer.state[p]["master_param"].dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(losses)))


def test_default_corpus_and_unigram_baseline():
    corpus = Corpus(None)
    assert len(corpus.train) > 10 * len(corpus.val) / 2 > 0

    # a uniform byte model costs ln 256; source code is far more predictable than that
    h = unigram_cross_entropy(corpus.train, corpus.val)
    assert 2.5 < h < torch.log(torch.tensor(256.0)).item()


# ---- bad input -----------------------------------------------------------------------------


def _error_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        T.main(argv)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastopt-train: error:") and "\n" not in err, err
    return err


def test_bad_inputs_give_one_line_errors(corpus_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    (tmp_path / "empty_dir").mkdir()
    assert "does not exist" in _error_line(capsys, tiny(tmp_path / "nope.txt", tmp_path / "o1"))
    assert "empty" in _error_line(capsys, tiny(empty, tmp_path / "o2"))
    assert "no files" in _error_line(capsys, tiny(tmp_path / "empty_dir", tmp_path / "o3"))
    assert "--steps" in _error_line(capsys, tiny(corpus_file, tmp_path / "o4", "--steps", "0"))
    assert "no checkpoint" in _error_line(capsys, tiny(corpus_file, tmp_path / "o5", "--resume"))
    assert "--dropout" in _error_line(capsys, tiny(corpus_file, tmp_path / "o7", "--dropout", "1"))
    T.main(tiny(corpus_file, tmp_path / "o6", "--steps", "2"))
    # dropout is a hyperparameter, not part of the shape: a resume may change it
    T.main(tiny(corpus_file, tmp_path / "o6", "--steps", "3", "--resume", "--dropout", "0.1"))
    capsys.readouterr()
    err = _error_line(
        capsys,
        tiny(
            corpus_file,
            tmp_path / "o6",
            "--steps",
            "4",
            "--resume",
            "--d-model",
            "48",
            "--n-heads",
            "2",
        ),
    )
    assert "different model shape" in err and "d_model" in err


def test_cli_exit_code_and_single_line(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "fastopt.train", "--steps", "0", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "fastopt-train: error: --steps must be at least 1, got 0"
    ]


def test_compile_path_trains_and_checkpoints(corpus_file, tmp_path, monkeypatch):
    # inductor's C++ compile costs minutes on a 2-core CI box; dynamo with the eager backend
    # still traces the model and exercises everything --compile changes in the loop
    # (the compiled forward, checkpoints of the un-wrapped module). Verified by hand with
    # inductor as well (see the training-loop notes in the README).
    real_compile = torch.compile
    monkeypatch.setattr(loop.torch, "compile", lambda m: real_compile(m, backend="eager"))
    argv = tiny(corpus_file, tmp_path, "--steps", "4", "--compile", "--optimizer", "torch-adamw")
    T.main(argv)
    plain = tmp_path / "plain"
    T.main(tiny(corpus_file, plain, "--steps", "4", "--optimizer", "torch-adamw"))
    ckpt = torch.load(tmp_path / T.CHECKPOINT, weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    got = [r["loss"] for r in records(tmp_path) if "loss" in r]
    want = [r["loss"] for r in records(plain) if "loss" in r]
    assert got == pytest.approx(want, rel=1e-5)


# ---- devices -------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_device_cuda_without_a_gpu_fails_with_one_clear_line(corpus_file, tmp_path, capsys):
    err = _error_line(capsys, tiny(corpus_file, tmp_path, "--device", "cuda", "--steps", "2"))
    assert "--device cuda" in err and "no CUDA device" in err and "--device cpu" in err
    assert not (tmp_path / T.METRICS).exists()  # refused before anything was trained or written


def test_device_auto_and_the_precision_it_implies(corpus_file, tmp_path, monkeypatch):
    have_gpu = torch.cuda.is_available()
    cfg = T.parse_args(tiny(corpus_file, tmp_path))
    assert (cfg.device, cfg.precision) == (("cuda", "bf16") if have_gpu else ("cpu", "fp32"))
    # what auto picks on a GPU machine, checked here without one (no model is built)
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: True)
    cfg = T.parse_args(tiny(corpus_file, tmp_path))
    assert (cfg.device, cfg.precision) == ("cuda", "bf16")
    cfg = T.parse_args(tiny(corpus_file, tmp_path, "--device", "cpu"))
    assert (cfg.device, cfg.precision) == ("cpu", "fp32")
    cfg = T.parse_args(tiny(corpus_file, tmp_path, "--precision", "fp16"))
    assert (cfg.device, cfg.precision) == ("cuda", "fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", ["adamw", "torch-adamw"])
def test_cuda_run_trains_in_bf16_and_resumes(corpus_file, tmp_path, optimizer):
    argv = ["--device", "cuda", "--optimizer", optimizer, "--steps", "8", "--dropout", "0.1"]
    cfg = T.parse_args(tiny(corpus_file, tmp_path, *argv))
    assert cfg.precision == "bf16"
    run = T.Run(cfg, Corpus(corpus_file), seed=0)
    p = next(run.model.parameters())
    assert p.is_cuda and p.dtype == (torch.bfloat16 if optimizer == "adamw" else torch.float32)
    before = run.evaluate()
    recs = [run.train_step() for _ in range(8)]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in recs)
    assert run.evaluate() < before
    T.main(tiny(corpus_file, tmp_path / "split", *argv, "--stop-after", "4"))
    T.main(tiny(corpus_file, tmp_path / "split", *argv, "--resume"))
    assert [r["step"] for r in records(tmp_path / "split") if "loss" in r] == list(range(1, 9))


# ---- dropout -------------------------------------------------------------------------------


def test_dropout_changes_training_losses_and_is_off_in_eval(corpus_file, tmp_path):
    corpus = Corpus(corpus_file)

    def run_with(p):
        return T.Run(T.parse_args(tiny(corpus_file, tmp_path, "--dropout", str(p))), corpus, seed=0)

    plain, dropped = run_with(0.0), run_with(0.3)
    # dropout has no parameters and draws nothing at construction: the same initial weights
    for a, b in zip(plain.model.parameters(), dropped.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # in eval mode nothing is dropped: the same weights give the same val loss, every time
    assert dropped.evaluate() == plain.evaluate() == dropped.evaluate()
    assert dropped.model.training  # evaluate() puts the model back in training mode
    # in training mode it drops: the first loss, taken before any update, already differs
    losses_plain = [plain.train_step()["loss"] for _ in range(3)]
    losses_dropped = [dropped.train_step()["loss"] for _ in range(3)]
    assert all(a != b for a, b in zip(losses_plain, losses_dropped, strict=True))


# ---- AdEMAMix -------------------------------------------------------------------------------


def test_ademamix_gets_the_run_s_hyperparameters(corpus_file, tmp_path, monkeypatch):
    """What the loop passes to fastopt.AdEMAMix (checked with a stand-in for the class)."""
    seen = {}

    def fake_ademamix(params, **kwargs):
        seen.update(kwargs)
        return torch.optim.SGD(params, lr=kwargs["lr"])

    monkeypatch.setattr(fastopt, "AdEMAMix", fake_ademamix, raising=False)
    model = torch.nn.Linear(2, 2)
    argv = ["--optimizer", "ademamix", "--steps", "40", "--beta3", "0.999", "--alpha", "8"]
    loop.make_optimizer(T.parse_args(tiny(corpus_file, tmp_path, *argv)), model)
    assert seen == {
        "lr": 2e-3,
        "betas": (0.9, 0.95, 0.999),
        "alpha": 8.0,
        "t_alpha": 40,  # the alpha and beta3 warm-ups span the run by default
        "t_beta3": 40,
        "eps": 1e-8,
        "max_grad_norm": 1.0,
        "master_weights": False,
        "state_dtype": None,  # --state-dtype auto
        "backend": "auto",
    }
    argv += ["--ademamix-warmup", "0", "--precision", "bf16"]
    loop.make_optimizer(T.parse_args(tiny(corpus_file, tmp_path, *argv)), model)
    assert seen["t_alpha"] is None and seen["t_beta3"] is None and seen["master_weights"]


def test_ademamix_trains_a_few_steps(corpus_file, tmp_path):
    cfg = T.parse_args(tiny(corpus_file, tmp_path, "--optimizer", "ademamix", "--steps", "8"))
    run = T.Run(cfg, Corpus(corpus_file), seed=0)
    assert isinstance(run.optimizer, fastopt.AdEMAMix)
    before = run.evaluate()
    recs = [run.train_step() for _ in range(8)]
    assert not any(r["skipped"] for r in recs)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in recs)
    assert run.evaluate() < before
