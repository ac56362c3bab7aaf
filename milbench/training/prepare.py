"""Build what a model's card declares (patch graph, cross-scale index) for one bag, once.

The dataset calls :func:`prepare_bag` when a bag is first read and caches the result with the features, so
graphs and indexes are never rebuilt per epoch.
"""

from __future__ import annotations

from milbench.data.bag import Bag
from milbench.models.cards import ModelCard


def prepare_bag(card: ModelCard, bag: Bag) -> Bag:
    """Return ``bag`` with ``extras`` filled for every need of ``card`` (``"graph"``, ``"hierarchy"``)."""
    if "graph" in card.needs and "graph" not in bag.extras:
        from milbench.data.graphs import patch_graph

        scale = card.scales[-1]
        bag.extras["graph"] = patch_graph(
            bag.features[scale], bag.coords.get(scale), bag.slide_index.get(scale),
            kind=card.graph_kind or "spatial", k=card.graph_k or 8,
        )
    if "hierarchy" in card.needs and "hierarchy" not in bag.extras:
        from milbench.data.multiscale import build_index

        bag.extras["hierarchy"] = build_index(bag.coords, bag.slide_index)
    return bag
