import pytest
import torch

from milbench import MilbenchError
from milbench.training.prepare import prepare_bag
from milbench.models.protosurv import orthogonality_loss
from milbench.models.registry import count_parameters, create_model, get_card
from tests.conftest import nested_bag
from tests.models.learning import held_out_c_index

# ProtoGNN.norm (LayerNorm 512), ProtoGNN.lin (Linear 1024->512), ProtoGNN.proto_mlp (Linear 768->512): built by the
# reference, never called, not built here.
DEAD_REFERENCE_PARAMS = 1_024 + 524_800 + 393_728
SMALL = dict(hidden=8, dim_proto=24, proto_hidden=16, protos_per_type=4)


@pytest.mark.parametrize("in_dim", [1024, 2048])
def test_parameter_counts_reconcile_with_spec(in_dim):
    spec = get_card("protosurv").reference_params[in_dim]
    assert spec == {1024: 52_987_779, 2048: 73_568_131}[in_dim]
    with torch.device("meta"):  # 53-74 M parameters: count without allocating
        cox = count_parameters(create_model("protosurv", in_dim, head="cox"))
        hazard = count_parameters(create_model("protosurv", in_dim))
    assert cox + DEAD_REFERENCE_PARAMS == spec  # the reference's Cox head: Linear(768 -> 1, no bias)
    assert hazard == cox - 768 + (768 * 4 + 4)  # the shared hazard head: Linear(768 -> 4) with bias


def bags(n: int, in_dim: int = 16, seed: int = 0):
    card = get_card("protosurv")
    return [prepare_bag(card, nested_bag(n5=2, in_dim=in_dim, seed=seed + i, case_id=f"c{seed + i}")) for i in range(n)]


def fitted(seed: int = 0, **options):
    torch.manual_seed(seed)
    model = create_model("protosurv", 16, **{**SMALL, **options})
    model.fit_priors(bags(4))
    return model


def test_card_needs_spatial_k4_graph_and_priors():
    card = get_card("protosurv")
    assert {"coords", "graph", "clusters"} <= set(card.needs)
    assert (card.graph_kind, card.graph_k) == ("spatial", 4)


@pytest.mark.parametrize("in_dim", [32, 48])
def test_forward_backward_shapes_and_attention(in_dim):
    model = create_model("protosurv", in_dim, **SMALL)
    model.fit_priors(bags(3, in_dim))
    out = model(bags(1, in_dim, seed=9)[0], return_attention=True)
    assert out.logits.shape == (1, 4)
    a = out.attention["20x"]
    assert a.shape == (32,) and torch.isclose(a.sum(), torch.tensor(1.0))
    assert out.aux_loss is not None and out.aux_loss.ndim == 0
    (out.logits.sum() + out.aux_loss).backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == {"gcn.layers.0.norm.weight", "gcn.layers.0.norm.bias"}  # the reference's unused LayerNorm


def test_cox_head_returns_one_log_risk():
    model = fitted(head="cox").eval()
    assert model(bags(1, seed=9)[0]).logits.shape == (1, 1)
    assert model.head_kind == "cox"


def test_eval_is_deterministic_and_has_no_aux_loss():
    model = fitted().eval()
    bag = bags(1, seed=9)[0]
    a, b = model(bag), model(bag)
    assert torch.equal(a.logits, b.logits) and a.aux_loss is None


def test_priors_come_from_the_training_bags_only():
    model = fitted()
    centroids = model.centroids.clone()
    assert model.priors_fitted and centroids.abs().sum() > 0
    for training in (True, False):  # forward passes on held-out bags never move the priors
        model.train(training)
        for bag in bags(3, seed=50):
            model(bag)
    assert torch.equal(model.centroids, centroids)
    train = bags(4)
    model.fit_priors(train)
    assert torch.equal(model.centroids, centroids)  # refitting on the same fold gives the same priors
    sample = torch.cat([b.features["20x"] for b in train])  # prior_samples covers every training patch here
    assigned = torch.cdist(sample, centroids).argmin(1)
    for c in range(5):  # a converged k-means of the training patches: each centroid is its cluster's mean
        assert torch.allclose(centroids[c], sample[assigned == c].mean(0), atol=1e-5)
    other = create_model("protosurv", 16, **SMALL)
    other.fit_priors(bags(4, seed=50))
    assert not torch.allclose(other.centroids, centroids)


