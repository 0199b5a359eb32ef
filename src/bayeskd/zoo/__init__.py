"""The nets. Each builder is declared with `bayeskd.declare.net`, once per name it builds:

    @net("resnet8", depth=8)
    @net("resnet8x4", depth=8, widths=[32, 64, 128, 256])
    def cifar_resnet(num_classes, in_shape, *, depth, widths=(16, 16, 32, 64)): ...

Every module of this package is imported and its declared nets registered in `NETS`, so a new net is
a new module. `embedded` holds the small MLPs and CNNs of the embedded datasets; the other modules
are the standard CIFAR knowledge-distillation zoo (ResNets, wide ResNets, VGGs, MobileNetV2,
ShuffleNets) for 3-channel images.

Every net keeps one convention (tests/test_zoo.py checks each registered net):
- its builder is `(num_classes, in_shape, **declared kwargs) -> nn.Module`, and raises ValueError,
  saying what it needs, for inputs it cannot take;
- forward returns the logits only;
- `net.taps` (bayeskd.taps.Taps) declares its feature taps: the stage outputs, shallow to deep (an
  MLP has none), and the pre-logit vector, the input of the final linear layer;
- global pooling is a mean over height and width (`_layers.GlobalAvgPool`), whose CUDA backward is
  deterministic, unlike AdaptiveAvgPool2d's.
"""

from bayeskd import declare

NETS: dict[str, declare.NetDecl] = declare.collect(__name__, __path__, declare.NetDecl)
