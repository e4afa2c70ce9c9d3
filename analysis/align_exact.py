"""Weight matching of timm models against random permutations of themselves: does it find the exact
undo? One markdown row per model (docs/alignment.md, "Exact recovery on full-size networks").

A = timm.create_model(name, num_classes=3) at seed 0 (timm's initialisation), B = A with a random
permutation of every group of its spec (seed 0). Columns: the similarity S at the identity, of the
identity start alone (Ainsworth et al.'s Algorithm 1) and of the kept start, the exact value
sum_p ||W_A^p||^2, the distance ||A - P(B)|| left, and the CPU / wall seconds of weight_matching.
With --independent, B is the same architecture at seed 1 (no exact undo) and every start is listed.

    python analysis/align_exact.py convnext_atto poolformer_s12 resnet18 vit_tiny_patch16_224
    python analysis/align_exact.py --independent --restarts 2 convnext_atto resnet18
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import common  # noqa: E402  (the sibling module, found because a script's own folder is searched first)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align_exact.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="timm model names")
    p.add_argument("--independent", action="store_true", help="B: the same architecture at seed 1 instead of a permutation of A")
    p.add_argument("--restarts", type=int, default=0, help="random starts besides the sorted and identity ones (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="input size in pixels (ViT / Mixer built with img_size; default: %(default)s)")
    return p


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    import timm
    import torch

    from subspaces.align import apply_permutation, parameter_distance, permutation_spec, random_permutation, weight_matching

    rows = []
    for name in args.models:
        kwargs = {"img_size": args.size} if name.startswith(("vit", "deit", "mixer")) else {}
        torch.manual_seed(0)
        a = timm.create_model(name, num_classes=3, **kwargs).eval()
        x = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        spec = permutation_spec(a, x)
        if args.independent:
            torch.manual_seed(1)
            b = timm.create_model(name, num_classes=3, **kwargs).eval()
        else:
            b = apply_permutation(a, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
        cpu, wall = time.process_time(), time.perf_counter()
        perms, info = weight_matching(a, b, spec, restarts=args.restarts)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if not args.independent:    # the alternatives, for the record: every start run, the bound notwithstanding
            info["starts"] = weight_matching(a, b, spec, restarts=args.restarts, stop_at_bound=False)[1]["starts"]
        exact = sum(float(p.detach().double().pow(2).sum()) for n, p in a.named_parameters() if n in spec.axes)
        rows.append({"model": name, "params_m": sum(p.numel() for p in a.parameters()) / 1e6, "groups": len(spec),
                     "channels": sum(spec.sizes), **info, "exact": exact, "distance_before": parameter_distance(a, b),
                     "distance_after": parameter_distance(a, apply_permutation(b, spec, perms)), "cpu_s": cpu, "wall_s": wall})
        r = rows[-1]
        starts = " | ".join(f"{s['start']} {s['similarity']:.2f} ({s['iterations']})" for s in r["starts"])
        common.console.print(f"| {name} | {r['params_m']:.1f} M | {r['groups']} / {r['channels']} | {r['similarity_before']:.1f} | "
                             f"{starts} | "
                             f"{r['similarity_after']:.1f} ({r['start']}) | {r['similarity_bound']:.1f} | {exact:.1f} | "
                             f"{r['distance_before']:.2f} -> {r['distance_after']:.3g} | {cpu:.1f} / {wall:.1f} |", soft_wrap=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = common.parse(build_parser(), argv)
    return common.run(lambda: measure(args))


if __name__ == "__main__":
    raise SystemExit(main())
