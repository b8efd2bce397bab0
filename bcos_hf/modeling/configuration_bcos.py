"""Configuration of B-cos models converted from a pretrained Hugging Face vision model.

Part of the remote-loadable model code: imports only torch, transformers and siblings, with single dots.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .bcos_layers import check_b, check_logit_layer
from .tasks import remote_code_auto_map

REMOTE_CODE_AUTO_MAP = remote_code_auto_map("configuration_bcos.BcosConfig")


class BcosConfig(PreTrainedConfig):
    r"""Configuration of a [`BcosModel`] or [`BcosForImageClassification`].

    A B-cos model is the source architecture (ViT, ConvNeXt, ...) rebuilt from ``source_config`` with every
    layer rewritten into its B-cos counterpart, so the config holds the source config plus what the rewriting
    needs to rebuild the same model bit for bit.

    Args:
        source_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the source architecture, with ``num_channels=6`` (the model sees ``[x, 1 - x]``). Defaults
            to a ViT-Base (``ViTConfig(num_channels=6)``), so ``BcosConfig()`` builds like any transformers config.
        b (`float`, defaults to 2.0):
            The B-cos exponent: 1 is a plain linear network, 2 the usual B-cos model; 1 to 10 (``check_b``).
        keep_bias (`bool`, defaults to False):
            Keep the pretrained biases. Biases are constant terms, so a B-cos model drops them; keeping them
            (with ``b=1``) reproduces the source model exactly.
        normalize_weights (`bool`, defaults to False):
            Use unit-norm weights in the B-cos layers instead of the raw pretrained ones.
        input_mean (`list[float]`), input_std (`list[float]`):
            The source image normalisation, folded exactly into the first layer at conversion (recorded for
            provenance: the model takes images in [0, 1]).
        logit_bias (`float`, defaults to 0.0), logit_temperature (`float`, defaults to 1.0):
            Logits are ``network_logits / logit_temperature + logit_bias``; the recipe uses
            ``logit_bias = -log(num_labels - 1)``.
        source_checkpoint (`str`): Hub id or folder the model was converted from.
        source_architecture (`str`): Transformers class of the source checkpoint.
        bcos_hf_version (`str`): Version of bcos_hf that converted the model.
    """

    model_type = "bcos"
    sub_configs_defaults = {"source_config": SubConfigSpec(config_class=AutoConfig, model_type="vit")}

    source_config: dict | PreTrainedConfig | None = None
    b: float = 2.0
    keep_bias: bool = False
    normalize_weights: bool = False
    input_mean: list[float] | None = None
    input_std: list[float] | None = None
    logit_bias: float = 0.0
    logit_temperature: float = 1.0
    source_checkpoint: str | None = None
    source_architecture: str | None = None
    bcos_hf_version: str | None = None

    def __post_init__(self, **kwargs):
        kwargs.setdefault("auto_map", dict(REMOTE_CODE_AUTO_MAP))
        if self.source_config is None:  # ``BcosConfig()``: a B-cos ViT-Base, as ``ViTConfig()`` is a ViT-Base
            self.source_config = {"model_type": "vit", "num_channels": 6}
        super().__post_init__(**kwargs)
        check_b(self.b)
        check_logit_layer(self.logit_bias, self.logit_temperature)
        if self.source_architecture is not None and not str(self.source_architecture).isidentifier():
            raise ValueError(
                f"BcosConfig.source_architecture must name a transformers class; got {self.source_architecture!r}."
            )
        channels = getattr(self.source_config, "vision_config", self.source_config).num_channels  # image-text
        if channels != 6:
            raise ValueError(
                "BcosConfig.source_config must describe the 6-channel network ([x, 1 - x] input encoding); "
                f"got num_channels={channels}. Convert models with bcos_hf.convert."
            )
        # The label maps live on the source config (they size the classifier); mirror them at the top level,
        # where pipelines and users look for them.
        if self.id2label is None or len(self.id2label) != len(self.source_config.id2label or {}):
            self.id2label = dict(self.source_config.id2label or {})
            self.label2id = dict(self.source_config.label2id or {})
