"""Patient bags for training and scoring: every slide of a patient, read once through the cache, concatenated per scale.

With a model card, the bag is passed through :func:`milbench.training.prepare.prepare_bag` once and the prepared bag
(patch graph, cross-scale index) is kept in the cache, so nothing is rebuilt per epoch or per fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch.utils.data import Dataset

from milbench import MilbenchError
from milbench.data.bag import Bag
from milbench.data.cache import FeatureCache
from milbench.data.readers import SlideFeatures, canonical_scale
from milbench.models.cards import ModelCard
from milbench.tasks.cohort import Cohort
from milbench.training.prepare import prepare_bag

_FEATURE_SPACE_GRAPHS = ("latent",)  # graph kinds built from features alone (see graphs.py)


def coords_reason(card: ModelCard | None) -> str | None:
    """Why the card needs coordinates, or None when it does not."""
    if card is None:
        return None
    if "coords" in card.needs:
        return "patch coordinates"
    if "hierarchy" in card.needs:
        return "a cross-scale hierarchy"
    if "graph" in card.needs and (card.graph_kind or "spatial") not in _FEATURE_SPACE_GRAPHS:
        return f"a {card.graph_kind or 'spatial'} patch graph"
    return None


def no_coords(path: object, card: ModelCard) -> MilbenchError:
    """The error for a feature file without coordinates read for a model that needs them."""
    return MilbenchError(f"{path} has no coordinates, but model '{card.name}' needs {coords_reason(card)}: use CLAM "
                         f"h5_files (features + coords) instead of pt_files")


def tensor_bytes(obj: object, depth: int = 0) -> int:
    """Bytes held by the tensors in ``obj`` (nested mappings, sequences and plain objects such as PyG Data)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if depth > 4:
        return 0
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, depth + 1) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, depth + 1) for v in vars(obj).values())
    return 0


class BagDataset(Dataset):
    """Item i is the :class:`Bag` of patient ``case_ids[i]`` at ``scales`` (prepared for ``card`` when given)."""

    def __init__(self, cohort: Cohort, case_ids: Sequence[str], scales: Sequence[str],
                 card: ModelCard | None = None, cache: FeatureCache | None = None) -> None:
        self.cohort = cohort
        self.case_ids = list(case_ids)
        self.scales = tuple(canonical_scale(s) for s in scales)
        if not self.scales:
            raise MilbenchError("a bag needs at least one magnification (5x, 10x or 20x)")
        self.card = card
        self.cache = cache if cache is not None else FeatureCache.shared()
        self.root = cohort.require_features_root()
        cohort.labels(self.case_ids)  # rejects case IDs the cohort does not know
        self._coords_reason = coords_reason(card)
        self._reference: tuple[int, str, str] | None = None  # (width, slide, scale) every slide must match

    def __len__(self) -> int:
        return len(self.case_ids)

    def _read(self, scale: str, slide: str) -> SlideFeatures:
        return self.cache.read(self.root, scale, slide, self.cohort.backbone)

    def _width_reference(self) -> tuple[int, str, str]:
        if self._reference is None:
            case = self.case_ids[0] if self.case_ids else self.cohort.table["case_id"].iloc[0]
            slide = self.cohort.slides_of(case)[0]
            self._reference = (int(self._read(self.scales[0], slide).features.shape[1]), slide, self.scales[0])
        return self._reference

    @property
    def in_dim(self) -> int:
        """Feature width of the bags (read from the first slide; every slide is checked against it)."""
        return self._width_reference()[0]

    def _assemble(self, case_id: str) -> Bag:
        slides = self.cohort.slides_of(case_id)  # never empty, and the reader rejects slides with zero patches
        width, first_slide, first_scale = self._width_reference()
        features, slide_index, coords = {}, {}, {}
        for scale in self.scales:
            parts = [self._read(scale, slide) for slide in slides]
            for slide, part in zip(slides, parts):
                if part.features.shape[1] != width:
                    raise MilbenchError(
                        f"slide {slide} has {part.features.shape[1]} features per patch at {scale} ({part.path}) but "
                        f"slide {first_slide} has {width} at {first_scale}: all features must come from one backbone; "
                        f"check --backbone or re-extract it")
            counts = torch.tensor([p.features.shape[0] for p in parts])
            features[scale] = parts[0].features if len(parts) == 1 else torch.cat([p.features for p in parts])
            slide_index[scale] = torch.repeat_interleave(torch.arange(len(parts)), counts)
            lacking = next((p for p in parts if p.coords is None), None)
            if lacking is None:
                coords[scale] = parts[0].coords if len(parts) == 1 else torch.cat([p.coords for p in parts])
            elif self._coords_reason:
                raise no_coords(lacking.path, self.card)
        return Bag(case_id=case_id, features=features, slide_index=slide_index, coords=coords)

    def _prepared(self, case_id: str) -> Bag:
        card = self.card
        slides = tuple(self.cohort.slides_of(case_id))
        # everything prepare_bag reads from the card, so models with the same needs share the prepared bag
        key = ("bag", str(self.root), self.cohort.backbone, self.scales, case_id, slides,
               card.scales, card.needs, card.graph_kind, card.graph_k)

        def size(bag: Bag) -> int:  # single-slide features are the cached slide tensors themselves
            held = tensor_bytes(bag.extras) + tensor_bytes(bag.slide_index)
            return held + (tensor_bytes(bag.features) + tensor_bytes(bag.coords) if len(slides) > 1 else 0)

        return self.cache.get_or_build(key, lambda: prepare_bag(card, self._assemble(case_id)), size)

    def __getitem__(self, i: int) -> Bag:
        case_id = self.case_ids[i]
        if self.card is None:
            return self._assemble(case_id)
        bag = self._prepared(case_id)
        # fresh dicts, so that a caller adding entries cannot alter the cached bag
        return replace(bag, features=dict(bag.features), slide_index=dict(bag.slide_index),
                       coords=dict(bag.coords), extras=dict(bag.extras))