def test_tissue_types_are_nearest_centroids():
    model = fitted()
    bag = bags(1, seed=9)[0]
    d = torch.cdist(bag.features["20x"], model.centroids)
    assert torch.equal(model.tissue_types(bag), d.argmin(1))


def test_user_tissue_labels_replace_clustering():
    train = bags(3)
    for b in train:
        b.extras["tissue_labels"] = torch.arange(32) % 5
    model = create_model("protosurv", 16, **SMALL)
    model.fit_priors(train)
    x = torch.cat([b.features["20x"] for b in train])
    labels = torch.cat([b.extras["tissue_labels"] for b in train])
    assert torch.allclose(model.centroids[2], x[labels == 2].mean(0))
    bag = bags(1, seed=9)[0]
    bag.extras["tissue_labels"] = torch.full((32,), 3)
    assert torch.equal(model.tissue_types(bag), torch.full((32,), 3))
    assert model(bag).logits.shape == (1, 4)


def test_prior_errors_are_clear():
    with pytest.raises(MilbenchError, match="fit_priors"):
        create_model("protosurv", 16, **SMALL)(bags(1)[0])
    train = bags(2)
    train[0].extras["tissue_labels"] = torch.zeros(32, dtype=torch.long)
    with pytest.raises(MilbenchError, match="c1"):
        create_model("protosurv", 16, **SMALL).fit_priors(train)
    bag = bags(1)[0]
    bag.extras["tissue_labels"] = torch.full((32,), 7)
    with pytest.raises(MilbenchError, match="0..4"):
        fitted()(bag)


def test_training_subsamples_nodes_for_the_attention_branches():
    model = fitted(max_train_nodes=10).train()
    bag = bags(1, seed=9)[0]
    a = model(bag, return_attention=True).attention["20x"]
    assert a.shape == (32,) and int((a > 0).sum()) == 10
    model.eval()
    assert int((model(bag, return_attention=True).attention["20x"] > 0).sum()) == 32


def test_policies_say_the_cap_and_count_the_training_bags_it_cut():
    model = fitted(max_train_nodes=10).train()
    for bag in bags(2, seed=9) + bags(1, seed=9):  # two distinct bags, one seen twice
        model(bag)
    model.eval()
    model(bags(1, seed=20)[0])  # evaluation never subsamples
    policy = model.policies()
    assert policy["max_train_nodes"]["cap"] == 10 and policy["max_train_nodes"]["bags_subsampled"] == 2
    assert "prior_seed=0" in policy["tissue_priors"] and "gradient_checkpointing" in policy
    uncapped = fitted(max_train_nodes=None).train()
    uncapped(bags(1, seed=9)[0])
    assert uncapped.policies()["max_train_nodes"]["bags_subsampled"] == 0
    assert "no cap" in uncapped.policies()["max_train_nodes"]["applies_to"]


def test_orthogonality_loss_matches_the_d_by_d_form():
    p = torch.randn(40, 64, dtype=torch.float64)
    s = p.T @ p
    eye = torch.eye(64, dtype=torch.float64)
    expected = torch.linalg.matrix_norm(s / torch.linalg.matrix_norm(s) - eye / torch.linalg.matrix_norm(eye))
    assert torch.isclose(orthogonality_loss(p), expected)


def test_compatibility_loss_pulls_patches_to_their_own_type():
    model = fitted()
    x = torch.randn(6, 16)
    types = torch.tensor([0, 1, 2, 3, 4, 0])
    near = model.centroids.repeat_interleave(4, 0)  # 4 prototypes per type, at the type centroid
    far = near.roll(4, 0)  # each type's prototypes moved to the next type's centroid
    x = model.centroids[types] + 0.01 * x
    assert model.compatibility_loss(x, types, near) < model.compatibility_loss(x, types, far)


@pytest.mark.slow
def test_learns_marked_region_signal():
    assert held_out_c_index("protosurv", epochs=8, hidden=16, dim_proto=48, proto_hidden=48) > 0.7


@pytest.mark.slow
def test_cox_head_learns_over_accumulation_windows():
    """The original head trained with the Cox loss over windows of 8 bags (about 8 s)."""
    assert held_out_c_index("protosurv", head="cox", grad_accum=8, epochs=8, hidden=16, dim_proto=48,
                            proto_hidden=48) > 0.7
