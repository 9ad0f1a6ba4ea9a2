import json

import pytest

from gptoss_cluster.workers.config import FULL, PRESETS, SLIDING, ConfigError, ModelConfig


def test_presets_have_published_dimensions():
    for name, layers, experts in (("20b", 24, 32), ("120b", 36, 128)):
        cfg = ModelConfig.preset(name)
        assert (cfg.num_hidden_layers, cfg.num_experts, cfg.experts_per_token) == (layers, experts, 4)
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (2880, 2880, 64)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (64, 8, 201088)
        assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_scaling_factor) == (128, 150000.0, 32.0)
        assert cfg.rope_original_context == 4096 and cfg.rope_truncate is False
        assert cfg.layer_types[0] == SLIDING and cfg.layer_types[1] == FULL
    assert PRESETS["tiny"].vocab_size == 201088


@pytest.mark.parametrize("preset", ["tiny", "20b", "120b"])
def test_both_layouts_round_trip(preset):
    cfg = ModelConfig.preset(preset)
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg
    assert ModelConfig.from_dict(cfg.to_original_dict()) == cfg


def test_real_hf_config_fields_are_accepted():
    # The published gpt-oss-20b config.json, as Hugging Face ships it.
    data = {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn"], "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                                "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                                "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
    }
    assert ModelConfig.from_dict(data) == ModelConfig.preset("20b")


def test_transformers5_generic_fields_and_null_token_ids_load():
    # What transformers 5 writes besides the model's own fields: PretrainedConfig's generic ones, and null ids.
    generic = {
        "output_hidden_states": True, "output_attentions": False, "return_dict": True, "chunk_size_feed_forward": 0,
        "is_encoder_decoder": False, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
        "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "problem_type": None, "_name_or_path": "", "dtype": "bfloat16",
        "transformers_version": "5.25.0",
    }
    data = {**ModelConfig.preset("20b").to_hf_dict(), **generic,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    cfg = ModelConfig.from_dict(data)
    assert cfg == ModelConfig.preset("20b")
    assert (cfg.eos_token_id, cfg.pad_token_id) == (200002, 199999)  # the published ids, not None
    for key in ("eos_token_id", "pad_token_id"):  # a null id alone, and an empty eos list, fall back too
        assert ModelConfig.from_dict({**data, key: None}) == cfg
    assert ModelConfig.from_dict({**data, "eos_token_id": []}).eos_token_id == 200002


def test_transformers_full_config_dict_loads():
    # Every field transformers' own serializer writes (the full dict, not only the fields that differ from defaults).
    transformers = pytest.importorskip("transformers")
    written = transformers.GptOssConfig(num_hidden_layers=4, num_local_experts=8).to_json_string(use_diff=False)
    cfg = ModelConfig.from_dict(json.loads(written))
    assert (cfg.num_hidden_layers, cfg.num_experts, cfg.eos_token_id, cfg.pad_token_id) == (4, 8, 200002, 199999)


@pytest.mark.parametrize("change, field", [
    ({"attention_scaling": 2.0}, "attention_scaling"),  # a plausible field that would change the math
    ({"foo_scaling": 1.5}, "foo_scaling"),
    ({"is_encoder_decoder": True}, "is_encoder_decoder"),  # generic, but not a gpt-oss model
])
def test_fields_that_would_change_results_are_refused(change, field):
    data = {**ModelConfig.preset("tiny").to_hf_dict(), "output_hidden_states": False, "eos_token_id": None, **change}
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_dict(data)


def test_real_original_config_is_accepted():
    data = {"num_hidden_layers": 36, "num_experts": 128, "experts_per_token": 4, "vocab_size": 201088,
            "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
            "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
            "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
            "rope_ntk_alpha": 1, "rope_ntk_beta": 32}
    assert ModelConfig.from_dict(data) == ModelConfig.preset("120b")


@pytest.mark.parametrize("change, field", [
    ({"hidden_sizee": 2880}, "hidden_sizee"),
    ({"num_key_value_heads": 7}, "num_key_value_heads"),
    ({"hidden_size": 2881}, "hidden_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_experts_per_tok": 64}, "experts_per_token"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps"),
])
def test_bad_hf_fields_name_the_field(change, field):
    data = ModelConfig.preset("tiny").to_hf_dict()
    data.update(change)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(data)


def test_bad_original_field_and_file_errors(tmp_path):
    data = ModelConfig.preset("tiny").to_original_dict()
    data["num_expertz"] = 3
    with pytest.raises(ConfigError, match="num_expertz"):
        ModelConfig.from_dict(data)
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="object"):
        ModelConfig.from_json(path)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_json(tmp_path / "missing" / "config.json")


def test_unknown_preset_and_override():
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("7b")
    with pytest.raises(ConfigError, match="unknown config field 'layers'"):
        ModelConfig.preset("tiny", layers=3)
    cfg = ModelConfig.preset("tiny", num_hidden_layers=3)
    assert cfg.layer_types == (SLIDING, FULL, SLIDING)
