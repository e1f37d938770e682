"""Hugging Face folders: transformers' own save_pretrained output loads back exactly; bad folders are named."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from edge.errors import EdgeError
from edge.models.config import Family
from edge.models.gemma import Gemma
from edge.models.reference import build_reference
from edge.models.weights import assign, random_tensors
from edge.models.weights.hf import config_to_hf, load_hf


@pytest.fixture
def hf_folder(tmp_path, family):
    cfg = tiny_config(family, n_kv_heads=2)
    tensors = random_tensors(cfg, seed=5)
    build_reference(cfg, tensors).save_pretrained(tmp_path)  # writes config.json + model.safetensors
    return tmp_path, cfg, tensors


def test_roundtrip_config_and_tensors(hf_folder):
    folder, cfg, tensors = hf_folder
    got_cfg, got = load_hf(folder)
    for field in (
        "family",
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "hidden_dim",
        "sliding_window",
        "layer_types",
        "attn_softcap",
        "final_softcap",
        "post_norms",
        "qk_norm",
        "query_pre_attn_scalar",
        "rope_theta",
        "rope_local_theta",
    ):
        assert getattr(got_cfg, field) == getattr(cfg, field), field
    assert set(got) == set(tensors)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    model = Gemma(got_cfg, max_seq_len=16).eval()
    assign(model, got, "hf")
    assert torch.isfinite(model(torch.tensor([[2, 5, 7]]), torch.tensor([0]))).all()


def _rewrite(folder, edit):
    f = folder / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f))


def test_missing_tensor_is_named(hf_folder):
    folder, *_ = hf_folder
    _rewrite(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(EdgeError, match=r"missing 1: layers\.1\.mlp\.up\.weight"):
        load_hf(folder)


def test_extra_tensor_is_named(hf_folder):
    folder, *_ = hf_folder
    _rewrite(folder, lambda s: s.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(8)))
    with pytest.raises(EdgeError, match="unexpected 1: .*rotary_emb"):
        load_hf(folder)


def test_wrong_shape_is_named(hf_folder):
    folder, *_ = hf_folder
    _rewrite(folder, lambda s: s.__setitem__("model.norm.weight", torch.zeros(7)))
    with pytest.raises(EdgeError, match=r"norm\.weight \(7,\)"):
        load_hf(folder)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(tiny_config(Family.GEMMA2))))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    with pytest.raises(EdgeError, match="no \\*.safetensors"):
        load_hf(tmp_path)


def test_non_gemma_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(EdgeError, match="'llama'"):
        load_hf(tmp_path)
