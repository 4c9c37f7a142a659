#!/usr/bin/env python3
"""A Llama forward pass in NumPy (float64), written from Hugging Face's LlamaForCausalLM and
sharing no code with Gantry, over a Hugging Face model folder (config.json, model.safetensors).

Usage: llama.py DIR IDS_JSON  -- IDS_JSON is a list of token-id lists (one sequence each).
Checks every tensor's name and shape against the Hugging Face conventions for the config, then
prints {"logits": [[[...vocab] per position] per sequence]} as JSON.
"""
import json
import sys

import numpy as np
from safetensors.numpy import load_file


def expected_shapes(cfg):
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    dh = cfg.get("head_dim") or d // heads
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (heads * dh, d),
            p + "self_attn.k_proj.weight": (kv * dh, d),
            p + "self_attn.v_proj.weight": (kv * dh, d),
            p + "self_attn.o_proj.weight": (d, heads * dh),
            p + "mlp.gate_proj.weight": (inter, d),
            p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        })
    return shapes


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate(x, theta):
    """Rotary embedding of x [heads, t, dh], Hugging Face's rotate_half form."""
    t, dh = x.shape[1], x.shape[2]
    inv = 1.0 / theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh)
    freqs = np.outer(np.arange(t, dtype=np.float64), inv)
    emb = np.concatenate([freqs, freqs], axis=-1)
    half = dh // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def forward(cfg, w, ids):
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    dh = cfg.get("head_dim") or d // heads
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    t = len(ids)
    h = w["model.embed_tokens.weight"][np.array(ids)]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).reshape(t, heads, dh).transpose(1, 0, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).reshape(t, kv, dh).transpose(1, 0, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(t, kv, dh).transpose(1, 0, 2)
        q, k = rotate(q, theta), rotate(k, theta)
        # repeat_kv: key/value head j serves query heads j·n .. j·n + n - 1.
        k, v = np.repeat(k, heads // kv, axis=0), np.repeat(v, heads // kv, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(dh) + mask
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        attended = (scores @ v).transpose(1, 0, 2).reshape(t, heads * dh)
        h = h + attended @ w[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        up = x @ w[p + "mlp.up_proj.weight"].T
        h = h + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return h @ head.T


def main():
    folder, ids = sys.argv[1], json.loads(sys.argv[2])
    with open(f"{folder}/config.json") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llama", cfg["model_type"]
    w = {k: v.astype(np.float64) for k, v in load_file(f"{folder}/model.safetensors").items()}
    want = expected_shapes(cfg)
    if set(w) != set(want):
        sys.exit(f"names: missing {sorted(set(want) - set(w))}, extra {sorted(set(w) - set(want))}")
    for name, shape in want.items():
        if w[name].shape != shape:
            sys.exit(f"{name}: shape {w[name].shape}, Hugging Face's is {shape}")
    print(json.dumps({"logits": [forward(cfg, w, seq).tolist() for seq in ids]}))


if __name__ == "__main__":
    main()
