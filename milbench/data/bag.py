"""The patient-level bag every model consumes: features per magnification plus whatever the model's card asks for."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

SCALES = ("5x", "10x", "20x")


@dataclass
class Bag:
    """All slides of one patient.

    ``features[scale]`` is [N, D] (the slides concatenated in slide order); ``slide_index[scale]`` is [N] (which
    slide each patch belongs to); ``coords[scale]`` is [N, 2] level-0 pixels when the source has them.
    ``extras`` holds what the data layer built because the model's card declared it (a patch graph under
    ``"graph"``, a cross-scale index under ``"hierarchy"``, clustering priors ...).
    """

    case_id: str
    features: dict[str, torch.Tensor]
    slide_index: dict[str, torch.Tensor] = field(default_factory=dict)
    coords: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, object] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Bag":
        """Copy to a device; floating features are cast to ``dtype`` when given."""

        def move(t: object) -> object:
            if isinstance(t, torch.Tensor):
                if dtype is not None and t.is_floating_point():
                    return t.to(device=device, dtype=dtype, non_blocking=True)
                return t.to(device=device, non_blocking=True)
            if isinstance(t, dict):
                return {k: move(v) for k, v in t.items()}
            if hasattr(t, "to") and callable(t.to):
                return t.to(device)
            return t

        return replace(
            self,
            features={k: move(v) for k, v in self.features.items()},
            slide_index={k: move(v) for k, v in self.slide_index.items()},
            coords={k: move(v) for k, v in self.coords.items()},
            extras={k: move(v) for k, v in self.extras.items()},
        )

    @property
    def in_dim(self) -> int:
        """Feature width (the same at every scale)."""
        return next(iter(self.features.values())).shape[-1]

    def n_patches(self, scale: str) -> int:
        return int(self.features[scale].shape[0])
