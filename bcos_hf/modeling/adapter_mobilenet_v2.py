"""Adapter for MobileNetV2 (MobileNetV2Model, MobileNetV2ForImageClassification).

Depthwise 3x3 convolutions become grouped B-cos convolutions (norm per channel window), BatchNorm becomes
``UncentredBatchNorm2d`` (running mean folded into the bias), ReLU6 becomes a detachable activation
(``x * gate(x)`` with the gate ``relu6(x) / x`` detached in explanation mode).

``tf_padding=True`` (the config default, used by the TensorFlow-ported checkpoints) is supported: each
``MobileNetV2ConvLayer`` zero-pads its input by a shape-dependent amount before a padding-free convolution.
Zero padding contributes nothing to the output nor to the B-cos window norm, and the folded first layer sees
zeros exactly where the source saw zero-padded *normalised* pixels, so equivalence stays exact either way.

Pooling: the classifier stays after global average pooling, as in the source. Both are linear, so they
commute: moving the classifier before the pooling (the reference's choice) computes the same logits.
"""

from .rewriting import ArchitectureAdapter

MOBILENET_V2_ADAPTER = ArchitectureAdapter(
    model_type="mobilenet_v2",
    model_classes={"base": "MobileNetV2Model", "image-classification": "MobileNetV2ForImageClassification"},
    first_layer="conv_stem.first_conv.convolution",
    containers=frozenset(
        {"MobileNetV2Model", "MobileNetV2Stem", "MobileNetV2InvertedResidual", "MobileNetV2ConvLayer"}
    ),
    pooling_note="The classifier reads the global average of the last 1x1 convolution, as in the source MobileNetV2.",
    alignment_blocks=("conv_stem", "layer.*", "conv_1x1"),
)
