"""From whole-slide images to CLAM-layout patch features at 5x, 10x and 20x on nested grids (`milbench extract`).

Modules, in pipeline order: ``slides`` (OpenSlide, base magnification, patch reads), ``tissue`` (saturation mask on
a thumbnail), ``grid`` (nested per-magnification grids, the per-slide plan), ``encoders`` (feature backbones),
``writer`` (h5 + pt files), ``pipeline`` (resumable extraction, worker processes, report), ``contact`` (contact
sheet). ``slides``, ``tissue`` and ``grid`` do not import torch: worker processes load only them.
"""
