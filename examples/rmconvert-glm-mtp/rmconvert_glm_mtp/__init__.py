"""rmconvert plugin for GLM-4.5-style ``glm4_moe`` checkpoints, whose multi-token-prediction (MTP) layers are
stored as extra decoder layers ``model.layers.{num_hidden_layers + i}.*``.

transformers' Glm4MoeForCausalLM does not load those layers and a reward model has no use for them, so they
are dropped with the LM head. transformers has no Glm4MoeForSequenceClassification: rmconvert builds one.
"""

import re
from pathlib import Path

from rmconvert import Architecture, CheckpointError, hookimpl

LAYER = re.compile(r"model\.layers\.(\d+)\.")


class GlmMtp(Architecture):
    name = "glm-mtp"
    model_types = ("glm4_moe",)
    sequence_classification_class = "Glm4MoeForSequenceClassification"
    schema = Path(__file__).with_name("glm4_moe.schema.json")

    def dropped(self, ckpt):
        """The LM head and every layer past ``num_hidden_layers`` (the MTP layers, none of the backbone)."""
        layers = ckpt.config.get("num_hidden_layers")
        if type(layers) is not int:
            raise CheckpointError("num_hidden_layers must be an integer", ckpt.config_path)
        mtp = {n for n in ckpt.tensors if (m := LAYER.match(n)) and int(m[1]) >= layers}
        return super().dropped(ckpt) | mtp

    def output_config(self, config):
        """The reward model has no MTP layers left: say so, where the config counts them."""
        if "num_nextn_predict_layers" in config:
            config["num_nextn_predict_layers"] = 0


@hookimpl
def rmconvert_register_architectures(register):
    register(GlmMtp())
