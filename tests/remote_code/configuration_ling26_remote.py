"""The config class of the project's own Ling-2.6 remote-code test model (see the modeling file)."""

from transformers import PretrainedConfig


class Ling26RemoteConfig(PretrainedConfig):
    """Every key of config.json becomes an attribute; only the defaults the model needs are set."""

    model_type = "bailing_hybrid"

    def __init__(self, rms_norm_eps=1e-6, partial_rotary_factor=0.5, q_lora_rank=None,
                 num_nextn_predict_layers=0, tie_word_embeddings=False, **kwargs):
        self.rms_norm_eps = rms_norm_eps
        self.partial_rotary_factor = partial_rotary_factor
        self.q_lora_rank = q_lora_rank
        self.num_nextn_predict_layers = num_nextn_predict_layers
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
