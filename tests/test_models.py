"""Models: shapes, parameter counts, logits (not probabilities), sparse embedding gradients,
the vertical wide&deep split against its unsplit composition, and the registry."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from enclavefl.errors import UsageError
from enclavefl.models import (
    DLRM,
    BottomMLP,
    FieldEmbedding,
    TopMLP,
    UnsplitWideDeep,
    WideDeepFollower,
    WideDeepLeader,
    build_model,
    embedding_parameter_names,
    mlp,
    resnet_v2,
)

# torch on one thread per test (conftest.one_torch_thread): the suite shares few cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- ResNet v2 -------------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "params"), [(20, 272_282), (56, 855_578)])
def test_resnet_parameter_counts_match_the_paper(depth: int, params: int) -> None:
    # He et al. report 0.27 M (ResNet-20) and 0.85 M (ResNet-56); the small excess is the
    # two 1x1 projection shortcuts and the pre-activation final BN.
    model = resnet_v2(depth)
    assert count(model) == params
    assert abs(count(model) - {20: 0.27e6, 56: 0.85e6}[depth]) / params < 0.01


def test_resnet_forward_backward_tiny_batch() -> None:
    torch.manual_seed(0)
    model = resnet_v2(20, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    nn.functional.cross_entropy(out, torch.tensor([1, 5])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_resnet_is_pre_activation() -> None:
    model = resnet_v2(20)
    block = model.blocks[0]
    # v2: the block's first op is BN over its INPUT channels, and the net ends BN-ReLU.
    assert list(block.children())[0] is block.bn1
    assert block.bn1.num_features == 16
    assert model.bn_final.num_features == 64
    assert [type(b.shortcut) for b in model.blocks].count(nn.Conv2d) == 2


@pytest.mark.parametrize("depth", [21, 0, 2, 7, 19.0])
def test_resnet_invalid_depth_names_valid_depths(depth: object) -> None:
    with pytest.raises(UsageError, match=r"6n\+2.*20.*56") as info:
        resnet_v2(depth)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


# --- DLRM ------------------------------------------------------------------------------


def small_dlrm(**kwargs: object) -> DLRM:
    torch.manual_seed(0)
    return DLRM([7 + i for i in range(26)], **kwargs)  # type: ignore[arg-type]


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(n, 13, generator=g)
    sparse = torch.stack([torch.randint(0, 7 + i, (n,), generator=g) for i in range(26)], dim=1)
    return dense, sparse


def test_dlrm_architecture_and_parameter_count() -> None:
    model = small_dlrm()
    emb = sum(7 + i for i in range(26)) * 16
    bottom = (13 * 512 + 512) + (512 * 256 + 256) + (256 * 64 + 64) + (64 * 16 + 16)
    interactions = 27 * 26 // 2  # 26 embeddings + the bottom output, pairs without self
    top = ((16 + interactions) * 512 + 512) + (512 * 256 + 256) + (256 + 1)
    assert count(model) == emb + bottom + top
    assert model(*batch()).shape == (4, 1)


def test_dlrm_interaction_is_the_upper_triangle_of_dot_products() -> None:
    model = small_dlrm()
    dense, sparse = batch(3)
    bottom = model.bottom(dense)
    vectors = [bottom] + [t(sparse[:, i]) for i, t in enumerate(model.embeddings)]
    pairs = [(vectors[i] * vectors[j]).sum(dim=1) for i in range(27) for j in range(i + 1, 27)]
    expected = model.top(torch.cat([bottom, torch.stack(pairs, dim=1)], dim=1))
    torch.testing.assert_close(model(dense, sparse), expected)


def test_dlrm_forward_returns_logits_and_predict_applies_one_sigmoid() -> None:
    model = small_dlrm()
    with torch.no_grad():
        model.top[-1].bias.fill_(5.0)
    dense, sparse = batch()
    logits = model(dense, sparse)
    assert (logits > 1.0).all()  # a probability could never exceed 1
    torch.testing.assert_close(model.predict(dense, sparse), torch.sigmoid(logits))


def test_dlrm_learns_with_bce_with_logits() -> None:
    model = small_dlrm()
    dense, sparse = batch(8)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(dense, sparse).squeeze(-1), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_dlrm_sparse_gradients_touch_only_used_rows() -> None:
    model = small_dlrm(sparse=True)
    dense, sparse = batch(4)
    before = [t.weight.detach().clone() for t in model.embeddings]
    model(dense, sparse).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for i, table in enumerate(model.embeddings):
        grad = table.weight.grad
        assert grad.is_sparse
        touched = grad.coalesce().indices()[0]
        assert touched.tolist() == sorted(set(sparse[:, i].tolist()))
        changed = (table.weight.detach() != before[i]).any(dim=1).nonzero().flatten()
        assert set(changed.tolist()) <= set(touched.tolist())
    assert not model.top[0].weight.grad.is_sparse


def test_embedding_parameter_names() -> None:
    model = small_dlrm()
    names = embedding_parameter_names(model)
    assert names == [f"embeddings.{i}.weight" for i in range(26)]
    params = dict(model.named_parameters())
    assert all(params[n].shape[1] == 16 for n in names)
    assert embedding_parameter_names(nn.Embedding(3, 2)) == ["weight"]
    assert embedding_parameter_names(mlp(3)) == []


def test_dlrm_rejects_bad_configuration_and_inputs() -> None:
    with pytest.raises(UsageError, match="26 sizes"):
        DLRM([10, 10])
    with pytest.raises(UsageError, match="embedding_dim=16"):
        DLRM(10, bottom_mlp=(64, 8))
    with pytest.raises(UsageError, match=r"\[N, 13\]"):
        small_dlrm()(torch.rand(2, 12), torch.zeros(2, 26, dtype=torch.int64))


# --- MLPs ------------------------------------------------------------------------------


def test_mlp_binary_and_multiclass() -> None:
    binary = mlp(5)
    assert [type(m) for m in binary] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert binary(torch.rand(3, 5)).shape == (3, 1)
    multi = mlp(5, hidden=(8,), out_features=4, dropout=0.2)
    assert multi(torch.rand(3, 5)).shape == (3, 4)
    assert any(isinstance(m, nn.Dropout) for m in multi)
    with pytest.raises(UsageError, match="widths"):
        mlp(5, hidden=(0,))
    with pytest.raises(UsageError, match="dropout"):
        mlp(5, dropout=1.0)


def test_split_mlp_bottoms_feed_the_top() -> None:
    torch.manual_seed(0)
    leader_bottom, follower_bottom = BottomMLP(4, out_features=3), BottomMLP(6)
    top = TopMLP(3 + 16, out_features=2)
    a, b = leader_bottom(torch.randn(5, 4)), follower_bottom(torch.randn(5, 6))
    assert (a >= 0).all() and b.shape == (5, 16)
    assert top([a, b]).shape == (5, 2)


# --- wide&deep -------------------------------------------------------------------------


def tiny_halves(seed: int) -> tuple[WideDeepFollower, WideDeepLeader]:
    torch.manual_seed(seed)
    follower = WideDeepFollower(num_fields=6, vocab_size=11, embedding_dim=4, out_features=5)
    leader = WideDeepLeader(num_fields=3, vocab_size=11, embedding_dim=4, hidden=(8, 6), follower_dims=[5])
    return follower, leader


def test_wide_deep_reference_shapes() -> None:
    follower = WideDeepFollower()
    leader = WideDeepLeader()
    x = torch.randint(0, 101, (2, 512))
    act = follower(x)
    assert act.shape == (2, 64) and (act >= 0).all()
    assert leader(x, [act]).shape == (2, 1)
    assert leader.fc1.in_features == 512 * 32 and follower.fc.in_features == 512 * 16
    assert leader.output.in_features == 64 + 64


def test_unsplit_equals_split_training_step() -> None:
    """Forward outputs and every gradient agree between the split (activations and their
    gradient crossing a boundary, as over the bridge) and the one-process composition."""
    follower, leader = tiny_halves(0)
    other_follower, other_leader = tiny_halves(1)
    unsplit = UnsplitWideDeep(other_leader, [other_follower])
    unsplit.load_state_dict(
        {
            **{f"leader.{k}": v for k, v in leader.state_dict().items()},
            **{f"followers.0.{k}": v for k, v in follower.state_dict().items()},
        }
    )
    g = torch.Generator().manual_seed(2)
    xf, xl = torch.randint(0, 11, (4, 6), generator=g), torch.randint(0, 11, (4, 3), generator=g)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])

    act = follower(xf)
    received = act.detach().requires_grad_()
    split_out = leader(xl, [received])
    nn.functional.binary_cross_entropy_with_logits(split_out.squeeze(-1), y).backward()
    act.backward(received.grad)

    joint_out = unsplit(xl, [xf])
    nn.functional.binary_cross_entropy_with_logits(joint_out.squeeze(-1), y).backward()

    torch.testing.assert_close(split_out, joint_out)
    for name, p in leader.named_parameters():
        torch.testing.assert_close(p.grad, unsplit.leader.get_parameter(name).grad)
    for name, p in follower.named_parameters():
        torch.testing.assert_close(p.grad, unsplit.followers[0].get_parameter(name).grad)


def test_wide_deep_sparse_embeddings_and_shape_errors() -> None:
    follower = WideDeepFollower(num_fields=6, vocab_size=11, embedding_dim=4, sparse=True)
    follower(torch.randint(0, 11, (3, 6))).sum().backward()
    assert follower.embedding.table.weight.grad.is_sparse
    assert embedding_parameter_names(follower) == ["embedding.table.weight"]
    _, leader = tiny_halves(0)
    with pytest.raises(UsageError, match="follower_dims"):
        leader(torch.zeros(2, 3, dtype=torch.int64), [torch.zeros(2, 4)])
    with pytest.raises(UsageError, match=r"\[N, 6\]"):
        follower(torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(UsageError, match="followers produce"):
        UnsplitWideDeep(leader, [WideDeepFollower(num_fields=2, vocab_size=3, out_features=7)])


def test_field_embedding_fields_do_not_share_rows() -> None:
    emb = FieldEmbedding([3, 5], dim=2)
    x = torch.tensor([[2, 0]])
    out = emb(x)
    torch.testing.assert_close(out[0, 0], emb.table.weight[2])
    torch.testing.assert_close(out[0, 1], emb.table.weight[3 + 0])


# --- registry --------------------------------------------------------------------------


def test_registry_builtins() -> None:
    assert count(build_model("resnet20")) == 272_282
    assert count(build_model("resnet32", num_classes=100)) == count(resnet_v2(32, 100))
    assert isinstance(build_model("dlrm", vocab_sizes=5), DLRM)
    assert build_model("mlp", in_features=4, out_features=3)(torch.rand(2, 4)).shape == (2, 3)
    model = build_model("wide_deep", num_fields=4, vocab_size=5)
    assert isinstance(model, UnsplitWideDeep)


def test_registry_errors_name_what_failed() -> None:
    with pytest.raises(UsageError, match="unknown model 'resnet'.*resnet<depth>"):
        build_model("resnet")
    with pytest.raises(UsageError, match="6n\\+2"):
        build_model("resnet21")
    with pytest.raises(UsageError, match=r"'mlp': bad arguments \['in_features', 'widths'\]: .*'widths'"):
        build_model("mlp", in_features=3, widths=4)
    # A string is a built-in name only: the models package imports nothing a job names.
    with pytest.raises(UsageError, match="unknown model 'os:system'.*factory"):
        build_model("os:system")


def test_registry_builds_from_a_factory_and_checks_what_it_returns() -> None:
    model = build_model(lambda width=3: nn.Linear(width, 1), width=5)
    assert isinstance(model, nn.Linear) and model.in_features == 5
    assert isinstance(build_model(nn.Identity), nn.Identity)
    with pytest.raises(UsageError, match="returned int, not a torch.nn.Module"):
        build_model(lambda: 3)
    with pytest.raises(UsageError, match="bad arguments"):
        build_model(lambda width=3: nn.Linear(width, 1), depth=3)


def test_models_and_data_are_leaf_packages() -> None:
    import subprocess

    code = (
        "import sys, enclavefl.models, enclavefl.data\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in "
        "[['enclavefl', p] for p in ('net', 'tee', 'seal', 'hfl', 'vfl', 'jobs')]]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
