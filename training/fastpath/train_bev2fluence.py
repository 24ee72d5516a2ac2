"""Train the Bev2Fluence network on data from :mod:`training.fastpath.gen_data`.

    python -m training.fastpath.train_bev2fluence --data DIR \\
        --out optimizer/fastpath/weights/bev2fluence.pt [--max-minutes M] [--resume]

``DIR`` holds ``train/*.npz`` and, if generated, ``validation/*.npz`` (made from the
OpenKBP validation split; used as the validation set). Without ``validation/`` a seeded
``--val-fraction`` of the training patients is held out (``DIR/*.npz`` also works).

One optimisation step = one patient, ``--cps-per-step`` of its control points drawn at
random (seeded). Loss: masked L1 between the predicted and the target *relative* fluence
(the optimiser's MU divided by their mean over the patient's beamlets). Validation after
every epoch on all control points; the best weights are written to ``--out`` (float32
state dict + config JSON, atomically). A checkpoint (model, optimiser, scheduler, RNG,
position in the epoch) goes to ``--run-dir`` every ``--checkpoint-minutes`` and when
stopping, so ``--resume`` continues where it stopped. At the end a model card is written
(``--card``; default ``optimizer/fastpath/MODEL_CARD.md`` for the shipped weights path,
else ``MODEL_CARD.md`` next to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from atp.optimizer.fastpath.bev2fluence import (
    FEATURE_CHANNELS,
    WEIGHTS_DIR,
    Bev2FluenceNet,
    masked_l1,
    save_weights,
)

BP = FEATURE_CHANNELS.index("backprojection")


# --- data -------------------------------------------------------------------------------
def _kind(name: str):
    from atp.optimizer.fastpath.bev2fluence import BEV2FLUENCE
    from atp.optimizer.fastpath.correction_net import CORRECTION

    kinds = {k.name: k for k in (BEV2FLUENCE, CORRECTION)}
    if name not in kinds:
        raise SystemExit(f"unknown network kind {name!r}; known: {sorted(kinds)}")
    return kinds[name]


def load_record(path: Path, kind=None) -> dict:
    """One patient: x (n_cp, C, n_v, n_u), y relative fluence, m mask (torch float32).

    Bev2Fluence targets are divided by their mean over the beamlets; correction targets
    are stored in units of the input fluence's mean already."""
    kind = kind or _kind("bev2fluence")
    with np.load(path) as z:
        made = str(z["kind"]) if "kind" in z.files else "bev2fluence"
        if made != kind.name:
            raise ValueError(f"{path}: {made} data, not {kind.name}")
        if int(z["feature_version"]) != kind.feature_version or \
                tuple(str(c) for c in z["channels"]) != kind.channels:
            raise ValueError(f"{path}: made by another feature version; regenerate it")
        mask = z["mask"]
        target = z["target_mu"].astype(np.float32)
        scale = 1.0 if kind.name == "correction" else (
            float(target[mask].mean()) if mask.any() else 0.0)
        meta = json.loads(str(z["meta_json"]))
        return {"id": meta.get("patient_id", path.stem),
                "x": torch.from_numpy(z["inputs"].astype(np.float32)),
                "y": torch.from_numpy(target / scale if scale > 0 else target),
                "m": torch.from_numpy(mask.astype(np.float32)), "meta": meta}


def split_files(data: Path, val_fraction: float, seed: int):
    """(train files, validation files, description of the validation set)."""
    train_dir = data / "train" if (data / "train").is_dir() else data
    train = sorted(train_dir.glob("*.npz"))
    val = sorted((data / "validation").glob("*.npz"))
    if val:
        return train, val, "OpenKBP validation split (generated)"
    if len(train) < 2:
        raise SystemExit(f"need at least 2 patients in {train_dir}")
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, round(val_fraction * len(train)))
    held = set(order[:n_val].tolist())
    return ([f for i, f in enumerate(train) if i not in held],
            [f for i, f in enumerate(train) if i in held],
            f"{n_val} training patients held out (seed {seed})")


# --- steps and metrics ------------------------------------------------------------------
def train_step(model, optimizer, x, y, m) -> float:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = masked_l1(model(x), y, m)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model, records, chunk: int = 64) -> float:
    """Mean over patients of the masked L1 (relative fluence) on all control points."""
    model.eval()
    losses = []
    for r in records:
        num = den = 0.0
        for s in range(0, r["x"].shape[0], chunk):
            x, y, m = (r[k][s:s + chunk] for k in ("x", "y", "m"))
            num += float(((model(x) - y).abs() * m).sum())
            den += float(m.sum())
        losses.append(num / max(den, 1.0))
    return float(np.mean(losses)) if losses else float("nan")


def backprojection_baseline(records, channel: int = BP) -> float:
    """The same L1 for one input channel taken as the output (no network): the
    back-projection (Bev2Fluence) or the uncorrected fluence (correction)."""
    return float(np.mean([float(masked_l1(r["x"][:, channel], r["y"], r["m"]))
                          for r in records])) if records else float("nan")


