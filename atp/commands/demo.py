"""``atp demo [--out DIR]``: the main job on the embedded default case.

Runs every pipeline stage that exists on the phantom and writes the results to DIR.
"""

from __future__ import annotations

from pathlib import Path

from atp.outputs import atomic_output_dir, write_json


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default case")
    p.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    p.set_defaults(func=run)


def run(args) -> int:
    from atp.phantom import head_neck_phantom

    patient = head_neck_phantom()
    out = Path(args.out)
    with atomic_output_dir(out) as tmp:
        write_json(tmp / "patient.json", patient.summary())
    print(f"demo results written to {out.resolve()}")
    return 0
