"""torch.export archives (.pt2) built by the tests, and hostile files posing as PyTorch models."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


def save_pt2(module: Any, example_args: tuple[Any, ...], path: Path, dynamic_batch: bool = True) -> Path:
    import torch

    module.eval()
    dims = tuple({0: torch.export.Dim("batch", min=1, max=4096)} for _ in example_args) if dynamic_batch else None
    ep = torch.export.export(module, example_args, dynamic_shapes=dims)
    torch.export.save(ep, str(path))
    return path


def conv_net(path: Path, seed: int = 0, width: int = 8) -> Path:
    """A small CNN classifier: image [N, 3, 32, 32] float32 -> [N, 10] logits, dynamic batch."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = width
            self.features = nn.Sequential(
                nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.ReLU(),
                nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.ReLU(),
            )
            self.head = nn.Linear(2 * w, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(image).mean(dim=(2, 3)))

    net = Net()
    with torch.no_grad():  # non-trivial batch-norm statistics, as a trained model has
        bn = net.features[1]
        assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return save_pt2(net, (torch.randn(2, 3, 32, 32),), path)


def transformer_block(path: Path, vocab: int = 500, dim: int = 32, seq: int = 16, classes: int = 5,
                      seed: int = 0) -> Path:
    """One pre-norm transformer block over int64 token ids with an attention mask, mean-pooled over the
    unmasked tokens into [N, classes] scores; dynamic batch."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.head = nn.Linear(dim, classes)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            x = self.emb(input_ids) + self.pos
            bias = (1.0 - attention_mask.to(x.dtype))[:, None, :] * -1e4
            q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5 + bias, dim=-1)
            x = x + self.proj(att @ v)
            x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))
            m = attention_mask.to(x.dtype)[:, :, None]
            return self.head((x * m).sum(1) / m.sum(1).clamp(min=1.0))

    ids = torch.randint(0, vocab, (2, seq))
    return save_pt2(Block(), (ids, torch.ones(2, seq, dtype=torch.int64)), path)


def masked_encoder(path: Path, layers: int = 2, vocab: int = 1200, dim: int = 32, seq: int = 16, seed: int = 0) -> Path:
    """``layers`` pre-norm transformer blocks over int64 token ids with an attention mask added to the scores
    as current transformers builds it, ``(1 - mask) * finfo(float32).min``, mean-pooled over the unmasked
    tokens into a [N, dim] embedding; dynamic batch. Its node names are a trap for name lookup: the
    second block's scores + mask is ``add_4`` in ``ep.module()``, while the ONNX export's ``add_4`` is the
    embedding sum, a tensor within +-5. Quantizing the one with the other's range sends -3.4e38 through a
    uint8 step of ~0.03 (-inf after the division, and NaN out of a straight-through rounding)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5 + bias, dim=-1)
            x = x + self.proj(att @ v)
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            x = self.emb(input_ids) + self.pos
            m = attention_mask.to(x.dtype)
            bias = (1.0 - m)[:, None, :] * torch.finfo(torch.float32).min
            for block in self.blocks:
                x = block(x, bias)
            return (x * m[:, :, None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)

    ids = torch.randint(0, vocab, (2, seq))
    return save_pt2(Encoder(), (ids, torch.ones(2, seq, dtype=torch.int64)), path)


def outlier_mlp(path: Path, seed: int = 0, massive: float = 150.0, weight_on_massive: float = 0.003) -> Path:
    """features [N, 32] -> Linear(64) -> ReLU -> Linear(64) -> ReLU -> Linear(10) scores, where two hidden
    channels of the first layer carry a large constant (bias ``massive``, as the "massive activations" of
    large models do) that the next layer barely reads (its weights on them are ``weight_on_massive`` of the
    others). Per-tensor uint8 quantization of that hidden activation with a min/max range spends its 256
    levels on [0, ~150], leaving the informative channels (values around 1) a handful of levels: post-training
    int8 loses clearly. Learning that range (clipping the two channels costs almost nothing) recovers it."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)
            with torch.no_grad():
                self.out.weight.mul_(6.0)
                self.out.bias.zero_()
                for c in (5, 40):
                    self.fc1.bias[c] = massive
                    self.fc1.weight[c].mul_(0.5)
                    self.fc2.weight[:, c].mul_(weight_on_massive)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.fc2(torch.relu(self.fc1(features)))))

    return save_pt2(Net(), (torch.randn(4, 32),), path)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (8-byte little-endian header length, a JSON header of dtype, shape
    and byte offsets, then the raw little-endian data), without the ``safetensors`` package."""
    dtypes = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I8": "i1", "U8": "u1",
              "BOOL": "?"}
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    data = memoryview(raw)[8 + size:]
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, stop = meta["data_offsets"]
        out[name] = np.frombuffer(data[start:stop], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"]).copy()
    return out


def bert_encoder(path: Path, config: dict[str, Any], state: dict[str, np.ndarray] | None = None, seq: int = 16,
                 seed: int = 0) -> Path:
    """A BERT sentence encoder as sentence-transformers runs it (BertModel with Hugging Face's parameter
    names, mean pooling over the unmasked tokens, L2 normalisation): input_ids and attention_mask
    [N, seq] int64 -> [N, hidden] float32, dynamic batch. The attention mask is added to the scores as
    current transformers builds it, ``(1 - mask) * finfo(float32).min``: a tensor whose range no int8 scale
    of the scores covers. ``state`` (e.g. ``read_safetensors`` of all-MiniLM-L6-v2) gives the weights;
    without it they are random at BERT's initialisation scale."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    inner, eps = int(config["intermediate_size"]), float(config.get("layer_norm_eps", 1e-12))

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            n, s, _ = x.shape

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(n, s, heads, hidden // heads).transpose(1, 2)

            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            att = torch.softmax(q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5 + bias, dim=-1)
            return (att @ v).transpose(1, 2).reshape(n, s, hidden)

    class Dense(nn.Module):
        def __init__(self, d_in: int) -> None:
            super().__init__()
            self.dense, self.LayerNorm = nn.Linear(d_in, hidden), nn.LayerNorm(hidden, eps=eps)

        def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return self.LayerNorm(self.dense(x) + residual)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self, self.output = SelfAttention(), Dense(hidden)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return self.output(self.self(x, bias), x)

    class Intermediate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(hidden, inner)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(self.dense(x))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention, self.intermediate, self.output = Attention(), Intermediate(), Dense(inner)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            a = self.attention(x, bias)
            return self.output(self.intermediate(a), a)

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(int(config["vocab_size"]), hidden)
            self.position_embeddings = nn.Embedding(int(config["max_position_embeddings"]), hidden)
            self.token_type_embeddings = nn.Embedding(int(config.get("type_vocab_size", 2)), hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            pos = self.position_embeddings.weight[: ids.shape[1]]
            return self.LayerNorm(self.word_embeddings(ids) + pos + self.token_type_embeddings.weight[0])

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(Layer() for _ in range(int(config["num_hidden_layers"])))

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings, self.encoder = Embeddings(), Encoder()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            x = self.embeddings(input_ids)
            m = attention_mask.to(torch.float32)
            bias = (1.0 - m)[:, None, None, :] * torch.finfo(torch.float32).min
            for layer in self.encoder.layer:
                x = layer(x, bias)
            pooled = (x * m[:, :, None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    net = Bert()
    if state is None:
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("weight") and "LayerNorm" not in name:
                    p.normal_(0.0, float(config.get("initializer_range", 0.02)))
                elif name.endswith("bias"):
                    p.normal_(0.0, 0.02)
    else:
        wanted = net.state_dict()
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"the weights lack {missing[:5]}")
        net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(state[k])) for k in wanted})
    ids = torch.randint(0, int(config["vocab_size"]), (2, seq))
    return save_pt2(net, (ids, torch.ones(2, seq, dtype=torch.int64)), path)


def padded_tokens(n: int, seq: int, vocab: int, seed: int = 0, min_len: int = 4) -> dict[str, np.ndarray]:
    """Random token ids framed like tokenised sentences of random length ([CLS]=101 ... [SEP]=102, then
    [PAD]=0 with attention_mask 0), for BERT-style models with a vocabulary of ``vocab``."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, seq), np.int64)
    mask = np.zeros((n, seq), np.int64)
    for i in range(n):
        length = int(rng.integers(min_len, seq + 1))
        ids[i, :length] = rng.integers(1000, vocab, length)
        ids[i, 0], ids[i, length - 1] = min(101, vocab - 1), min(102, vocab - 1)
        mask[i, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def wordpiece(texts: list[str], vocab_path: Path, seq: int) -> dict[str, np.ndarray]:
    """BERT's uncased tokenisation, simplified (lower case, split on whitespace and punctuation, greedy
    longest-match WordPiece with ``##`` continuations, no accent stripping or Chinese-character rules):
    [CLS] tokens [SEP], truncated and padded to ``seq``, with the attention mask."""
    import re

    vocab = {w: i for i, w in enumerate(vocab_path.read_text(encoding="utf-8").splitlines())}
    unk, cls, sep = vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"]
    ids = np.zeros((len(texts), seq), np.int64)
    mask = np.zeros((len(texts), seq), np.int64)
    for row, text in enumerate(texts):
        pieces: list[int] = []
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            start, out = 0, []
            while start < len(word):
                end = len(word)
                while end > start and (word[start:end] if start == 0 else "##" + word[start:end]) not in vocab:
                    end -= 1
                if end == start:
                    out = [unk]
                    break
                out.append(vocab[word[start:end] if start == 0 else "##" + word[start:end]])
                start = end
            pieces.extend(out)
        tokens = [cls, *pieces[: seq - 2], sep]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def labelled(model: Path, path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """An .npz of ``arrays`` with labels = the float model's own predictions (so fp32 label accuracy is 1)."""
    import torch

    ep = torch.export.load(str(model))
    with torch.no_grad():
        out = ep.module()(*[torch.from_numpy(a) for a in arrays.values()])
    kw: dict[str, Any] = {**arrays, "labels": out.argmax(-1).numpy().astype(np.int64)}
    np.savez(path, **kw)
    return path


# --- hostile files -------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``path``: proof that a loader executed code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def pickle_payload(canary: Path) -> bytes:
    return pickle.dumps(_Payload(canary), protocol=2)


def torchscript_file(path: Path) -> Path:
    import torch

    torch.jit.script(torch.nn.Linear(4, 2)).save(str(path))
    return path


def torch_save_checkpoint(path: Path, canary: Path) -> Path:
    """A torch.save-style zip whose data.pkl is a payload."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ckpt/data.pkl", pickle_payload(canary))
        z.writestr("ckpt/version", "3\n")
    return path


def zip_posing_as_pt2(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/weights.bin", b"\x00" * 64)
        z.writestr("model/readme.txt", "not a torch.export archive")
    return path


def rewrite_pt2(src: Path, dest: Path, edit: Any, extra: dict[str, bytes] | None = None) -> Path:
    """Copy a .pt2, ``edit(relative_name, data)`` returning each member's new bytes (None drops it), and add
    the ``extra`` members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        names = zin.namelist()
        prefix = names[0].split("/", 1)[0] + "/"
        for name in names:
            data = edit(name[len(prefix):], zin.read(name))
            if data is not None:
                zout.writestr(name, data)
        for name, data in (extra or {}).items():
            zout.writestr(prefix + name, data)
    return dest


def pt2_with_pickled_weight(src: Path, dest: Path, canary: Path) -> Path:
    """A .pt2 whose weights config marks its first weight use_pickle, that weight's file being a payload:
    torch.export.load would torch.load(weights_only=False) it."""
    def edit(name: str, data: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            cfg = json.loads(data)
            for meta in cfg["config"].values():
                if meta["path_name"] == "weight_0":
                    meta["use_pickle"] = True
            return json.dumps(cfg).encode()
        if name == "data/weights/weight_0":
            return pickle_payload(canary)
        return data

    return rewrite_pt2(src, dest, edit)


def pt2_with_sample_inputs_payload(src: Path, dest: Path, canary: Path) -> Path:
    """A .pt2 whose sample-inputs file is a payload: torch.export.load tries torch.load(weights_only=True),
    and when that fails, weights_only=False."""
    return rewrite_pt2(src, dest, lambda name, data: (
        pickle_payload(canary) if name == "data/sample_inputs/model.pt" else data))


def pt2_with_program_edit(src: Path, dest: Path, change: Any) -> Path:
    """A .pt2 whose models/model.json is changed in place by ``change(program_dict)``."""
    def edit(name: str, data: bytes) -> bytes:
        if name == "models/model.json":
            program = json.loads(data)
            change(program)
            return json.dumps(program).encode()
        return data

    return rewrite_pt2(src, dest, edit)