# --- checkpoints and the model card -----------------------------------------------------
def _atomic_save(obj, path: Path) -> None:
    from atp.outputs import atomic_write_file

    atomic_write_file(path, lambda fh: torch.save(obj, fh))


def _counts(values) -> str:
    """'a (n), b (m)': how many records name each value."""
    from collections import Counter

    return ", ".join(f"{k} ({n})" for k, n in sorted(Counter(map(str, values)).items()))


def default_card_path(out: Path, kind: str = "bev2fluence") -> Path:
    name = "MODEL_CARD.md" if kind == "bev2fluence" else f"MODEL_CARD_{kind}.md"
    if out.resolve().parent == WEIGHTS_DIR:
        return WEIGHTS_DIR.parent / name
    return out.parent / name


_CARD_HEAD = {
    "bev2fluence": """# Bev2Fluence initial-fluence network (model card)

Maps, per arc control point, BEV projections of the predicted dose (plus the prescription
map, OARs, the dij back-projection of the prediction, the beamlet mask and the gantry
angle) to a relative fluence map; the fast path scales it to MU by an exact least-squares
fit of the dose to the prediction (`optimizer/fastpath/bev2fluence.py`).""",
    "correction": """# Fluence-correction network (model card)

Maps, per arc control point, the fluence to correct and the error map back-projected onto
the beamlets (plus the exact first step, the beamlet mask and the gantry angle) to the
corrected fluence, in units of the input fluence's mean
(`optimizer/fastpath/correction_net.py`): AIRT's correction module, trained to take the
exact fallback's K unrolled steps at once.""",
}
_CARD_TARGET = {
    "bev2fluence": "fluence (MU) of the full optimiser pipeline (cpu backend, no sequencing)",
    "correction": "the exact fallback's corrected fluence (K unrolled steps) from the same "
                  "start and slider setting",
}


