"""The decoder `gantry-bench gpu` times, in PyTorch eager on the same GPU, for scripts/gpu-check.

The same architecture as Gantry's built-in gpt (trainer/src/model.rs): token and learned
position embeddings, pre-norm blocks of causal self-attention (one fused QKV projection) and a
4x GELU MLP, a final LayerNorm and an output head over the same 13-symbol vocabulary; Adam; f32
with TF32 off, as Gantry's f32 runs. Prints one JSON line.
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn

VOCAB = 13


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(2, 3) / (d // self.heads) ** 0.5 + mask
        attended = (scores.softmax(dim=3) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attended)
        return x + self.fc_out(nn.functional.gelu(self.fc(self.ln2(x))))


class Gpt(nn.Module):
    def __init__(self, layers, d, heads, seq_len):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB)

    def forward(self, tokens, mask):
        x = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def main():
    p = argparse.ArgumentParser()
    for name, default in [("layers", 12), ("d-model", 768), ("heads", 12), ("batch", 16),
                          ("seq-len", 256), ("timed-steps", 10)]:
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    torch.manual_seed(42)
    model = Gpt(a.layers, a.d_model, a.heads, a.seq_len).to(dev)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mask = torch.full((a.seq_len, a.seq_len), -1e9, device=dev).triu(1)
    times, losses = [], []
    for _ in range(3 + a.timed_steps):
        tokens = torch.randint(0, VOCAB, (a.batch, a.seq_len + 1), device=dev)
        start = time.perf_counter()
        logits = model(tokens[:, :-1], mask)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())  # waits for the step, as Gantry's loss read does
        times.append(time.perf_counter() - start)
    step = statistics.median(times[3:])
    tokens = a.batch * a.seq_len
    print(json.dumps({
        "check": "step", "framework": "pytorch", "precision": "f32", "params": params,
        "batch": a.batch, "seq_len": a.seq_len, "step_s": step, "tokens_per_s": tokens / step,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
