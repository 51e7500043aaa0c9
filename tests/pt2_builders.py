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
        net.features[1].running_mean.uniform_(-0.2, 0.2)
        net.features[1].running_var.uniform_(0.5, 2.0)
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


def labelled(model: Path, path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """An .npz of ``arrays`` with labels = the float model's own predictions (so fp32 label accuracy is 1)."""
    import torch

    ep = torch.export.load(str(model))
    with torch.no_grad():
        out = ep.module()(*[torch.from_numpy(a) for a in arrays.values()])
    np.savez(path, **arrays, labels=out.argmax(-1).numpy().astype(np.int64))
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
