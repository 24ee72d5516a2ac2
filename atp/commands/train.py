"""``atp train --model cadunet|resunet --data DIR --out DIR``: train a dose network.

Reads the OpenKBP ``train`` split for learning and the ``validation`` split for early
stopping (never the test split), writes ``last.pt`` (resumable), ``best.pt`` (usable
with ``atp predict --model PATH``), ``history.json`` and ``train.log`` into OUT.
"""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("train", help="train a dose-prediction network on OpenKBP data")
    p.add_argument("--model", required=True, choices=["cadunet", "resunet"])
    p.add_argument("--data", required=True, help="OpenKBP folder with train/ and validation/")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    p.add_argument("--config", default="small", choices=["small", "full"],
                   help="small: 64^3 input for CPU; full: 128^3 for a GPU")
    p.add_argument("--epochs", type=int, help="maximum epochs (default 20)")
    p.add_argument("--steps-per-epoch", type=int, help="default: one pass over the patients")
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    p.add_argument("--lr", type=float, help="initial learning rate")
    p.add_argument("--seed", type=int, help="random seed (default 2020)")
    p.add_argument("--limit", type=int, help="use only the first N training patients")
    p.add_argument("--val-limit", type=int, help="use only the first N validation patients")
    p.add_argument("--max-minutes", type=float, help="stop cleanly after this training time")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0,
                   help="minutes between checkpoints (default 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--cache", help="folder for the encoded-data cache (default OUT/cache)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from atp.errors import BackendUnavailableError
    from atp.outputs import check_output_dir, mark_output_dir

    out = check_output_dir(args.out, replace=False)  # new, empty or an atp run folder
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("training needs PyTorch: pip install 'atp[ml]'") from None
    out.mkdir(parents=True, exist_ok=True)
    mark_output_dir(out, kind="train")
    with open(out / "train.log", "a") as logf:
        return _run(args, out, logf)


def _run(args, out: Path, logf) -> int:
    from predictor.train import cached_split, make_config, train

    def log(msg: str) -> None:
        logf.write(msg + "\n")
        logf.flush()
        if not args.quiet:
            print(msg, flush=True)

    cfg = make_config(args.model, args.config, epochs=args.epochs,
                      steps_per_epoch=args.steps_per_epoch, patience=args.patience,
                      lr=args.lr, seed=args.seed, threads=args.threads,
                      checkpoint_every_s=args.checkpoint_minutes * 60.0,
                      time_limit_s=args.max_minutes * 60.0 if args.max_minutes else None)
    log(json.dumps({"config": cfg.to_dict(), "data": str(args.data), "limit": args.limit}))
    cache = Path(args.cache) if args.cache else out / "cache"
    tr = cached_split(args.data, "train", cfg.encoding, cache, args.limit, log)
    va = cached_split(args.data, "validation", cfg.encoding, cache, args.val_limit, log)
    res = train(cfg, tr, va, out, resume=args.resume, progress=not args.quiet, log=log,
                meta={"data": "OpenKBP train split", "n_train": len(tr[2]),
                      "n_validation": len(va[2])})
    log(f"stopped ({res['stopped']}) after {res['epochs_completed']} epochs, best epoch "
        f"{res['best_epoch']} val loss {res['best_val_loss']:.5f}; best weights {res['best']}")
    return 0