def write_model_card(path: Path, s: dict) -> None:
    h = s["history"]
    best = min(h, key=lambda e: e["val_l1"]) if h else {}
    meta = s["data_meta"]
    kind = s.get("kind", "bev2fluence")
    text = f"""{_CARD_HEAD[kind]}

## Data

- source: `{s['data']}`, made by `python -m training.fastpath.\
{'gen_data' if kind == 'bev2fluence' else 'gen_correction_data'}`
- targets: {_CARD_TARGET[kind]}
- {f"optimiser max_iter: {meta.get('max_iter')}; " if kind == 'bev2fluence' else ''}\
goals resolved with the predicted dose of
  the predictor (patients): {meta.get('predictor')}; input channels computed from the
  predictor: {meta.get('feature_predictor')}
- arc: one full arc at {meta.get('arc_spacing_deg')} deg ({meta.get('control_points')} \
control points); dose grid factor: {meta.get('dose_grid_factor')}
- training: {s['n_train']} OpenKBP training patients ({s['n_train_cps']} control-point maps)
- validation: {s['n_val']} patients, {s['val_source']}
- input channels: {', '.join(s['channels'])} (feature version {s['feature_version']})

## Model and training

- network: 2-D U-Net {json.dumps(s['model'])}, {s['n_params']} parameters, Softplus output
- loss: masked L1 on relative fluence
- Adam lr {s['lr']}, cosine schedule over {s['epochs']} epochs, {s['cps_per_step']} \
control points per step, seed {s['seed']}
- epochs run: {len(h)}; stopped: {s['stop_reason']}
- training time: {s['train_seconds'] / 60:.1f} min
- hardware: {s['hardware']}

## Validation (masked L1 on relative fluence; lower is better)

- best: {best.get('val_l1', float('nan')):.4f} (epoch {best.get('epoch')})
- reference, no network (the `{s['no_network_channel']}` channel taken as the output): \
{s['val_baseline']:.4f}

## Limits

- trained on optimiser fluence of one planning setup (H&N goal list, pencil-beam dij, one
  arc); other setups may need regenerated data;
- per control point only (no coupling between control points); the fast path's
  correction steps follow it;
- fluence-map loss only (no dose loss); check the dose-mimicking error against the exact
  fallback with `python -m training.fastpath.eval_bev2fluence --weights W.pt --data
  ../shared/data/openkbp`.
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- the loop ---------------------------------------------------------------------------
def train(args) -> dict:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    data = Path(args.data)
    train_files, val_files, val_source = split_files(data, args.val_fraction, args.seed)
    if not train_files:
        raise SystemExit(f"no training data under {data}")
    kind = _kind(args.kind)
    train_set = [load_record(f, kind) for f in train_files]
    val_set = [load_record(f, kind) for f in val_files]
    model = Bev2FluenceNet(in_channels=len(kind.channels), base=args.base, depth=args.depth,
                           residual_channel=kind.channels.index(kind.no_network_channel)
                           if kind.name == "correction" else None)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    gen = torch.Generator().manual_seed(args.seed)
    run_dir = Path(args.run_dir)
    ckpt = run_dir / "last.pt"
    state = {"epoch": 0, "pos": 0, "history": [], "best": float("inf"),
             "train_seconds": 0.0, "best_state": None}
    if args.resume and ckpt.is_file():
        blob = torch.load(ckpt, weights_only=True)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["opt"])
        sched.load_state_dict(blob["sched"])
        gen.set_state(blob["gen"])
        state = blob["state"]
        print(f"resumed at epoch {state['epoch']} step {state['pos']}", flush=True)
    out = Path(args.out)
    t_start = time.perf_counter()
    t_ckpt = t_start
    base_seconds = state["train_seconds"]
    baseline = backprojection_baseline(val_set, kind.channels.index(kind.no_network_channel))
    stop_reason = "epochs done"

    def elapsed():
        return time.perf_counter() - t_start

    def checkpoint():
        state["train_seconds"] = base_seconds + elapsed()
        _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(),
                      "sched": sched.state_dict(), "gen": gen.get_state(),
                      "state": state, "args": vars(args)}, ckpt)

    while state["epoch"] < args.epochs:
        ep = state["epoch"]
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(
            args.seed * 100003 + ep)).tolist()
        losses = []
        while state["pos"] < len(order):
            r = train_set[order[state["pos"]]]
            n = r["x"].shape[0]
            sel = torch.randperm(n, generator=gen)[:args.cps_per_step]
            losses.append(train_step(model, opt, r["x"][sel], r["y"][sel], r["m"][sel]))
            state["pos"] += 1
            if time.perf_counter() - t_ckpt > 60 * args.checkpoint_minutes:
                checkpoint()
                t_ckpt = time.perf_counter()
            if args.max_minutes and elapsed() > 60 * args.max_minutes:
                stop_reason = f"--max-minutes {args.max_minutes}"
                break
        if state["pos"] < len(order):
            break
        sched.step()
        val = evaluate(model, val_set)
        state["history"].append({"epoch": ep + 1, "train_l1": float(np.mean(losses)),
                                 "val_l1": val, "minutes": (base_seconds + elapsed()) / 60})
        improved = val < state["best"]
        if improved:
            state["best"] = val
            state["best_state"] = {k: v.clone() for k, v in model.state_dict().items()}
            save_weights(model, out, kind=kind, extra={"val_l1": val, "epoch": ep + 1,
                                            "data": str(data)})
        print(f"epoch {ep + 1}/{args.epochs}: train L1 {np.mean(losses):.4f}, val L1 "
              f"{val:.4f} (no network {baseline:.4f}){' *' if improved else ''} "
              f"[{(base_seconds + elapsed()) / 60:.1f} min]", flush=True)
        state["epoch"] += 1
        state["pos"] = 0
    checkpoint()
    meta = dict(train_set[0]["meta"])
    meta["predictor"] = _counts(r["meta"].get("predictor") for r in train_set + val_set)
    meta["feature_predictor"] = _counts(r["meta"].get("feature_predictor",
                                                      r["meta"].get("predictor"))
                                        for r in train_set + val_set)
    summary = {
        "data": str(data), "data_meta": meta, "n_train": len(train_set),
        "kind": kind.name, "channels": list(kind.channels),
        "feature_version": kind.feature_version,
        "no_network_channel": kind.no_network_channel,
        "n_train_cps": int(sum(r["x"].shape[0] for r in train_set)),
        "n_val": len(val_set), "val_source": val_source, "model": model.config,
        "n_params": sum(p.numel() for p in model.parameters()), "lr": args.lr,
        "epochs": args.epochs, "cps_per_step": args.cps_per_step, "seed": args.seed,
        "history": state["history"], "stop_reason": stop_reason,
        "train_seconds": state["train_seconds"], "val_baseline": baseline,
        "hardware": f"{platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} CPU cores, torch {torch.__version__} "
                    f"({args.threads} thread(s)), no GPU",
        "best_val_l1": state["best"], "out": str(out)}
    if state["history"]:
        write_model_card(Path(args.card) if args.card else default_card_path(out, kind.name), summary)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.fastpath.train_bev2fluence",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder made by gen_data (train/, "
                                                  "validation/)")
    ap.add_argument("--kind", default="bev2fluence", choices=("bev2fluence", "correction"),
                    help="which network: initial fluence (bev2fluence) or correction")
    ap.add_argument("--out", default=None,
                    help="weights (default optimizer/fastpath/weights/KIND.pt)")
    ap.add_argument("--run-dir", default="fastpath_data/bev2fluence_run",
                    help="checkpoints (default fastpath_data/bev2fluence_run)")
    ap.add_argument("--card", default=None, help="model card path")
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--base", type=int, default=16, help="channels at full resolution")
    ap.add_argument("--depth", type=int, default=2, help="U-Net down-samplings")
    ap.add_argument("--cps-per-step", type=int, default=20)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--checkpoint-minutes", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(WEIGHTS_DIR / f"{args.kind}.pt")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        s = train(args)
    finally:  # leave the process as it was (tests call main())
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    print(json.dumps({"best_val_l1": s["best_val_l1"], "val_backprojection_l1":
                      s["val_baseline"], "epochs": len(s["history"]),
                      "minutes": round(s["train_seconds"] / 60, 2), "out": s["out"]}),
          file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
