import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from extensible import EmbedderConfig, ExtensibleEmbedder, ExtensibleLM, IncompatiblePluginError, UserError, load_llm
from extensible import plugins
from extensible.embedder import CONFIG_NAME, WEIGHTS_NAME

from .conftest import save_tiny


def test_initialised_from_the_first_layers_with_the_output_norm_at_token_scale(tiny):
    llm, tokenizer = tiny
    embedder = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, chunk_size=16))
    ids = torch.randint(2, 90, (1, 16))
    with torch.no_grad():
        hidden = llm(ids, output_hidden_states=True).hidden_states[2]  # after layer 2, before any final norm
        rms = llm.get_input_embeddings().weight.pow(2).mean().sqrt()
        expected = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + llm.config.rms_norm_eps) * rms
        assert torch.allclose(embedder(ids), expected, atol=1e-5)
    assert embedder.body.get_input_embeddings() is llm.get_input_embeddings(), "the token table is shared"
    assert len(embedder.body.layers) == 2


def test_only_the_embedder_trains(tiny):
    llm, tokenizer = tiny
    full = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2))
    lora = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, lora_rank=4))
    assert not any("embed_tokens" in name for name in full.trainable_state_dict())
    assert set(lora.trainable_state_dict()) >= {"norm.weight"}
    assert all("lora_" in n or n == "norm.weight" for n in lora.trainable_state_dict())
    assert 0 < lora.num_trainable() < full.num_trainable()
    assert not any(p.requires_grad for p in llm.parameters())


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_save_and_load_round_trip(tiny, tmp_path, lora_rank):
    llm, tokenizer = tiny
    embedder = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, chunk_size=16, lora_rank=lora_rank))
    with torch.no_grad():  # pretend training moved every trainable tensor
        for param in embedder.body.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    embedder.save_pretrained(tmp_path)
    stored = load_file(tmp_path / WEIGHTS_NAME)
    assert set(stored) == set(embedder.trainable_state_dict())
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["num_layers"] == 2 and config["chunk_size"] == 16 and config["train_ks"] == [2, 4, 8, 16, 32]
    assert config["base"]["hidden_size"] == 64 and len(config["base"]["tokenizer_sha256"]) == 16

    loaded = ExtensibleEmbedder.from_pretrained(tmp_path, llm, tokenizer)
    ids = torch.randint(2, 90, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), embedder(ids))


def test_a_plugin_refuses_an_incompatible_llm(tiny, tmp_path):
    llm, tokenizer = tiny
    ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2)).save_pretrained(tmp_path / "plug")
    other, other_tokenizer = load_llm(str(save_tiny(tmp_path / "wide", hidden=32)), dtype=torch.float32)
    with pytest.raises(IncompatiblePluginError, match="hidden_size: plug-in 64 vs LLM 32"):
        ExtensibleEmbedder.from_pretrained(tmp_path / "plug", other, other_tokenizer)


def test_a_fine_tuned_derivative_of_the_base_accepts_the_plugin(tiny, tmp_path):
    llm, tokenizer = tiny
    ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2)).save_pretrained(tmp_path / "plug")
    derivative, derivative_tokenizer = load_llm(str(save_tiny(tmp_path / "derivative", seed=7)), dtype=torch.float32)
    loaded = ExtensibleEmbedder.from_pretrained(tmp_path / "plug", derivative, derivative_tokenizer)
    assert loaded.body.get_input_embeddings() is derivative.get_input_embeddings()


def test_a_damaged_plugin_is_refused(tiny, tmp_path):
    llm, tokenizer = tiny
    ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors.pop("layers.1.mlp.up_proj.weight")
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(UserError, match="missing"):
        ExtensibleEmbedder.from_pretrained(tmp_path, llm, tokenizer)
    with pytest.raises(UserError, match="not an extensible-embedding plug-in"):
        ExtensibleEmbedder.from_pretrained(tmp_path / "nowhere", llm, tokenizer)


def test_unknown_config_keys_from_a_newer_version_are_ignored(tiny, tmp_path):
    llm, tokenizer = tiny
    ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["added_in_a_later_release"] = True
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    assert ExtensibleEmbedder.from_pretrained(tmp_path, llm, tokenizer).config.num_layers == 2


def test_a_shipped_plugin_is_found_by_its_base_fingerprint(tiny, tmp_path, monkeypatch):
    llm, tokenizer = tiny
    monkeypatch.setattr(plugins, "SHIPPED", tmp_path)
    assert plugins.shipped_plugin(llm, tokenizer) is None
    trained = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=3, chunk_size=16))
    trained.save_pretrained(tmp_path / "tiny-plugin")
    assert plugins.shipped_plugin(llm, tokenizer) == tmp_path / "tiny-plugin"
    assert plugins.load_embedder(llm, tokenizer).config.num_layers == 3
    fresh = plugins.load_embedder(llm, tokenizer, config=EmbedderConfig(num_layers=2), untrained=True)
    assert fresh.config.num_layers == 2


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_architectures_run_end_to_end(tmp_path, model_type):
    llm, tokenizer = load_llm(str(save_tiny(tmp_path, model_type)), dtype=torch.float32)
    embedder = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, chunk_size=16))
    lm = ExtensibleLM(llm, tokenizer, embedder, window=96)
    ids = torch.randint(2, 90, (250,))
    online, offline = lm.score(ids, 60, 4).token_nll, lm.score(ids, 60, 4, full=lm.encode(ids)).token_nll
    torch.testing.assert_close(online, offline, rtol=0, atol=1e-4)  # chunks encoded in other batch shapes
    assert len(lm.generate(ids, 4, max_new_tokens=3)) >= 1
    embedder.save_pretrained(tmp_path / "plug")
    ExtensibleEmbedder.from_pretrained(tmp_path / "plug", llm, tokenizer)
