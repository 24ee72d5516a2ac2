"""``atp train --model cadunet|resunet --data DIR --out DIR``: train a dose network.

Reads the OpenKBP ``train`` split for learning and the ``validation`` split for early
stopping (never the test split), writes ``last.pt`` (resumable), ``best.pt`` (usable
with ``atp predict --model PATH``), ``history.json`` and ``train.log`` into OUT.

Named recipes (``--config okbp_stage1``, no --model needed) hold out ``selection``
training patients instead and pick ``best.pt`` on their OpenKBP scores; the validation
split is not read. Their run folder records ``run.json`` (config, data list with
SHA-1s, held-out patients) and ``chunks.jsonl`` (code version of every invocation).
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

from atp.commands import argtypes
from atp.errors import BackendUnavailableError, InputError
from atp.outputs import atomic_write_bytes, check_output_dir, mark_output_dir, write_json

# CLI start-up: the CLI imports every command to build its parser, so the predictor's
# training code (and through it torch) loads inside the functions that train (marked
# "lazy: CLI start-up"); torch itself is optional (atp[ml])


def register(sub) -> None:
    p = sub.add_parser("train", help="train a dose-prediction network on OpenKBP data")
    p.add_argument("--model", choices=["cadunet", "resunet"],
                   help="network (implied by a named --config such as okbp_stage1)")
    p.add_argument("--data", required=True, help="OpenKBP folder with train/ and validation/")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    p.add_argument("--config", default="small",
                   choices=["small", "full", "okbp_stage1", "okbp_stage2", "okbp_stage2s",
                            "okbp_stage1g", "okbp_stage2g", "okbp_stage2w",
                            "okbp_stage2sw", "okbp_stage2sn", "okbp_stage2sp",
                            "okbp_stage1gw"],
                   help="small: 64^3 input for CPU; full: 128^3 for a GPU; okbp_stage1 / "
                        "okbp_stage2 (okbp_stage2s: on sub-crops, bf16, for a CPU; "
                        "okbp_stage1g / okbp_stage2g: longer, for a GPU; "
                        "okbp_stage2w: a deeper, wider Stage 2 for a GPU; "
                        "okbp_stage2sw: that network on sub-crops, for a CPU; "
                        "okbp_stage2sn: okbp_stage2s with 4-7 Gy input noise; "
                        "okbp_stage2sp: trained on Stage 1's own predictions; "
                        "okbp_stage1gw: a wider, more regularised Stage 1 for a GPU): the "
                        "issue-23 cascade recipes (see predictor/train.py)")
    p.add_argument("--stage1", help="okbp_stage2(s|g|w|sw): the Stage-1 best.pt, or a cascade.pt "
                                    "(its Stage 1); selection runs the cascade and "
                                    "OUT/cascade.pt combines both")
    p.add_argument("--selection", type=int,
                   help="training patients held out for selection (recipe default)")
    p.add_argument("--epochs", type=argtypes.int_range(1, 100_000), help="maximum epochs (default 20)")
    p.add_argument("--steps-per-epoch", type=argtypes.int_range(1, 10_000_000), help="default: one pass over the patients")
    p.add_argument("--patience", type=argtypes.int_range(1, 100_000), help="early-stopping patience in epochs")
    p.add_argument("--lr", type=argtypes.float_range(0.0, 1.0, low_open=True), help="initial learning rate")
    p.add_argument("--seed", type=argtypes.int_range(0, 2**32 - 1), help="random seed (default 2020)")
    p.add_argument("--limit", type=argtypes.int_range(1, 1_000_000), help="use only the first N training patients")
    p.add_argument("--val-limit", type=argtypes.int_range(1, 1_000_000), help="use only the first N validation patients")
    p.add_argument("--max-minutes", type=argtypes.float_range(0.0, 1e6, low_open=True), help="stop cleanly after this training time")
    p.add_argument("--checkpoint-minutes", type=argtypes.float_range(0.0, 1e5, low_open=True), default=3.0,
                   help="minutes between checkpoints (default 3)")
    p.add_argument("--threads", type=argtypes.int_range(1, 1024), help="torch CPU threads")
    p.add_argument("--cache", help="folder for the encoded-data cache (default OUT/cache)")
    p.add_argument("--encode-workers", type=argtypes.int_range(1, 1024), default=1,
                   help="processes that encode the patients (default 1; same arrays)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:  # lazy: CLI start-up
    from atp.predictor.train import PRESETS, RECIPE_MODELS

    if args.model is None and args.config not in RECIPE_MODELS:  # before writing anything
        raise InputError(f"--model is needed with --config {args.config}", field="--model")
    recipe = PRESETS.get((RECIPE_MODELS.get(args.config), args.config), {})
    refines = getattr(recipe.get("encoding"), "dose_input", False)  # a Stage-2 recipe
    if refines and not (args.stage1 and Path(args.stage1).is_file()):
        raise InputError(f"{args.config} needs --stage1 with a Stage-1 best.pt",
                         file=args.stage1, field="--stage1")

    out = check_output_dir(args.out, replace=False)  # new, empty or an atp run folder
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("training needs PyTorch: pip install 'atp[ml]'") from None
    stage1 = None
    if refines:  # a usable Stage 1, loaded once, before anything is written
        from atp.predictor.cascade import CascadePredictor
        from atp.predictor.cnn import CNNPredictor

        stage1 = CNNPredictor.from_checkpoint(args.stage1)
        stage1 = stage1.stage1 if isinstance(stage1, CascadePredictor) else stage1
        if stage1.encoding.dose_input:
            raise InputError("this is a Stage-2 network (it takes a dose input); give a "
                             "Stage-1 best.pt or a cascade.pt", file=args.stage1,
                             field="--stage1")
    out.mkdir(parents=True, exist_ok=True)
    mark_output_dir(out, kind="train")
    with open(out / "train.log", "a") as logf:
        return _run(args, out, logf, stage1)


def _run(args, out: Path, logf, stage1=None) -> int:  # lazy: CLI start-up
    from atp.predictor.train import cached_split, make_config, train

    def log(msg: str) -> None:
        logf.write(msg + "\n")
        logf.flush()
        if not args.quiet:
            print(msg, flush=True)

    cfg = make_config(args.model, args.config, epochs=args.epochs,
                      steps_per_epoch=args.steps_per_epoch, patience=args.patience,
                      lr=args.lr, seed=args.seed, threads=args.threads,
                      selection=args.selection,
                      checkpoint_every_s=args.checkpoint_minutes * 60.0,
                      time_limit_s=args.max_minutes * 60.0 if args.max_minutes else None)
    log(json.dumps({"config": cfg.to_dict(), "data": str(args.data), "limit": args.limit}))
    cache = Path(args.cache) if args.cache else out / "cache"
    if cfg.selection:
        return _run_selection(args, cfg, out, cache, log, stage1)
    tr = cached_split(args.data, "train", cfg.encoding, cache, args.limit, log)
    va = cached_split(args.data, "validation", cfg.encoding, cache, args.val_limit, log)
    res = train(cfg, tr, va, out, resume=args.resume, progress=not args.quiet, log=log,
                meta={"data": "OpenKBP train split", "n_train": len(tr[2]),
                      "n_validation": len(va[2])})
    log(f"stopped ({res['stopped']}) after {res['epochs_completed']} epochs, best epoch "
        f"{res['best_epoch']} val loss {res['best_val_loss']:.5f}; best weights {res['best']}")
    return 0


def _git_version() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "predictor", "atp/commands/train.py"], check=True,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": head, "dirty": dirty.splitlines() if dirty else []}


def _run_selection(args, cfg, out: Path, cache: Path, log,  # lazy: CLI start-up
                   stage1=None) -> int:
    """A recipe run: train on the train split minus ``cfg.selection`` held-out patients,
    which pick best.pt by their OpenKBP scores (validation/ is not read). stage1: the
    Stage-1 predictor a Stage-2 recipe's selection cascades with (loaded by :func:`run`)."""
    from atp.predictor.data import split_files
    from atp.predictor.train import (
        data_list,
        encode_files,
        score_predictor,
        selection_split,
        train,
    )

    files = split_files(args.data, "train")
    files = files[:args.limit] if args.limit else files
    fit_files, sel_files = selection_split(files, cfg.selection, cfg.seed)
    record = {"config": cfg.to_dict(), "data": str(Path(args.data).resolve()),
              "train_files": data_list(fit_files), "selection_files": data_list(sel_files)}
    if args.stage1:
        record["stage1"] = {"path": str(Path(args.stage1).resolve()),
                            **data_list([args.stage1])[0]}
    run_json = out / "run.json"
    if run_json.is_file():
        old = json.loads(run_json.read_text())
        if [f["sha1"] for f in old["train_files"] + old["selection_files"]] != [
                f["sha1"] for f in record["train_files"] + record["selection_files"]]:
            raise InputError("the data differ from the ones this run was started with",
                             file=run_json, field="train_files")
    else:
        write_json(run_json, {**record, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime())})
    chunk = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "resume": bool(args.resume), "max_minutes": args.max_minutes,
             "threads": cfg.threads, **_git_version()}
    chunks = out / "chunks.jsonl"
    prev = chunks.read_bytes() if chunks.is_file() else b""
    atomic_write_bytes(chunks, prev + (json.dumps(chunk) + "\n").encode())
    src = {}
    if cfg.encoding.dose_input and cfg.dose_input_source == "stage1":
        src = {"stage1": stage1, "stage1_key": record["stage1"]["sha1"]}
    tr = encode_files(fit_files, cfg.encoding, cache, log, cfg.coarse_encoding,
                      args.encode_workers, **src)
    va = encode_files(sel_files, cfg.encoding, cache, log, cfg.coarse_encoding,
                      args.encode_workers, **src)
    if cfg.encoding.dose_input:  # Stage 2: selection scores the cascade with ``stage1``
        from atp.predictor.cascade import CascadePredictor
        from atp.predictor.cnn import CNNPredictor

        def selector(predictor):
            return score_predictor(CascadePredictor(stage1, predictor), sel_files)
    else:
        def selector(predictor):
            return score_predictor(predictor, sel_files)
    res = train(cfg, tr, va, out, resume=args.resume, progress=not args.quiet, log=log,
                meta={"data": "OpenKBP train split minus the held-out selection patients",
                      "n_train": len(tr[2]), "selection_patients": va[2]},
                selector=selector)
    if stage1 is not None and res["best"]:
        import torch  # lazy: optional dependency (atp[ml])

        best = CNNPredictor.from_checkpoint(res["best"])
        buf = io.BytesIO()
        torch.save(CascadePredictor(stage1, best).checkpoint(), buf)
        atomic_write_bytes(out / "cascade.pt", buf.getvalue())
        log(f"cascade (Stage 1 {args.stage1} + Stage 2 best) -> {out / 'cascade.pt'}")
    log(f"stopped ({res['stopped']}) after {res['epochs_completed']} epochs "
        f"(step {res['global_step']}), best epoch {res['best_epoch']} "
        f"{res['best_metric']} {res['best_val_loss']:.4f}; best weights {res['best']}")
    return 0
