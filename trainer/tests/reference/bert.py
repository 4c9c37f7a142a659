#!/usr/bin/env python3
"""A BERT forward pass in NumPy (float64), written from Hugging Face's modeling_bert (BertModel,
BertForMaskedLM, BertForSequenceClassification; inference, so no dropout) and sharing no code
with Gantry, over a Hugging Face model folder (config.json, model.safetensors).

Usage: bert.py DIR IDS_JSON [MASK_JSON]  -- IDS_JSON is a list of token-id lists, all of one
length; MASK_JSON, the same shape, holds 1 for a real token and 0 for padding (all 1 without it).
Token types are all 0 and positions 0..t-1.

The tensors are either a bare BertModel's (embeddings.*, encoder.*, pooler.*) or a task model's,
whose encoder names carry the "bert." prefix: BertForMaskedLM adds cls.predictions.* (no pooler;
the decoder weight may be left out when tied to the word embeddings, the default), and
BertForSequenceClassification adds classifier.* over the pooler. The embeddings' position_ids and
token_type_ids buffers are ignored. Checks every tensor's name and shape against the Hugging Face
conventions for the config, then prints as JSON {"hidden": [seq][pos][hidden]} (the last layer's
output), with "pooled": [seq][hidden] when there is a pooler, "mlm_logits": [seq][pos][vocab] when
there is a masked-LM head and "classifier_logits": [seq][labels] when there is a classifier.
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file

BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def num_labels(cfg):
    labels = cfg.get("id2label")
    if labels is not None and "num_labels" in cfg and len(labels) != cfg["num_labels"]:
        sys.exit(f"config: num_labels {cfg['num_labels']} but {len(labels)} id2label entries")
    return len(labels) if labels is not None else cfg.get("num_labels", 2)


def heads(names):
    """(prefix of the encoder's names, pooler?, masked-LM head?, classifier?) from the names."""
    prefix = "bert." if any(n.startswith("bert.") for n in names) else ""
    mlm = any(n.startswith("cls.") for n in names)
    classifier = any(n.startswith("classifier.") for n in names)
    if (mlm or classifier) and not prefix:
        prefix = "bert."  # a task model's encoder is always under bert.: report it missing
    pooler = classifier or any(n.startswith(prefix + "pooler.") for n in names)
    return prefix, pooler, mlm, classifier


def expected_shapes(cfg, prefix, pooler, mlm, classifier):
    """Every tensor Hugging Face writes for this model: name -> (shape, required)."""
    d, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    p = prefix + "embeddings."
    shapes = {
        p + "word_embeddings.weight": (vocab, d),
        p + "position_embeddings.weight": (cfg["max_position_embeddings"], d),
        p + "token_type_embeddings.weight": (cfg["type_vocab_size"], d),
        p + "LayerNorm.weight": (d,),
        p + "LayerNorm.bias": (d,),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"{prefix}encoder.layer.{i}."
        shapes.update({
            p + "attention.self.query.weight": (d, d),
            p + "attention.self.query.bias": (d,),
            p + "attention.self.key.weight": (d, d),
            p + "attention.self.key.bias": (d,),
            p + "attention.self.value.weight": (d, d),
            p + "attention.self.value.bias": (d,),
            p + "attention.output.dense.weight": (d, d),
            p + "attention.output.dense.bias": (d,),
            p + "attention.output.LayerNorm.weight": (d,),
            p + "attention.output.LayerNorm.bias": (d,),
            p + "intermediate.dense.weight": (inter, d),
            p + "intermediate.dense.bias": (inter,),
            p + "output.dense.weight": (d, inter),
            p + "output.dense.bias": (d,),
            p + "output.LayerNorm.weight": (d,),
            p + "output.LayerNorm.bias": (d,),
        })
    shapes = {name: (shape, True) for name, shape in shapes.items()}
    if pooler:
        shapes[prefix + "pooler.dense.weight"] = ((d, d), True)
        shapes[prefix + "pooler.dense.bias"] = ((d,), True)
    if mlm:
        p = "cls.predictions."
        shapes.update({
            p + "transform.dense.weight": ((d, d), True),
            p + "transform.dense.bias": ((d,), True),
            p + "transform.LayerNorm.weight": ((d,), True),
            p + "transform.LayerNorm.bias": ((d,), True),
            # The decoder's bias is cls.predictions.bias; a file may hold it under either name.
            p + "bias": ((vocab,), False),
            p + "decoder.bias": ((vocab,), False),
            p + "decoder.weight": ((vocab, d), not cfg.get("tie_word_embeddings", True)),
        })
    if classifier:
        shapes["classifier.weight"] = ((num_labels(cfg), d), True)
        shapes["classifier.bias"] = ((num_labels(cfg),), True)
    return shapes


def check(w, want):
    missing = sorted(n for n, (_, required) in want.items() if required and n not in w)
    extra = sorted(set(w) - set(want))
    if len(missing) == 1 and not extra:
        sys.exit(f"{missing[0]}: missing, Hugging Face's shape is {want[missing[0]][0]}")
    if missing or extra:
        sys.exit(f"names: missing {missing}, extra {extra}")
    for name, (shape, _) in want.items():
        if name in w and w[name].shape != shape:
            sys.exit(f"{name}: shape {w[name].shape}, Hugging Face's is {shape}")
    bias, decoder_bias = "cls.predictions.bias", "cls.predictions.decoder.bias"
    if decoder_bias in want and bias not in w and decoder_bias not in w:
        sys.exit(f"{bias}: missing, Hugging Face's shape is {want[bias][0]}")
    if bias in w and decoder_bias in w and not np.array_equal(w[bias], w[decoder_bias]):
        sys.exit(f"{bias} and {decoder_bias} differ; Hugging Face ties them")


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    """The exact (erf) GELU, Hugging Face's "gelu"."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def layer_norm(x, w, b, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def linear(x, w, name):
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def forward(cfg, w, prefix, ids, mask):
    """The last hidden state [b, t, d] of the ids [b, t] under the key mask [b, t] (1 real)."""
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    dh, eps = d // heads, cfg.get("layer_norm_eps", 1e-12)
    b, t = ids.shape
    p = prefix + "embeddings."
    h = (w[p + "word_embeddings.weight"][ids]
         + w[p + "token_type_embeddings.weight"][0]
         + w[p + "position_embeddings.weight"][:t])
    h = layer_norm(h, w[p + "LayerNorm.weight"], w[p + "LayerNorm.bias"], eps)
    # get_extended_attention_mask: (1 - mask) * finfo.min added to every query's scores for a
    # key. finfo.min plus a finite score stays finite, so a masked key's weight is exp(≈ min) = 0.
    bias = ((1.0 - mask) * np.finfo(np.float64).min)[:, None, None, :]
    for i in range(cfg["num_hidden_layers"]):
        p = f"{prefix}encoder.layer.{i}."

        def split(x):
            return x.reshape(b, t, heads, dh).transpose(0, 2, 1, 3)

        q = split(linear(h, w, p + "attention.self.query"))
        k = split(linear(h, w, p + "attention.self.key"))
        v = split(linear(h, w, p + "attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh) + bias
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        context = (scores @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        h = layer_norm(linear(context, w, p + "attention.output.dense") + h,
                       w[p + "attention.output.LayerNorm.weight"],
                       w[p + "attention.output.LayerNorm.bias"], eps)
        x = gelu(linear(h, w, p + "intermediate.dense"))
        h = layer_norm(linear(x, w, p + "output.dense") + h,
                       w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    return h


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    folder, ids = sys.argv[1], json.loads(sys.argv[2])
    mask = json.loads(sys.argv[3]) if len(sys.argv) == 4 else None
    with open(f"{folder}/config.json") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "bert", cfg["model_type"]
    assert cfg.get("hidden_act", "gelu") == "gelu", cfg["hidden_act"]
    assert cfg.get("position_embedding_type", "absolute") == "absolute", \
        cfg["position_embedding_type"]
    assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0

    if not ids or len({len(seq) for seq in ids}) != 1:
        sys.exit("IDS_JSON: want a non-empty list of equally long id lists")
    ids = np.array(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        sys.exit(f"IDS_JSON: want a list of equally long, non-empty id lists, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= cfg["vocab_size"]:
        sys.exit(f"IDS_JSON: ids must lie in [0, {cfg['vocab_size']})")
    if ids.shape[1] > cfg["max_position_embeddings"]:
        sys.exit(f"IDS_JSON: {ids.shape[1]} tokens, over {cfg['max_position_embeddings']}")
    mask = np.ones(ids.shape) if mask is None else np.array(mask, dtype=np.float64)
    if mask.shape != ids.shape or not np.isin(mask, (0.0, 1.0)).all():
        sys.exit(f"MASK_JSON: want 0/1 of shape {ids.shape}, got shape {mask.shape}")

    buffers = {p + n for n in BUFFERS for p in ("", "bert.")}
    w = {k: v.astype(np.float64)
         for k, v in load_file(f"{folder}/model.safetensors").items() if k not in buffers}
    prefix, pooler, mlm, classifier = heads(set(w))
    check(w, expected_shapes(cfg, prefix, pooler, mlm, classifier))
    tied = cfg.get("tie_word_embeddings", True)
    embeddings = w[prefix + "embeddings.word_embeddings.weight"]
    if mlm and tied and "cls.predictions.decoder.weight" in w and \
            not np.array_equal(w["cls.predictions.decoder.weight"], embeddings):
        sys.exit("cls.predictions.decoder.weight differs from the word embeddings; "
                 "Hugging Face ties them (tie_word_embeddings)")

    h = forward(cfg, w, prefix, ids, mask)
    out = {"hidden": h.tolist()}
    if pooler:
        pooled = np.tanh(linear(h[:, 0], w, prefix + "pooler.dense"))
        out["pooled"] = pooled.tolist()
    if mlm:
        p = "cls.predictions."
        x = gelu(linear(h, w, p + "transform.dense"))
        x = layer_norm(x, w[p + "transform.LayerNorm.weight"], w[p + "transform.LayerNorm.bias"],
                       cfg.get("layer_norm_eps", 1e-12))
        decoder = embeddings if tied else w[p + "decoder.weight"]
        bias = w[p + "bias"] if p + "bias" in w else w[p + "decoder.bias"]
        out["mlm_logits"] = (x @ decoder.T + bias).tolist()
    if classifier:
        out["classifier_logits"] = linear(pooled, w, "classifier").tolist()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
