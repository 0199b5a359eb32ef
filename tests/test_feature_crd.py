import math

import torch
import torch.nn.functional as F

from bayeskd import methods
from bayeskd.batch import Batch
from conftest import feature_steps


def probe(dim: int) -> methods.Features:
    return methods.Features(torch.zeros(2, 10), [], torch.zeros(2, dim))


def direct_nce(anchor, bank, contrast, z, temperature, n):
    """The paper's NCE loss, sample by sample, for a fixed bank, fixed negatives and a fixed Z."""
    k = contrast.shape[1] - 1
    total = 0.0
    for b in range(len(anchor)):
        p = [math.exp(float(bank[j] @ anchor[b]) / temperature) / z for j in contrast[b].tolist()]
        total += math.log(p[0] / (p[0] + k / n))
        total += sum(math.log((k / n) / (q + k / n)) for q in p[1:])
    return -total / len(anchor)


def test_loss_matches_direct_evaluation():
    torch.manual_seed(0)
    n, dim = 7, 5
    method = methods.create("crd", probe(4), probe(6), n, feat_dim=dim, nce_k=3, nce_t=0.5)
    method.memory_s.rows.copy_(F.normalize(torch.randn(n, dim), dim=1))
    method.memory_t.rows.copy_(F.normalize(torch.randn(n, dim), dim=1))
    method.z.copy_(torch.tensor([3.0, 5.0]))
    e_s, e_t = F.normalize(torch.randn(2, dim), dim=1), F.normalize(torch.randn(2, dim), dim=1)
    contrast = torch.tensor([[4, 0, 6, 6], [1, 2, 3, 5]])
    got = method.contrast_loss(e_s, e_t, contrast)
    want = direct_nce(e_s, method.memory_t.rows, contrast, 3.0, 0.5, n) + direct_nce(
        e_t, method.memory_s.rows, contrast, 5.0, 0.5, n
    )
    assert math.isclose(got.item(), want, rel_tol=1e-5)


def test_normaliser_is_set_by_the_first_batch_then_fixed():
    torch.manual_seed(0)
    n = 9
    method = methods.create("crd", probe(4), probe(4), n, feat_dim=3, nce_k=4)
    e = F.normalize(torch.randn(2, 3), dim=1)
    contrast = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 0]])
    scores = torch.exp(method.memory_t.rows[contrast] @ e[:, :, None] / method.nce_t)
    method.contrast_loss(e, e, contrast)
    assert math.isclose(method.z[0].item(), scores.mean().item() * n, rel_tol=1e-5)
    first = method.z.clone()
    method.contrast_loss(-e, -e, contrast)
    assert torch.equal(method.z, first)


def test_negatives_exclude_the_positive_and_follow_the_global_rng():
    method = methods.create("crd", probe(4), probe(4), 5, feat_dim=3)
    assert method.nce_k == 4  # min(16384, N - 1)
    idx = torch.tensor([0, 2, 4, 4])
    torch.manual_seed(1)
    drawn = method.negatives(idx)
    assert drawn.shape == (4, 4) and drawn.min() >= 0 and drawn.max() < 5
    assert not (drawn == idx[:, None]).any()
    torch.manual_seed(1)
    assert torch.equal(method.negatives(idx), drawn)
    many = method.negatives(torch.zeros(2000, dtype=torch.long))
    assert set(many.unique().tolist()) == {1, 2, 3, 4}


def test_memory_bank_updates_the_batch_rows_with_momentum():
    torch.manual_seed(0)
    n = 6
    method = methods.create("crd", probe(4), probe(5), n, feat_dim=3, nce_m=0.5)
    s, t = probe(4), probe(5)
    s.pooled, t.pooled = torch.randn(2, 4), torch.randn(2, 5)
    idx = torch.tensor([1, 3])
    old_s, old_t = method.memory_s.rows.clone(), method.memory_t.rows.clone()
    method.terms(s, t, Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), idx), epoch=1)
    with torch.no_grad():
        e_s = F.normalize(method.embed_s(s.pooled), dim=1)
        e_t = F.normalize(method.embed_t(t.pooled), dim=1)
    torch.testing.assert_close(method.memory_s.rows[idx], F.normalize(0.5 * old_s[idx] + 0.5 * e_s, dim=1))
    torch.testing.assert_close(method.memory_t.rows[idx], F.normalize(0.5 * old_t[idx] + 0.5 * e_t, dim=1))
    others = torch.tensor([0, 2, 4, 5])
    assert torch.equal(method.memory_s.rows[others], old_s[others])
    assert torch.equal(method.memory_t.rows[others], old_t[others])
    frozen = method.memory_s.rows.clone()
    method.eval().terms(s, t, Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), idx), epoch=1)
    assert torch.equal(method.memory_s.rows, frozen)  # evaluation leaves the banks alone


def test_crd_trains():
    # Step 1 scores against the random initial banks; once they hold this data's (nearly identical)
    # embeddings the loss jumps, and learning to separate them brings it below both.
    history = feature_steps("crd", steps=60, lr=0.05)
    crd = [h["crd"] for h in history]
    assert all(math.isfinite(v) for h in history for v in h.values())
    last = sum(crd[-5:]) / 5
    assert last < crd[0] and last < min(crd[2:6])


def test_zoo_pair():
    history = feature_steps(
        "crd", student_net="resnet8", teacher_net="resnet14", in_shape=(3, 32, 32), steps=2, n=16
    )
    assert all(math.isfinite(v) for h in history for v in h.values())
