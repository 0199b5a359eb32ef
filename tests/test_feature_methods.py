"""What every feature method owes the training loop, checked for each registered method."""

import pytest
import torch

from bayeskd import config, methods, nets
from bayeskd.batch import Batch
from bayeskd.taps import Extractor


@pytest.mark.parametrize("name", sorted(methods.FEATURE))
def test_gradients_reach_the_student_and_the_methods_parts_never_the_teacher(name):
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    student = nets.build("cnn_student", 10, (1, 8, 8))
    teacher = nets.build("cnn_teacher", 10, (1, 8, 8)).eval()  # autograd on: detaching must be the method's
    method = methods.build(name, student, teacher, (1, 8, 8), num_samples=8)
    s, t = Extractor(student)(x), Extractor(teacher)(x)
    terms = method(s, t, Batch(x, y, torch.arange(8)), 20)
    assert "ce" in terms and len(terms) > 1
    own = sum(v for k, v in terms.items() if k not in ("ce", "hsakd_teacher"))
    own.backward()
    assert student.stage1[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert set(config.hparams(name)) >= {"weight", "ce_weight"}
