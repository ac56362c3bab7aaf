"""Model cards: what each model is and what the data layer must build for it, readable without importing torch.

A card is plain data, so ``milbench models``, the leaderboards and the plots name a model without importing the
zoo (torch alone takes seconds to import). Built-in models are declared here once, each card naming the module
whose ``@register_model(name)`` binds the class to it; plug-ins declare their card in the decorator instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NEEDS = ("coords", "graph", "hierarchy", "clusters")
GROUPS = ("single_scale", "multi_scale", "ablation", "custom")


@dataclass(frozen=True)
class Traits:
    """How a model may be executed fast (:mod:`milbench.accel`); none changes the function it computes.

    ``cuda_graphs``: no host data or host randomness in a training step, so the step may be recorded once and
    replayed (:mod:`milbench.accel.graphs`). ``autocast_inputs``: the features enter an autocast op first, so they
    are fed in their stored half precision (:func:`milbench.training.device.model_input`). ``compiled_blocks``:
    class names of the heavy, repeated blocks that ``--compile`` compiles (:mod:`milbench.accel.compile`).
    ``gpu_fraction``: the share of one GPU a fold asks for on Ray by default (``--gpus-per-fold`` overrides it); the
    fold keeps its allocations within it. 0.25 where a step at the paper's largest bag (137,990 patches, width 2048)
    peaks at about 3 GiB or less and the step is launch-bound (AMIL 2.8 GiB and under 5 ms on an H200, DSMIL,
    MuSTMIL, ZoomMIL: docs/performance.md), so four folds share a GPU; 0.5 for the graph and clustering models
    (9-13 GiB at that bag); 1 for TransMIL and the CrossFusion family, whose steps keep a GPU busy (device-bound).
    """

    cuda_graphs: bool = False
    autocast_inputs: bool = False
    compiled_blocks: tuple[str, ...] = ()
    gpu_fraction: float = 1.0


@dataclass(frozen=True)
class ModelCard:
    """What a model is and what the data layer must build for it.

    ``needs`` names optional inputs: ``"coords"``, ``"graph"`` (with ``graph_kind`` / ``graph_k``),
    ``"hierarchy"`` (cross-scale index), ``"clusters"`` (clustering priors fitted on the training fold).
    ``reference_params`` maps input width to the parameter count of the reference at ``n_bins=4``.
    ``module`` is where the class is registered (empty for a plug-in registered by its decorator).
    """

    name: str
    display_name: str
    paper: str = ""
    scales: tuple[str, ...] = ("20x",)
    needs: tuple[str, ...] = ()
    graph_kind: str | None = None
    graph_k: int | None = None
    group: str = "single_scale"  # single_scale | multi_scale | ablation | custom
    reference_params: dict[int, int] = field(default_factory=dict)
    description: str = ""
    module: str = ""
    traits: Traits = Traits()


BUILTIN_CARDS: tuple[ModelCard, ...] = (
    ModelCard(
        name="amil",
        module="milbench.models.amil",
        display_name="AMIL",
        paper="Ilse et al., Attention-based Deep Multiple Instance Learning, ICML 2018",
        scales=("20x",),
        reference_params={1024: 789_765, 2048: 1_314_053},
        description="gated attention pooling over 20x patches (CrossFusion-repo variant; variant=patchgcn for Patch-GCN's)",
        traits=Traits(gpu_fraction=0.25, cuda_graphs=True, autocast_inputs=True),
    ),
    ModelCard(
        name="dsmil",
        module="milbench.models.dsmil",
        display_name="DSMIL",
        paper="Li, Li & Eliceiri, Dual-stream Multiple Instance Learning Network for Whole Slide Image Classification "
              "with Self-supervised Contrastive Learning, CVPR 2021",
        scales=("20x",),
        reference_params={1024: 168_200, 2048: 319_752},
        description="max-instance critical patch per time bin queries all 20x patches (CrossFusion-repo variant, "
                    "plus the max-instance loss; instance_loss=False for the reference's untrained instance stream)",
        traits=Traits(gpu_fraction=0.25, cuda_graphs=True),
    ),
    ModelCard(
        name="transmil",
        module="milbench.models.transmil",
        display_name="TransMIL",
        paper="Shao et al., TransMIL: Transformer based Correlated Multiple Instance Learning for WSI Classification, "
              "NeurIPS 2021",
        scales=("20x",),
        reference_params={1024: 2_673_172, 2048: 3_197_460},
        description="two Nystrom-attention layers with a PPEG over the square-padded 20x patch sequence "
                    "(CrossFusion-repo variant; nystrom_slicing=first for nystrom-attention 0.0.9)",
        traits=Traits(cuda_graphs=True, autocast_inputs=True, compiled_blocks=('TransLayer', 'PPEG')),
    ),
    ModelCard(
        name="deepgraphsurv",
        module="milbench.models.graph_mil",
        display_name="DeepGraphSurv",
        paper="Li et al., Graph CNN for Survival Analysis on Whole Slide Pathological Images, MICCAI 2018 "
              "(as re-implemented in Chen et al.'s Patch-GCN benchmark, 'DGC')",
        scales=("20x",),
        needs=("graph",),
        graph_kind="latent",
        graph_k=8,
        reference_params={1024: 790_021, 2048: 1_052_165},
        description="3x GINConv on a feature-space kNN graph (k=8, the published DGC runs) + gated attention pooling",
        traits=Traits(gpu_fraction=0.5),
    ),
    ModelCard(
        name="patchgcn",
        module="milbench.models.graph_mil",
        display_name="PatchGCN",
        paper="Chen et al., Whole Slide Images are 2D Point Clouds: Context-Aware Survival Prediction using "
              "Patch-based Graph Convolutional Networks, MICCAI 2021",
        scales=("20x",),
        needs=("coords", "graph"),
        graph_kind="spatial",
        graph_k=8,
        reference_params={1024: 1_383_304, 2048: 1_514_376},
        description="3x GENConv (softmax aggregation, DeepGCN res blocks) on a spatial kNN graph (k=8) + gated attention",
        traits=Traits(gpu_fraction=0.5),
    ),
    ModelCard(
        name="scmil",
        module="milbench.models.scmil",
        display_name="SCMIL",
        paper="Yang et al., SCMIL: Sparse Context-aware Multiple Instance Learning for Predicting Cancer Survival "
              "Probability Distribution in Whole Slide Images, MICCAI 2024",
        scales=("20x",),
        needs=("coords",),
        reference_params={1024: 10_238_214, 2048: 39_349_510},
        description="SoftFilter, k-means windows on features+coords with local self-attention, gated attention "
                    "pooling; builds the reference's used weights only (4,990,214 @1024, 18,367,750 @2048); head=mdn "
                    "for the official mixture-density head",
        traits=Traits(gpu_fraction=0.5),
    ),
    ModelCard(
        name="protosurv",
        module="milbench.models.protosurv",
        display_name="ProtoSurv",
        paper="Wu et al., Leveraging Tumor Heterogeneity: Heterogeneous Graph Representation Learning for Cancer "
              "Survival Prediction in Whole Slide Images, NeurIPS 2024",
        scales=("20x",),
        needs=("coords", "graph", "clusters"),
        graph_kind="spatial",
        graph_k=4,
        reference_params={1024: 52_987_779, 2048: 73_568_131},
        description="GENConv GNN + 40 tissue-type prototypes (k-means priors on the training fold), cross-attention fusion",
        traits=Traits(gpu_fraction=0.5),
    ),
    ModelCard(
        name="crossfusion",
        module="milbench.models.crossfusion",
        display_name="CrossFusion",
        paper="Soraki et al., CrossFusion: A Multi-Scale Cross-Attention Convolutional Fusion Model for Cancer Survival "
                 "Prediction, MIDL 2026",
        scales=("5x", "10x", "20x"),
        group="multi_scale",
        reference_params={1024: 22_963_720, 2048: 24_536_584},
        description="10x queries 5x and 20x by cross-attention; Pad-Transformers per stream; Conv Processor fusion",
        traits=Traits(cuda_graphs=True, autocast_inputs=True, compiled_blocks=('CrossAttentionBlock', 'TransformerLayer', 'PPEG', 'ConvProcessor', 'ConcatFusion')),
    ),
    ModelCard(
        name="crossfusion_concat",
        module="milbench.models.crossfusion",
        display_name="CrossFusion w/o CP",
        paper="Soraki et al., CrossFusion: A Multi-Scale Cross-Attention Convolutional Fusion Model for Cancer Survival "
                 "Prediction, MIDL 2026",
        scales=("5x", "10x", "20x"),
        group="ablation",
        reference_params={1024: 23_575_044, 2048: 25_147_908},
        description="CrossFusion with the Conv Processor replaced by channel concatenation and a linear projection",
        traits=Traits(cuda_graphs=True, autocast_inputs=True, compiled_blocks=('CrossAttentionBlock', 'TransformerLayer', 'PPEG', 'ConvProcessor', 'ConcatFusion')),
    ),
    ModelCard(
        name="crossfusion_single",
        module="milbench.models.crossfusion",
        display_name="CrossFusion w/o F&C",
        paper="Soraki et al., CrossFusion: A Multi-Scale Cross-Attention Convolutional Fusion Model for Cancer Survival "
                 "Prediction, MIDL 2026",
        scales=("20x",),
        group="ablation",
        reference_params={1024: 9_206_276, 2048: 9_730_564},
        description="CrossFusion on 20x only: one Pad-Transformer, Conv Processor without scale fusion, final transformer",
        traits=Traits(cuda_graphs=True, autocast_inputs=True, compiled_blocks=('TransformerLayer', 'PPEG', 'ConvProcessor')),
    ),
    ModelCard(
        name="zoommil",
        module="milbench.models.zoommil",
        display_name="ZoomMIL",
        paper="Thandiackal et al., Differentiable Zooming for Multiple Instance Learning on Whole-Slide Images, ECCV 2022",
        scales=("5x", "10x", "20x"),
        needs=("coords", "hierarchy"),
        group="multi_scale",
        reference_params={1024: 2_891_017, 2048: 4_463_881},
        description="gated attention per magnification + perturbed top-k zoom 5x->10x->20x (k=12)",
        traits=Traits(gpu_fraction=0.25),
    ),
    ModelCard(
        name="mustmil",
        module="milbench.models.mustmil",
        display_name="MuSTMIL",
        paper="Marini et al., Multi-Scale Task Multiple Instance Learning for the Classification of Digital Pathology "
              "Images with Global Annotations, MICCAI COMPAY 2021 (PMLR 156)",
        scales=("5x", "10x"),
        needs=("coords", "hierarchy"),
        group="multi_scale",
        reference_params={1024: 304_344, 2048: 566_488},
        description="per-scale attention branches + joint attention on paired 10x/5x rows (E=128, D=64)",
        traits=Traits(gpu_fraction=0.25),
    ),
    ModelCard(
        name="csmil",
        module="milbench.models.csmil",
        display_name="CS-MIL",
        paper="Deng et al., Cross-scale multi-instance learning for pathological image diagnosis, MedIA 2024",
        scales=("5x", "10x", "20x"),
        needs=("coords", "hierarchy"),
        group="multi_scale",
        reference_params={1024: 72_038, 2048: 137_574},
        description="shared embedding of each 20x patch and its 10x/5x parents, cross-scale attention, attention pooling",
        traits=Traits(gpu_fraction=0.5),
    ),
)

BUILTIN = {card.name: card for card in BUILTIN_CARDS}


def builtin_card(name: str) -> ModelCard | None:
    """The card of built-in model ``name``, or None; no model module is imported."""
    return BUILTIN.get(name)
