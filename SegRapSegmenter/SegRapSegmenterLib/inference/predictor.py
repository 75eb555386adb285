"""One task of a bundle on one image with nnU-Net v2's network, preprocessing and tiling, returning labels.

Frugal path (default): the body's box is found first (``body``), tiles that miss it are skipped,
class scores are held only for the slices tiles are still adding to (``tiles``) and each finished
slice is reduced to labels on the input grid straight away (``scores``), so the scores of the
whole volume never exist, at the network's resolution or the input's. The labels equal stock
nnU-Net's inside the box (same preprocessing, tiles, weights and resampling) and are background
outside it. Plans whose score resampling is not nnU-Net's default fall back to nnU-Net's own
predictor for the whole volume, with a warning.

The network is built from the bundle's plans through the allow-list of ``architecture`` (never
nnU-Net's ``get_network_from_plans``, which imports whatever the plans name) instead of nnU-Net's
search for the trainer class by name, and checkpoints are loaded with ``weights_only=True`` (see
``bundles``). Nothing here touches the network: weights come from the
bundle only.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..arrays import uint8_image
from ..errors import InputError, ModelError
from ..formats.limits import check_spacing, max_voxels
from .body import BodyBox, body_box_of_image, reoriented_box
from .architecture import build_network, check_mirroring_axes, check_plans
from .bundles import Bundle, load_checkpoint
from .devices import DEVICES, describe_device, pick_device  # noqa: F401  (DEVICES: for callers)
from .preprocess import preprocess_in_blocks
from .certainty import ClassTally
from .scores import SliceLabeler, axis_map, axis_orders
from .tiles import Region, stream_scores, tile_slicers

log = logging.getLogger(__name__)

Progress = Callable[[float], None]  # fraction of the task's network evaluations done


@dataclass(frozen=True)
class InferenceOptions:
    """How to run a task: device, folds (None: all in the bundle), mirroring (None: bundle default)."""

    device: str = "auto"
    folds: tuple[str, ...] | None = None
    mirror: bool | None = None
    tile_step_size: float = 0.5
    threads: int | None = None
    low_memory: bool = False  # scores and the image stay in CPU memory; only tiles go to the GPU
    crop_to_body: bool = True
    # how test-time mirroring treats left and right; None: as the bundle's training_mirroring says
    # (docs/command-line.md's matrix). "plain": stock nnU-Net (every axis, no swap); "laterality-aware": every axis,
    # paired classes swapped after a left-right flip. For benchmarks and for bundles that record too little.
    mirror_policy: str | None = None
    mirror_axes: tuple[int, ...] | None = None  # with mirror_policy: flip only these network axes
    certainty: bool = True  # tally the class probabilities per structure (``certainty``) while scores are held


def mirrored_sum(network, x, axes: tuple[int, ...], lr_axis: int | None, permutation) -> "torch.Tensor":
    """Mean of the network's logits over every combination of flips along ``axes`` (spatial indices).

    A flip that includes the left-right axis ``lr_axis`` turns each left structure into a right one,
    so its logits' class channels are permuted (``permutation[c]`` = the class c becomes) before
    they are added; stock nnU-Net adds them unpermuted, which averages left with right.
    """
    import itertools

    import torch

    prediction = network(x)
    combos = [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
    if permutation is not None:
        index = torch.as_tensor(permutation, device=prediction.device)
    for combo in combos:
        dims = [a + 2 for a in combo]
        flipped = torch.flip(network(torch.flip(x, dims)), dims)
        if permutation is not None and lr_axis in combo:
            flipped = flipped.index_select(1, index)
        prediction += flipped
    if combos:  # in place, as stock nnU-Net divides: one tile of Task 1 scores is 95 MB on the CPU
        prediction /= len(combos) + 1
    return prediction


def _make_predictor_class():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class CountingPredictor(nnUNetPredictor):
        """nnUNetPredictor with laterality-aware test-time mirroring that reports tiles done."""

        progress: Progress | None = None
        mirror_axes: tuple[int, ...] = ()
        lr_axis: int | None = None
        permutation = None
        _tiles_total = 0
        _tiles_done = 0

        def _internal_get_sliding_window_slicers(self, image_size):
            slicers = super()._internal_get_sliding_window_slicers(image_size)
            self._tiles_total = len(slicers) * max(1, len(self.list_of_parameters))
            return slicers

        def _internal_maybe_mirror_and_predict(self, x):
            import torch

            with torch.inference_mode():
                out = mirrored_sum(self.network, x, self.mirror_axes, self.lr_axis, self.permutation)
            self._tiles_done += 1
            if self.progress is not None and self._tiles_total:
                self.progress(min(1.0, self._tiles_done / self._tiles_total))
            return out

    return CountingPredictor


def left_right_axis(orientation: str, transpose_forward=(0, 1, 2)) -> int:
    """The network's spatial axis that runs left-right, for images stored in ``orientation`` (e.g. "LPS").

    Orientation letters name the index axes i, j, k (x, y, z); arrays are z, y, x; nnU-Net then
    transposes them by the plans' ``transpose_forward``.
    """
    letter = [c in "LR" for c in orientation.upper()].index(True)
    return list(transpose_forward).index(2 - letter)


def plan_mirroring(training: str, requested: bool, allowed: tuple[int, ...] | None, lr_axis: int | None,
                   has_pairs: bool) -> tuple[tuple[int, ...], bool]:
    """Test-time mirroring axes and whether left-right flips swap paired classes (docs/command-line.md's matrix).

    ``none`` (no mirroring in training): only the left-right flip, with the swap (the network learned
    laterality from position, so a mirrored patient is a plausible patient). ``laterality-aware``:
    every allowed axis, with the swap. ``plain`` (stock nnU-Net): every allowed axis, as stock does;
    such a model was taught that a mirrored left structure is still left.
    """
    if not requested:
        return (), False
    allowed = tuple(allowed or ())
    if training == "none":
        return ((lr_axis,), has_pairs) if lr_axis is not None else ((), False)
    if training == "laterality-aware":
        return allowed, has_pairs and lr_axis in allowed
    return allowed, False


def check_network_grid(shape, spacing, network_spacing, patch_size) -> None:
    """Refuse an image whose grid at the network's spacing (padded to one tile) exceeds the voxel limit.

    nnU-Net resamples the image to the plans' spacing before anything else, so a small image with
    coarse voxels (or a long thin one, padded to a whole tile) can need far more memory than its file.
    """
    check_spacing(spacing, f"The image ({list(shape)} voxels)", names=[f"axis {i}" for i in range(len(shape))])
    if len(network_spacing) != len(shape):
        return
    grid = [max(int(round(n * s / t)), int(p)) for n, s, t, p in zip(shape, spacing, network_spacing, patch_size)]
    count = int(np.prod(grid, dtype=np.int64))
    if count > max_voxels():
        raise InputError(f"At the model's spacing {list(network_spacing)} mm the image ({list(shape)} voxels of "
                         f"{[round(float(v), 3) for v in spacing]} mm) becomes {grid} = {count:,} voxels, over the "
                         f"limit of {max_voxels():,} (SEGRAP_MAX_VOXELS); crop or resample it first.")


class StageClock:
    """Seconds one task's run spends per stage, for the provenance: where the time goes.

    ``preprocess``: nnU-Net's crop, normalisation and resampling of the image; ``network``: the
    networks' forward passes (folds, mirrored copies), on CUDA from events recorded around each tile,
    so no tile waits for a measurement; ``labels``: score slices to labels on the input grid (arg-max,
    copy to the host, interpolation near boundaries); ``scores``: the rest of the sliding window
    (Gaussian weighting, accumulation, normalisation, moving the image and scores).
    """

    def __init__(self, device):
        self.seconds: dict[str, float] = {}
        self._cuda = device.type == "cuda"
        self._events: list = []

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def timed_network(self, evaluate: Callable) -> Callable:
        """``evaluate`` that adds its time to ``network``."""
        import torch

        def timed(tile):
            if self._cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = evaluate(tile)
                end.record()
                self._events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = evaluate(tile)
            self.add("network", time.perf_counter() - t0)
            return out

        return timed

    def report(self) -> dict[str, float]:
        """The stages in seconds (rounded); ``scores`` is the sliding window less network and labels."""
        if self._events:
            import torch

            torch.cuda.synchronize()
            self.add("network", sum(a.elapsed_time(b) for a, b in self._events) / 1000)
            self._events.clear()
        out = dict(self.seconds)
        window = out.pop("sliding_window", 0.0)
        out["scores"] = max(0.0, window - out.get("network", 0.0) - out.get("labels", 0.0))
        return {k: round(v, 3) for k, v in out.items()}


class TaskPredictor:
    """A ready-to-run nnU-Net predictor for one task of a bundle (network built, folds loaded)."""

    def __init__(self, bundle: Bundle, task: str, options: InferenceOptions = InferenceOptions()):
        import torch
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        model = bundle.task(task)
        folds = tuple(str(f) for f in (options.folds or model.folds))
        unknown = [f for f in folds if f not in model.folds]
        if unknown:
            raise ModelError(f"Fold(s) {', '.join(unknown)} are not in bundle {bundle.name} for {task} "
                             f"(it has {', '.join(model.folds)}).")
        if options.threads:
            torch.set_num_threads(int(options.threads))
        self.device = pick_device(options.device)
        result = bundle.result_path(task)
        import json

        plans = json.loads((result / "plans.json").read_text())
        dataset_json = json.loads((result / "dataset.json").read_text())
        check_plans(plans, model.configuration, str(result / "plans.json"))  # before nnU-Net resolves any name
        plans_manager = PlansManager(plans)
        try:
            configuration = plans_manager.get_configuration(model.configuration)
        except Exception as exc:
            raise ModelError(f"{result / 'plans.json'}: no configuration {model.configuration!r} ({exc}).") from exc
        # one checkpoint in memory at a time (a ResEnc L fold is 0.56 GB): fold 0 now, the others below
        first = load_checkpoint(bundle.checkpoint_path(task, folds[0]))
        num_inputs = determine_num_input_channels(plans_manager, configuration, dataset_json)
        num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        try:
            network = build_network(plans, model.configuration, num_inputs, num_outputs, str(result / "plans.json"),
                                    weights=first["network_weights"],
                                    weights_where=str(bundle.checkpoint_path(task, folds[0])))
            network.load_state_dict(first["network_weights"])
        except (RuntimeError, KeyError, ImportError, AttributeError) as exc:
            raise ModelError(f"{bundle.checkpoint_path(task, folds[0])}: the weights do not fit the network of "
                             f"{result / 'plans.json'} ({exc}).") from exc
        allowed_axes = first.get("inference_allowed_mirroring_axes")
        if allowed_axes is not None:  # 24 axes meant 2**24 passes per tile
            allowed_axes = check_mirroring_axes(allowed_axes, str(bundle.checkpoint_path(task, folds[0])))
        mirror = model.test_time_mirroring if options.mirror is None else options.mirror
        # the network sees the image in the bundle's orientation, transposed by nnU-Net's plans:
        # with an L/R-first orientation letter the left-right axis is array axis 2 (x)
        lr_axis = left_right_axis(model.orientation, plans_manager.transpose_forward) if model.orientation else None
        has_pairs = task == "oar"
        if options.mirror_policy not in (None, "plain", "laterality-aware"):
            raise InputError(f"Unknown mirroring policy {options.mirror_policy!r}; use 'plain' or 'laterality-aware'.")
        if options.mirror_policy:
            allowed_axes = tuple(options.mirror_axes if options.mirror_axes is not None else allowed_axes or (0, 1, 2))
        axes, swap = plan_mirroring(options.mirror_policy or model.training_mirroring, bool(mirror), allowed_axes,
                                    lr_axis, has_pairs)
        if mirror and not axes:
            log.warning("Test-time mirroring asked for, but %s's %s model records no orientation and was trained "
                        "without mirroring; mirroring stays off.", bundle.name, task)
        self.mirroring_axes = axes
        self.swaps_left_right = swap
        self.lr_axis = lr_axis
        if swap:
            from ..anatomy.structures import class_mirror_permutation

            self.permutation: list[int] | None = list(class_mirror_permutation())
        else:
            self.permutation = None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as nnU-Net's predictor sets it
        self.folds = folds
        self.task = task
        self.orientation = model.orientation
        self.options = options
        self.plans_manager, self.configuration, self.dataset_json = plans_manager, configuration, dataset_json
        self.label_manager = plans_manager.get_label_manager(dataset_json)
        # one network per fold, on the device (every tile goes through each fold in turn, so reloading
        # weights per tile is not an option); the checkpoints are not kept: nnU-Net's predictor, when a
        # plan needs it, takes its weights from these networks
        self._trainer_name = first.get("trainer_name", model.trainer)
        del first
        self._networks = [network.to(self.device).eval()]
        for f in folds[1:]:
            fold_network = copy.deepcopy(network)
            fold_network.load_state_dict(load_checkpoint(bundle.checkpoint_path(task, f))["network_weights"])
            self._networks.append(fold_network)
        self._allowed_axes = allowed_axes
        self._stock = None
        self.last_run: dict = {}
        self.class_table: np.ndarray | None = None  # ``certainty.ClassTally`` of the last run (frugal path only)

    def orientation_note(self, image: sitk.Image) -> str | None:
        """How the image is reoriented for the network, for the provenance (None when it is not)."""
        if not self.orientation:
            return None
        stored = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        return f"stored {stored}, fed to the network as {self.orientation} (axis permutation/flip, no interpolation)"

    def predict(self, image: sitk.Image, progress: Progress | None = None, box: BodyBox | None = None,
                warn: Callable[[str], None] | None = None) -> np.ndarray:
        """Label map (uint8, z, y, x) of ``image`` on its own grid.

        When the bundle records its training orientation, the image is first reoriented to it (a
        permutation and flip of axes) and the labels are mapped back exactly afterwards. ``box``: the
        body's box on ``image``'s grid (found here when None; the pipeline finds it once on the CT and
        shares it between tasks). Running out of GPU memory switches to low-memory mode with a warning.
        """
        stored = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        fed = sitk.DICOMOrient(image, self.orientation) if self.orientation and stored != self.orientation else image
        if not self.options.crop_to_body:
            box = BodyBox((0, 0, 0), tuple(image.GetSize()[::-1]))
        elif box is None:
            box = body_box_of_image(image)
        fed_box = box if fed is image else reoriented_box(box, image, fed)
        # a view: nnU-Net's preprocessing makes its own float32 copy (values as stored are exact in float32)
        array = sitk.GetArrayViewFromImage(fed)[None]
        spacing = list(fed.GetSpacing())[::-1]
        self.last_run = {"body_box_zyx": [list(fed_box.start), list(fed_box.stop)], "body_found": box.found,
                         "box_fraction": round(box.fraction_of(array.shape[1:]), 4),
                         "low_memory": self.options.low_memory}
        with _quiet_nnunet():
            labels = self._predict_array(array, spacing, fed_box, progress, warn)
        if fed is image:
            return labels
        back = sitk.DICOMOrient(uint8_image(labels, fed), stored)
        if back.GetSize() != image.GetSize() or not np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-3):
            raise ModelError(f"Reorienting the labels from {self.orientation} back to {stored} did not restore "
                             f"the input grid; please report this with the image's geometry.")
        return sitk.GetArrayFromImage(back)

    def _predict_array(self, array: np.ndarray, spacing, box: BodyBox, progress, warn) -> np.ndarray:
        """Labels of ``array`` (1, z, y, x; the fed orientation) on its grid, background outside ``box``."""
        import torch

        pm, cm = self.plans_manager, self.configuration
        forward = list(pm.transpose_forward)
        network_spacing = list(cm.spacing)
        input_spacing = [spacing[i] for i in forward]
        check_network_grid([array.shape[1:][i] for i in forward], input_spacing, network_spacing, cm.patch_size)
        orders = axis_orders(cm, network_spacing, input_spacing) if len(network_spacing) == 3 else None
        if orders is None or self.label_manager.has_regions:
            message = (f"{self.task}: the plans' score resampling ({cm.configuration.get('resampling_fn_probabilities')}) "
                       f"or region labels are not supported by the frugal path; using nnU-Net's predictor for the "
                       f"whole volume, which needs far more memory.")
            log.warning(message)
            if warn:
                warn(message)
            self.last_run["path"] = "stock"
            return self._predict_stock(array, spacing, progress)
        self._clock = clock = StageClock(self.device)
        t0 = time.perf_counter()
        # block by block where the plans allow it (the same values without whole-volume float copies)
        done = preprocess_in_blocks(array, spacing, pm, cm, self.dataset_json, cm.preprocessor_class)
        if done is None:
            preprocessor = cm.preprocessor_class(verbose=False)
            data, _, props = preprocessor.run_case_npy(array, None, {"spacing": list(spacing)}, pm, cm,
                                                       self.dataset_json)
        else:
            data, props = done
        self.last_run["preprocessing"] = "nnU-Net's run_case_npy" if done is None else "in blocks of slices"
        del array, done
        clock.add("preprocess", time.perf_counter() - t0)
        low_memory = self.options.low_memory
        try:
            labels = self._stream(data, props, orders, box, progress, low_memory)
        except torch.OutOfMemoryError as exc:
            if low_memory:
                raise ModelError(f"{self.task}: out of memory on {describe_device(self.device)} even in low-memory "
                                 f"mode ({exc}); use --device cpu.") from exc
            message = (f"{self.task}: out of GPU memory on {describe_device(self.device)}; continuing in low-memory "
                       f"mode (scores kept in CPU memory, slower). Pass --low-memory to start that way.")
            log.warning(message)
            if warn:
                warn(message)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.last_run["low_memory"] = self.last_run["low_memory_fallback"] = True
            labels = self._stream(data, props, orders, box, progress, True)
        self.last_run["path"] = "frugal"
        self.last_run["timings_s"] = clock.report()
        return labels

    def _stream(self, data: np.ndarray, props: dict, orders, box: BodyBox, progress, low_memory: bool) -> np.ndarray:
        """Tiles over the body's box, slice by slice, to labels on the fed grid (z, y, x)."""
        import torch
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        t_stream = time.perf_counter()
        pm, cm = self.plans_manager, self.configuration
        forward = list(pm.transpose_forward)
        shape_out = [int(n) for n in props["shape_after_cropping_and_before_resampling"]]
        crop = [[int(a), int(b)] for a, b in props["bbox_used_for_cropping"]]
        # the body's box in nnU-Net's coordinates (transposed, after its crop to non-zero voxels)
        out_start = [min(max(box.start[forward[a]] - crop[a][0], 0), shape_out[a]) for a in range(3)]
        out_stop = [min(max(box.stop[forward[a]] - crop[a][0], 0), shape_out[a]) for a in range(3)]
        result = np.zeros([int(n) for n in props["shape_before_cropping"]], np.uint8)
        if any(b <= a for a, b in zip(out_start, out_stop)):
            self.last_run["tiles"] = [0, 0]
            return result.transpose(pm.transpose_backward)
        maps = [axis_map(int(data.shape[a + 1]), shape_out[a], orders[a]).part(out_start[a], out_stop[a])
                for a in range(3)]
        region_start = [int(m.lo[0]) for m in maps]
        region_stop = [int(m.hi[-1]) + 1 for m in maps]
        labeler = SliceLabeler(tuple(m.shifted(r) for m, r in zip(maps, region_start)))
        needs_scores = any(m.linear for m in maps)

        store = torch.device("cpu") if low_memory or self.device.type != "cuda" else self.device
        image = torch.from_numpy(data)
        padded, revert = pad_nd_image(image, cm.patch_size, "constant", {"value": 0}, True, None)
        offset = [int(revert[a + 1].start) for a in range(3)]
        padded = padded.to(store)
        region = Region(tuple(r + o for r, o in zip(region_start, offset)),
                        tuple(r + o for r, o in zip(region_stop, offset)))
        tiles = tile_slicers(padded.shape[1:], cm.patch_size, self.options.tile_step_size)
        gaussian = compute_gaussian(tuple(cm.patch_size), sigma_scale=1. / 8, value_scaling_factor=10, device=store)
        evaluated = [0, len(tiles)]

        def tile_progress(done: int, total: int) -> None:
            evaluated[0] = done
            if progress is not None:
                progress(done / total)

        # the body box's labels go straight into the result (a view), not into a box-sized copy first
        inner = tuple(slice(crop[a][0] + out_start[a], crop[a][0] + out_stop[a]) for a in range(3))
        labels = result[inner]
        scores_of = self.label_manager.num_segmentation_heads
        stats: dict = {}
        clock = self._clock
        labelling = 0.0
        tally = ClassTally(scores_of) if self.options.certainty else None
        # inference mode for the whole window: the tiles' scores are inference tensors, weighted in place
        with torch.inference_mode():
            for z, scores in stream_scores(clock.timed_network(self._evaluate), padded, tiles, region, gaussian,
                                           scores_of, store, tile_progress, stats):
                if store.type == "cuda":
                    torch.cuda.synchronize(store)  # .cpu() waits anyway; this keeps the wait out of the labelling time
                t0 = time.perf_counter()
                if tally is None:
                    slice_labels = scores.argmax(0).to(torch.uint8).cpu().numpy()
                else:  # the arg-max and each voxel's best foreground score in one pass (ClassTally.labels)
                    won, foreground_best = tally.labels(scores)
                    slice_labels = won.to(torch.uint8).cpu().numpy()
                    tally.add(scores, won, foreground_best)
                # the labeler keeps a few slices' scores: a copy of its own (one, from any device), as the
                # stream reuses its buffers
                slice_scores = scores.to("cpu", copy=True).numpy() if needs_scores else None
                for j, out in labeler.add(z - region.start[0], slice_scores, slice_labels):
                    labels[j] = out
                labelling += time.perf_counter() - t0
        clock.add("labels", labelling)  # certainty tally included
        clock.add("sliding_window", time.perf_counter() - t_stream)
        self.class_table = tally.table() if tally is not None else None
        if not labeler.complete:
            raise ModelError(f"{self.task}: the sliding window ended before every slice was labelled; please report this.")
        self.last_run["tiles"] = evaluated
        self.last_run["score_slices_held"] = [stats.get("held_slices", 0), int(padded.shape[1])]
        self.last_run["interpolated_voxels"] = labeler.interpolated
        return result.transpose(pm.transpose_backward)

    def _evaluate(self, tile):
        """Class scores of one tile (1, C, *patch): the mean over folds of the (mirrored) network outputs."""
        import contextlib

        import torch

        tile = tile.to(self.device, non_blocking=True)
        autocast = torch.autocast("cuda", enabled=True) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            total = None
            for network in self._networks:
                scores = mirrored_sum(network, tile, self.mirroring_axes, self.lr_axis, self.permutation)
                if total is None:
                    total = scores
                else:
                    total += scores
                    del scores
            if len(self._networks) > 1:  # in place: no second copy of the tile's scores
                total /= len(self._networks)
        return total

    def _predict_stock(self, array: np.ndarray, spacing, progress) -> np.ndarray:
        """nnU-Net's own predictor over the whole volume (plans the frugal path does not cover)."""
        predictor = self._stock_predictor()
        predictor.progress = progress
        predictor._tiles_done = 0
        return np.asarray(predictor.predict_single_npy_array(array, {"spacing": list(spacing)}, None, None, False),
                          dtype=np.uint8)

    def _stock_predictor(self):
        """nnU-Net's predictor with our mirroring and progress, made on first use from the fold networks."""
        if self._stock is None:
            predictor = _make_predictor_class()(tile_step_size=self.options.tile_step_size, use_gaussian=True,
                                                use_mirroring=bool(self.mirroring_axes), device=self.device,
                                                perform_everything_on_device=self.device.type == "cuda",
                                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            # a network of its own: nnU-Net loads each fold's weights into it in turn, which must not change ours
            predictor.manual_initialization(copy.deepcopy(self._networks[0]), self.plans_manager, self.configuration,
                                            [n.state_dict() for n in self._networks], self.dataset_json,
                                            self._trainer_name, self._allowed_axes)
            predictor.mirror_axes, predictor.lr_axis, predictor.permutation = (self.mirroring_axes, self.lr_axis,
                                                                                self.permutation)
            self._stock = predictor
        return self._stock


class _quiet_nnunet:
    """Keep nnU-Net's prints off stdout, which the worker reserves for its JSON lines."""

    def __enter__(self):
        import contextlib
        import sys

        self._redirect = contextlib.redirect_stdout(sys.stderr)
        self._redirect.__enter__()
        os.environ.setdefault("nnUNet_def_n_proc", "1")
        return self

    def __exit__(self, *exc):
        return self._redirect.__exit__(*exc)
