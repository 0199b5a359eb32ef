import math

import pytest
import torch
import torch.nn.functional as F

from bayeskd import methods, nets
from bayeskd.batch import Batch
from bayeskd.losses import soft_kl as kl
from bayeskd.taps import Extractor
from conftest import feature_steps

SHAPE = (1, 8, 8)


def pair(in_shape=SHAPE):
    torch.manual_seed(0)
    student, teacher = nets.build("cnn_student", 10, in_shape), nets.build("cnn_teacher", 10, in_shape).eval()
    return student, teacher, methods.build("hsakd", student, teacher, in_shape, num_samples=8)


def test_kl_matches_direct_evaluation():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    want = 0.0
    for i in range(4):
        ps, pt = torch.softmax(s[i] / 3, 0), torch.softmax(t[i] / 3, 0)
        want += (pt * (pt.log() - ps.log())).sum().item()
    assert math.isclose(kl(s, t, 3.0).item(), 9 * want / 4, rel_tol=1e-5)


def test_terms_match_direct_evaluation_on_the_rotations():
    student, teacher, method = pair()
    x, y = torch.rand(4, *SHAPE), torch.tensor([3, 0, 9, 3])
    s_ex, t_ex = Extractor(student), Extractor(teacher)
    s_seen: list[torch.Tensor] = []

    def rerun(inputs):
        s_seen.append(inputs)
        return s_ex(inputs)

    s, t = s_ex(x), t_ex(x)
    s.rerun = rerun
    got = method(s, t, Batch(x, y, torch.arange(4)), epoch=1)
    assert set(got) == {"ce", "hsakd_heads", "hsakd_logits", "hsakd_joint", "hsakd_teacher"}
    (inputs,) = s_seen
    assert torch.equal(inputs, torch.cat([torch.rot90(x, k, (2, 3)) for k in (1, 2, 3)]))

    # sample by sample: rotation k of sample i has the joint label 4 * y_i + k
    method.eval()
    student.eval()
    got = method(s_ex(x), t_ex(x), Batch(x, y, torch.arange(4)), epoch=1)
    views = [torch.rot90(x, k, (2, 3)) for k in range(4)]
    s_views, t_views = [s_ex(v) for v in views], [t_ex(v) for v in views]
    joint = teacher_ce = heads = logits = 0.0
    for k in range(4):
        for i in range(4):
            for level, (head_s, head_t) in enumerate(
                zip(method.student_heads, method.teacher_heads, strict=True)
            ):
                q_s = head_s(s_views[k].stages[level][i : i + 1])
                q_t = head_t(t_views[k].stages[level + 1][i : i + 1])  # teacher stages 2, 3 pair with 1, 2
                label = torch.tensor([4 * y[i].item() + k])
                joint += F.cross_entropy(q_s, label).item()
                teacher_ce += F.cross_entropy(q_t, label).item()
                heads += kl(q_s, q_t, 3.0).item()
            logits += kl(s_views[k].logits[i : i + 1], t_views[k].logits[i : i + 1], 3.0).item()
    for name, want in [
        ("hsakd_joint", joint),
        ("hsakd_teacher", teacher_ce),
        ("hsakd_heads", heads),
        ("hsakd_logits", logits),
    ]:
        assert math.isclose(got[name].item(), want / 16, rel_tol=1e-4), name


def test_non_square_input_is_refused():
    with pytest.raises(ValueError, match="square images"):
        pair((1, 8, 12))


def test_hsakd_trains():
    history = feature_steps("hsakd")
    assert all(math.isfinite(v) for h in history for v in h.values())
    loss = {name: [h[name] for h in history] for name in ("hsakd_heads", "hsakd_joint", "hsakd_teacher")}
    assert sum(loss["hsakd_heads"][-5:]) / 5 < 0.9 * loss["hsakd_heads"][0]
    # the joint tasks learn too (on random labels, slowly)
    assert all(sum(v[-5:]) / 5 < v[0] for v in loss.values())


def test_gradients_reach_the_student_and_both_heads_not_the_teacher():
    student, teacher, method = pair()
    x, y = torch.rand(8, *SHAPE), torch.randint(0, 10, (8,))
    terms = method(
        Extractor(student)(x), Extractor(teacher)(x), Batch(x, y, torch.arange(8)), 1
    )
    terms["hsakd_heads"].backward(retain_graph=True)
    assert student.stage1[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student_heads.parameters())
    assert all(p.grad is None for p in method.teacher_heads.parameters())  # distillation targets are fixed
    terms["hsakd_teacher"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.teacher_heads.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_zoo_pair():
    history = feature_steps(
        "hsakd", student_net="resnet8", teacher_net="resnet14", in_shape=(3, 32, 32), steps=2, n=16
    )
    assert all(math.isfinite(v) for h in history for v in h.values())
