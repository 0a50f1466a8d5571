"""``python -m bench train``: unsupervised training of the learned method's network (paper, section 2.3).

Loss: negative global NCC between the warped source and the target (both masked: background 0), or
with ``--loss relative`` NCC after minus NCC before (the public code's variant; same gradient). Adam
(``--lr``, 1e-4) with a per-epoch exponential decay (``--decay``, x0.995); pairs are fed one at a time and
gradients accumulated over ``--real-batch`` pairs before each optimiser step. Source and target get
independent random affine augmentations every time they are seen.

Outputs in ``--out``: ``checkpoint.pt`` (model, optimiser, scheduler, epoch, history, RNG states; written
every epoch, ``--resume`` continues from it), ``history.json``, ``loss.png`` (training and validation loss
per epoch) and ``weights.pt`` (see :func:`bench.learning.model.save_weights`, with a model card in its
metadata), copied to ``--weights-out`` when given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.learning import data as D
from bench.learning.model import build_model, count_parameters, save_weights, theta_to_matrix, warp
from bench.preprocess import PreprocessParams


def ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Global normalised cross-correlation of two equally shaped tensors (a scalar in [-1, 1]).

    ``weight`` (same shape, >= 0) restricts it to where the weight is positive (a weighted NCC).
    """
    if weight is None:
        a = a - a.mean()
        b = b - b.mean()
        return (a * b).sum() / (torch.sqrt((a * a).sum() * (b * b).sum()) + eps)
    total = weight.sum() + eps
    a = a - (weight * a).sum() / total
    b = b - (weight * b).sum() / total
    return (weight * a * b).sum() / (torch.sqrt((weight * a * a).sum() * (weight * b * b).sum()) + eps)


