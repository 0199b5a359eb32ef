"""bayeskd.declare: declarations read from source (`scan`) are the ones the imported modules
register (`collect`), and bad declarations are refused where they are written."""

import sys

import pytest

from bayeskd import declare
from bayeskd.declare import Float, Int

TOY = '''
from bayeskd.declare import Float, Int, method, net


@method("plain", scale=Float(2.0, gt=0), steps=Int(3, ge=1))
def plain(student_logits, teacher_logits, targets, epoch, *, scale, steps):
    return {}


@net("small", width=[4, 8])
@net("large", width=[16, 32], depth=2)
def builder(num_classes, in_shape, *, width, depth=1):
    return None


@method("flagged", single_process=True, uses_stages=False, weight=Float(0.5, ge=0, le=1))
class Flagged:
    pass


alias = builder  # one object under two names is registered once
'''


def toy_package(tmp_path, name, source, monkeypatch):
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "toy.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def test_scan_reads_what_collect_registers_in_the_same_order(tmp_path, monkeypatch):
    package = toy_package(tmp_path, "toy_ok", TOY, monkeypatch)
    import toy_ok

    methods = declare.collect("toy_ok", toy_ok.__path__, declare.MethodDecl)
    nets = declare.collect("toy_ok", toy_ok.__path__, declare.NetDecl)
    assert list(nets) == ["small", "large"]  # stacked: as they read, from the top
    assert nets["large"].kwargs == {"width": [16, 32], "depth": 2}
    assert nets["large"].impl.__name__ == "builder"
    assert methods["plain"].defaults() == {"scale": 2.0, "steps": 3}
    assert methods["plain"].hparams["scale"] == Float(2.0, gt=0)
    assert methods["flagged"].impl.single_process and not methods["flagged"].impl.uses_stages
    for decorator, registered in ((declare.method, methods), (declare.net, nets)):
        scanned = declare.scan(package, decorator)
        assert scanned == registered and list(scanned) == list(registered)
        assert all(d.impl is None for d in scanned.values())
    for module in ("toy_ok", "toy_ok.toy"):
        monkeypatch.delitem(sys.modules, module)


def test_flags_go_to_classes_only():
    cls = declare.method("m", single_process=True, in_float32=True)(type("M", (), {}))
    assert cls.single_process and cls.in_float32 and cls.uses_stages
    with pytest.raises(TypeError, match="flags are for feature methods"):
        declare.method("f", uses_stages=False)(lambda: None)


@pytest.mark.parametrize("source, message", [
    ('@method("x", weight=Float(compute()))\ndef x(): pass', r"toy.py:2: .* literals .* compute\(\)"),
    ('@method("x", weight=1.0)\ndef x(): pass', "toy.py:2: .*declare weight with Float"),
    ('@method("x")\ndef x(): pass\n@method("x")\ndef y(): pass', "'x' is declared twice"),
    ('@net("n", size=SIZE)\ndef n(): pass', r"toy.py:2: .*got SIZE"),
])
def test_scan_refuses_what_it_cannot_read(tmp_path, monkeypatch, source, message):
    package = toy_package(tmp_path, "toy_bad", "from bayeskd.declare import Float, method, net\n" + source,
                          monkeypatch)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        declare.scan(package, declare.net if "@net" in source else declare.method)


def test_hyperparameter_specs():
    assert Float(4, gt=0) == declare.Spec(float, 4.0, {"gt": 0}) and isinstance(Float(4).default, float)
    with pytest.raises(TypeError, match="integer default"):
        Int(2.5)
    with pytest.raises(TypeError, match="bounds are gt, ge, lt, le"):
        Float(1.0, minimum=0)
