"""Benchmark: candidate GPU speed-ups of one tile's evaluation on the real-size network, each measured on its own.

What the predictor does per tile today (``TaskPredictor._evaluate``): for each fold, the network
once per combination of flips (8 with mirroring on all axes), batch 1, half precision by autocast
on CUDA. Candidates, each against that baseline on the same tile and weights:

  batched-flips    the 8 flipped copies as one batch of 8 (fewer, larger kernel launches)
  channels-last    the network and the tile in channels_last_3d memory format
  compile          ``torch.compile`` of the network (default mode; compile time reported apart)

For each: median seconds per tile (all flips, one fold) over ``--repeats`` after a warm-up, the
speed-up, the largest logit difference and the fraction of voxels whose arg-max differs (label
neutrality: fold averaging in half precision already differs from stock at near-ties). Nothing
here changes the product; a candidate goes into the predictor only with its figures from this.

    python Testing/benchmarks/bench_network_variants.py --bundle FOLDER [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import time
from pathlib import Path


def network_and_tile(bundle_dir: Path, task: str, device, patch=None):
    """Fold 0's network of the bundle (its weights) and one random tile of the configuration's patch."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from SegRapSegmenterLib.inference.bundles import load_bundle, load_checkpoint

    bundle = load_bundle(bundle_dir)
    model = bundle.task(task)
    plans = json.loads((bundle.result_path(task) / "plans.json").read_text())
    configuration = PlansManager(plans).get_configuration(model.configuration)
    network = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                     configuration.network_arch_init_kwargs_req_import, 1, len(model.labels),
                                     allow_init=False, deep_supervision=False)
    network.load_state_dict(load_checkpoint(bundle.checkpoint_path(task, model.folds[0]))["network_weights"])
    torch.manual_seed(0)
    tile = torch.randn(1, 1, *(patch or configuration.patch_size))
    return network.to(device).eval(), tile.to(device)


def _flips():
    return [c for n in range(4) for c in itertools.combinations((0, 1, 2), n)]


def sequential(network, x):
    """The predictor's way: one call per flip combination, batch 1."""
    total = None
    for combo in _flips():
        dims = [a + 2 for a in combo]
        out = network(x.flip(dims) if dims else x)
        out = out.flip(dims) if dims else out
        total = out if total is None else total + out
    return total / len(_flips())


def batched(network, x):
    """All flip combinations as one batch."""
    import torch

    combos = _flips()
    batch = torch.cat([x.flip([a + 2 for a in c]) if c else x for c in combos])
    out = network(batch)
    parts = [out[i:i + 1].flip([a + 2 for a in c]) if c else out[i:i + 1] for i, c in enumerate(combos)]
    return torch.stack(parts).sum(0) / len(combos)


def timed(fn, network, x, device, repeats: int) -> tuple[float, object]:
    import torch

    autocast = torch.autocast("cuda", enabled=True) if device.type == "cuda" else contextlib.nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        out = fn(network, x)  # warm-up (cuDNN autotuning, compilation)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(network, x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out.float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle folder from real_size_bundle.py")
    parser.add_argument("--task", default="oar")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--patch", type=int, nargs=3, help="another tile size (CPU self-checks)")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)

    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the predictor and nnU-Net set it
    network, tile = network_and_tile(args.bundle, args.task, device, args.patch)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"network of {args.bundle} ({args.task}), tile {list(tile.shape[2:])}, device {name}, "
          f"{len(_flips())} flips per tile, torch {torch.__version__}")
    base_s, base = timed(sequential, network, tile, device, args.repeats)
    rows = [("baseline (sequential flips)", base_s, base, None)]
    rows.append(("batched-flips", *timed(batched, network, tile, device, args.repeats), None))
    channels_last = network.to(memory_format=torch.channels_last_3d)
    rows.append(("channels-last", *timed(sequential, channels_last, tile.to(memory_format=torch.channels_last_3d),
                                         device, args.repeats), None))
    network = network.to(memory_format=torch.contiguous_format)
    if not args.no_compile:
        t0 = time.perf_counter()
        compiled = torch.compile(network)
        seconds, out = timed(sequential, compiled, tile, device, args.repeats)
        rows.append(("compile", seconds, out, time.perf_counter() - t0 - seconds * args.repeats))
    print(f"{'variant':<30}{'s/tile':>9}{'speed-up':>10}{'max |dlogit|':>14}{'argmax differs':>16}")
    for label, seconds, out, extra in rows:
        diff = float((out - base).abs().max())
        differs = float((out.argmax(1) != base.argmax(1)).float().mean())
        note = f"   (warm-up incl. compilation {extra:.0f} s)" if extra else ""
        print(f"{label:<30}{seconds:>9.3f}{base_s / seconds:>10.2f}{diff:>14.4g}{differs:>16.2e}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