def pair_loss(model: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor, kind: str = "ncc",
              pool: int | Sequence[int] = 1, weights: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Loss for one pair on one common canvas (``(1, 1, H, W)`` each) and the predicted ``theta`` ``(1, 2, 3)``.

    ``pool`` > 1 average-pools both images before the NCC (``theta`` is in normalised coordinates, so it
    applies unchanged): a smoother similarity with a wider basin, hence steadier gradients. Several
    factors (e.g. ``(2, 4, 8)``) give the mean of the negative NCC over those scales. ``weights``
    (moving's, fixed's; from :func:`bench.learning.data.to_tensors`) limit it to pixels both images still
    show: the moving weight is warped with the moving image.
    """
    theta = model(moving, fixed)
    pools = [pool] if isinstance(pool, int) else list(pool)
    loss = moving.new_zeros(())
    for k in pools:
        tensors = [moving, fixed, *(weights or ())]
        if k > 1:
            tensors = [torch.nn.functional.avg_pool2d(t, k, ceil_mode=True) for t in tensors]
        m, f = tensors[:2]
        size = tuple(f.shape[-2:])
        w = None if weights is None else warp(tensors[2], theta, size) * tensors[3]
        loss = loss - ncc(warp(m, theta, size), f, weight=w)
        if kind == "relative":
            with torch.no_grad():
                loss = loss + ncc(m, f, weight=None if weights is None else tensors[2] * tensors[3])
    return loss / len(pools), theta


def load_data(args: argparse.Namespace) -> tuple[list[D.CachedPair], list[D.CachedPair], dict[str, Any]]:
    """Training and validation pairs (preprocessed once, cached) and a description for the model card."""
    cache = args.cache_dir or args.out / "cache"
    params = PreprocessParams() if args.working_size is None else PreprocessParams(working_size=args.working_size)
    from rich.progress import track

    def gen(seeds: range, what: str) -> list[D.CachedPair]:
        return [D.generated_pair(s, args.size, cache, params, args.input_size)
                for s in track(seeds, description=f"preparing {what} pairs")]

    val_seeds = range(args.seed + 1_000_000, args.seed + 1_000_000 + args.n_val)
    if args.data == "generated":
        from bench.datasets import synthetic

        train_seeds = range(args.seed, args.seed + args.n_train)
        info = {"source": "generated", "generator_version": getattr(synthetic, "GENERATOR_VERSION", "?"),
                "train_seeds": [train_seeds.start, train_seeds.stop - 1], "size": args.size}
        train = gen(train_seeds, "training")
    else:
        train = D.anhir_pairs(Path(args.data), args.data_root, cache, params, args.input_size, "training")
        info = {"source": "anhir-table", "table": str(args.data), "split": "training"}
    val = gen(val_seeds, "validation")
    info.update({"n_train": len(train), "n_val": len(val), "val_seeds": [val_seeds.start, val_seeds.stop - 1],
                 "input_size": args.input_size, "preprocess": repr(params)})
    if not train:
        raise SystemExit(f"no training pairs found in {args.data}")
    return train, val, info


def augmented_loss(model, pair, rng, args, aug, others):
    """Augment one pair (:func:`bench.learning.data.to_tensors`), move it to ``args.device`` and return
    ``(loss, theta, augmentation matrices, moving input, fixed input)``."""
    mv, fx, mats, wts = D.to_tensors(pair, rng, aug, others=others, with_weights=True)
    mv, fx = mv.to(args.device), fx.to(args.device)
    wts = None if wts is None else tuple(t.to(args.device) for t in wts)
    loss, theta = pair_loss(model, mv, fx, args.loss, args.loss_pool, wts)
    return loss, theta, mats, mv, fx


def train_epoch(model, opt, pairs, rng, args, aug, progress=None, task=None) -> float:
    """One pass over ``pairs`` in random order; returns the mean loss."""
    model.train()
    opt.zero_grad(set_to_none=True)
    losses = []
    order = rng.permutation(len(pairs))
    for i, idx in enumerate(order):
        loss = augmented_loss(model, pairs[idx], rng, args, aug, pairs)[0]
        (loss / args.real_batch).backward()
        losses.append(float(loss.detach()))
        if (i + 1) % args.real_batch == 0 or i + 1 == len(order):
            opt.step()
            opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress.update(task, advance=1, loss=np.mean(losses))
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(model, pairs, seed: int, args, aug) -> dict[str, float]:
    """Mean loss and median landmark rTRE (before/after) over fixed-seed augmented ``pairs``."""
    model.eval()
    losses, before, after = [], [], []
    for k, pair in enumerate(pairs):
        rng = np.random.default_rng([seed, k])
        loss, theta, (a_m, a_f), mv, fx = augmented_loss(model, pair, rng, args, aug, pairs)
        losses.append(float(loss))
        if pair.moving_points is not None:
            from bench import geometry

            p_m = geometry.apply(a_m, pair.moving_points)
            p_f = geometry.apply(a_f, pair.fixed_points)
            m = theta_to_matrix(theta[0].cpu().numpy(), mv.shape[-2:], fx.shape[-2:])
            diag = float(np.hypot(*fx.shape[-2:]))
            before.append(np.median(np.linalg.norm(p_m - p_f, axis=1)) / diag)
            after.append(np.median(np.linalg.norm(geometry.apply(m, p_m) - p_f, axis=1)) / diag)
    out = {"loss": float(np.mean(losses))}
    if after:
        out.update(rtre_before=float(np.median(before)), rtre_after=float(np.median(after)),
                   success=float(np.mean(np.asarray(after) <= 0.035)))
    return out


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    """Training and validation loss per epoch (and validation rTRE when known) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="training loss")
    ax.plot(ep, [h["val_loss"] for h in history], "s-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (-NCC)")
    ax.grid(alpha=0.3)
    if "val_rtre_after" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(ep, [h["val_rtre_after"] for h in history], "^--", color="tab:green", label="val median rTRE")
        ax2.plot(ep, [h["val_rtre_before"] for h in history], ":", color="tab:gray", label="val rTRE, identity")
        ax2.set_ylabel("median rTRE (validation)")
        ax2.legend(loc="upper center", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("learned method: training curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_card(model, meta: dict[str, Any], filename: str) -> str:
    """Markdown model card for a weight file, from its metadata."""
    d, f = meta["data"], meta["final"]
    val = ", ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in f.items() if k.startswith("val_"))
    return "\n".join([
        f"# Model card: `{filename}`",
        "",
        f"- **Architecture:** `{model.config.name}` configuration of the paper's patch-based affine network, "
        f"{count_parameters(model):,} parameters; hyper-parameters stored in the file (`architecture`).",
        f"- **Data:** {d['source']}" + (f" (generator version {d.get('generator_version')}, seeds "
                                        f"{d['train_seeds'][0]}-{d['train_seeds'][1]}, target size {d['size']} px)"
                                        if d["source"] == "generated" else f" ({d.get('table')}, training split)")
        + f"; {d['n_train']} training pairs, {d['n_val']} validation pairs (generated, seeds "
        f"{d['val_seeds'][0]}-{d['val_seeds'][1]}); shared preprocessing `{d['preprocess']}`, then resampled "
        f"so the longer side is {d['input_size']} px. No ANHIR image was used.",
        f"- **Training:** unsupervised, loss {meta['loss']} (negative global NCC), Adam lr {meta['lr']}, "
        f"x{meta['decay']} per epoch, real batch {meta['real_batch']}, {meta['epochs']} epochs, seed {meta['seed']}, "
        f"random affine augmentation of source and target ({meta['augment']}), loss images "
        f"average-pooled x{meta['loss_pool']} (mean over the factors); torch " + str(meta["torch"]) + ".",
        f"- **Final losses:** training {f['train_loss']:.4f}; validation: {val} "
        "(rTRE on augmented generated validation pairs: landmark error / image diagonal, network frame).",
        f"- **Code:** git commit `{meta['git_commit']}`.",
        f"- **Reproduce:** `{meta['command']}`",
        f"- **Training curve:** `{Path(filename).with_suffix('.loss.png').name}`.",
        "",
    ])


def augment_config(args: argparse.Namespace) -> D.AugmentConfig:
    return D.AugmentConfig(max_rotation_deg=args.max_rotation, scale_range=tuple(args.scale_range),
                           max_shear=args.max_shear, max_translation_frac=args.max_translation,
                           crop_probability=args.crop_probability, crop_range=tuple(args.crop_range),
                           gamma_range=tuple(args.gamma_range), blur_probability=args.blur_probability,
                           swap_probability=args.swap_probability, swap_sigma=args.swap_sigma,
                           cut_probability=args.cut_probability, cut_range=tuple(args.cut_range))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}


def run(args: argparse.Namespace) -> int:
    """Train as configured by the options of :func:`bench.learning.config.add_arguments`; returns an exit status."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console()
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[red]error:[/] --device cuda but CUDA is not available")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    train, val, info = load_data(args)
    model = build_model(args.config).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=args.decay)
    aug = augment_config(args)
    history: list[dict[str, float]] = []
    start = 0
    ckpt_path = args.out / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=args.device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, history = ck["epoch"] + 1, ck["history"]
        rng.bit_generator.state = ck["rng"]["numpy"]
        torch.set_rng_state(ck["rng"]["torch"])
        console.print(f"resumed from {ckpt_path} after epoch {ck['epoch'] + 1}")
    console.print(f"{args.config}: {count_parameters(model):,} parameters; {len(train)} training, "
                  f"{len(val)} validation pairs; device {args.device}")
    if start == 0:
        history.append({"epoch": 0, "train_loss": evaluate(model, train, args.seed + 7, args, aug)["loss"],
                        **{f"val_{k}": v for k, v in evaluate(model, val, args.seed + 11, args, aug).items()},
                        "lr": args.lr, "time_s": 0.0})
    cols = [TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(), TimeRemainingColumn()]
    t_start = time.perf_counter() - (history[-1]["time_s"] if history else 0.0)
    with Progress(*cols, console=console) as progress:
        for epoch in range(start, args.epochs):
            task = progress.add_task("train", total=len(train), epoch=f"{epoch + 1}/{args.epochs}", loss=float("nan"))
            lr = opt.param_groups[0]["lr"]
            tr = train_epoch(model, opt, train, rng, args, aug, progress, task)
            sched.step()
            ev = evaluate(model, val, args.seed + 11, args, aug)
            history.append({"epoch": epoch + 1, "train_loss": tr, **{f"val_{k}": v for k, v in ev.items()},
                            "lr": lr, "time_s": time.perf_counter() - t_start})
            progress.console.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in history[-1].items()))
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "epoch": epoch, "history": history, "rng": _rng_state(rng), "args": vars(args)},
                       ckpt_path)
            (args.out / "history.json").write_text(json.dumps(history, indent=1, default=str))
            plot_history(history, args.out / "loss.png")
    _finish(model, history, info, args, console)
    return 0


def _finish(model, history, info, args, console) -> None:
    meta = {"data": info, "epochs": args.epochs, "real_batch": args.real_batch, "lr": args.lr,
            "decay": args.decay, "loss": args.loss, "loss_pool": args.loss_pool, "seed": args.seed, "augment": dataclasses.asdict(augment_config(args)),
            "final": history[-1], "git_commit": _git_commit(), "torch": str(torch.__version__),
            "command": "python -m bench " + " ".join(sys.argv[1:])}
    path = save_weights(model, args.out / "weights.pt", meta)
    plot_history(history, args.out / "loss.png")
    if args.weights_out:
        args.weights_out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.weights_out)
        card = args.weights_out.parent / "MODEL_CARD.md"
        card.write_text(model_card(model, meta, args.weights_out.name))
        shutil.copyfile(args.out / "loss.png", args.weights_out.with_suffix(".loss.png"))
    console.print(f"weights: {path}" + (f" (copied to {args.weights_out})" if args.weights_out else ""))
