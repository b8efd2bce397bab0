"""Adapter for ResNet (ResNetModel, ResNetForImageClassification).

BatchNorm becomes ``UncentredBatchNorm2d`` (running mean folded into the bias, exact in eval mode); the
stem's 7x7 convolution (zero padding 3, which stays exact with the folded normalisation) is the first
layer; shortcut 1x1 convolutions are rewritten like every other convolution.

Max-pooling in the stem is kept. It selects one input per window, so its output is ``W(x) x`` with ``W(x)``
a 0/1 selection and its gradient is exactly that selection: it is already dynamic linear, with nothing to
detach. The reference replaces it with AvgPool(3, 2, 1); that changes the function and would lose exact
equivalence, so it is not done here.

Pooling: the classifier stays after global average pooling, as in the source. Both are linear, so they
commute: moving the classifier before the pooling (the reference's choice) computes the same logits.
"""

from .rewriting import ArchitectureAdapter

RESNET_ADAPTER = ArchitectureAdapter(
    model_type="resnet",
    model_classes={"base": "ResNetModel", "image-classification": "ResNetForImageClassification"},
    first_layer="embedder.embedder.convolution",
    channel_attributes=("embedder.num_channels",),
    containers=frozenset(
        {
            "ResNetModel",
            "ResNetEmbeddings",
            "ResNetConvLayer",
            "ResNetEncoder",
            "ResNetStage",
            "ResNetBasicLayer",
            "ResNetBottleNeckLayer",
            "ResNetShortCut",
        }
    ),
    pooling_note="The classifier reads the global average of the last stage, as in the source ResNet.",
    alignment_blocks=("embedder", "encoder.stages.*.layers.*"),
)
